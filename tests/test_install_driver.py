"""kmod/install.sh in a sandbox: every install path run for real, without touching this machine.

The sandbox is a directory standing for / (KVC_SYSROOT): lib/modules of made-up kernels holding
module files that kmod reads as modules (tests/stubs/install/mkmodule: .modinfo, exported CRCs,
__versions), etc/depmod.d, var/lib, usr/src, and sys/module with what is "loaded". The installer
runs unchanged with tests/stubs/install/bin first on PATH: kmod's own depmod and modinfo (fetched
by kmod/fetch.sh) confined to the sandbox, modprobe that asks kmod's modprobe --dry-run what it
would insert and simulates the insert, rmmod/mokutil/uname/make stand-ins, and, for the DKMS
scenarios, Debian's real dkms script with its trees in the sandbox. The smoke test is the real
kmod/kvc-probe.c, answered through an LD_PRELOAD (fake_uvm_ioctl.c) as the sandbox's loaded
module would. Nothing here loads, unloads or installs anything on this machine; the stand-ins
refuse what they do not simulate (and modprobe -r, which the installer must never use).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KMOD = ROOT / "kmod"
STUBS = ROOT / "tests" / "stubs" / "install"
INSTALL = KMOD / "install.sh"

OLD, NEW = "535.261.03", "535.288.01"   # a supported driver, and its upgrade
#: nvidia.ko's exports per driver version, with the CRCs its modversions carry (one stored the
#: pre-5.19 way, as an absolute symbol).
EXPORTS = {
    OLD: {"nvUvmInterfaceRegisterGpu": "0x1111aaaa", "nvUvmInterfacePmaAllocPages": "abs:0x2222bbbb"},
    NEW: {"nvUvmInterfaceRegisterGpu": "0x3333cccc", "nvUvmInterfacePmaAllocPages": "0x4444dddd"},
}
K1, K2, K3 = "6.1.0-kvct1-amd64", "6.1.0-kvct2-amd64", "6.1.0-kvct3-amd64"
MUTATING = ("depmod", "rmmod", "modprobe", "mknod", "dkms", "insmod", "sign-file", "loaded")


def _fetch(name: str, *args: str) -> Path:
    out = subprocess.run([str(KMOD / "fetch.sh"), "--name", name, *args], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"kmod/fetch.sh could not fetch {args[-1]}: {out.stderr.strip().splitlines()[-1:]}")
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def kmod_sbin() -> Path:
    """kmod's depmod/modinfo/modprobe (Debian's package, unpacked into .cache/kvc)."""
    sbin = _fetch("tool-kmod", "kmod") / "sbin"
    out = subprocess.run([str(sbin / "modinfo"), "--version"], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"the fetched kmod does not run here: {out.stderr.strip()}")
    return sbin


def _dkms(suite: str) -> Path:
    """Debian's dkms script of a release (a shell script: runs anywhere)."""
    return _fetch(f"tool-dkms-{suite}", "--suite", suite, "--no-deps", "dkms") / "usr" / "sbin" / "dkms"


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """Built once per session: the ioctl stand-in, and KVC_BUILD (the probe, module builds)."""
    work = tmp_path_factory.mktemp("install-work")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-I", str(ROOT / "driver-patch" / "include"),
                    str(STUBS / "fake_uvm_ioctl.c"), "-o", str(work / "fake_uvm_ioctl.so"), "-ldl"],
                   check=True, capture_output=True)
    return work


class Sandbox:
    """A made-up machine: kernels, an NVIDIA driver, loaded modules, and the installer run on it."""

    def __init__(self, path: Path, kmod_sbin: Path, work: Path, dkms: Path | None = None, *, like: Path | None = None):
        """A new machine in `path`, or (like=) a copy of another one's disk and state."""
        self.root = path / "root"
        self.sandbox = self.root / ".sandbox"
        self.kmod = kmod_sbin
        self.work = work
        self.dkms = dkms
        if like:
            shutil.copytree(like, self.root, symlinks=True)
        for d in ("etc/depmod.d", "etc/modprobe.d", "etc/dkms", "var/lib/dkms", "usr/src", "sys/module", "dev",
                  "proc", "sys/kernel/security", ".sandbox"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        if not like:
            (self.root / "proc" / "devices").write_text("Character devices:\n195 nvidia\n")
            (self.root / "sys/kernel/security/lockdown").write_text("[none] integrity confidentiality\n")
            self.set_running(K1)
        bins = [str(STUBS / "bin")] + ([str(STUBS / "bin-dkms")] if dkms else []) + ["/usr/local/bin", "/usr/bin", "/bin"]
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("KVC_DRY_RUN", "DRIVER_VERSION", "KERNEL_RELEASE")},
            "PATH": ":".join(bins), "KVC_SYSROOT": str(self.root), "KVC_TEST_KMOD": str(kmod_sbin),
            "KVC_BUILDER": str(STUBS / "fake-builder"), "KVC_TEST_WORK": str(path),
            "KVC_BUILD": str(work / "build"), "LD_PRELOAD": str(work / "fake_uvm_ioctl.so"),
            # where DKMS signs (as DKMS would read them from its framework.conf), all in the sandbox
            "sign_file": str(STUBS / "bin" / "sign-file"),
            "mok_signing_key": str(self.root / "var/lib/dkms/mok.key"),
            "mok_certificate": str(self.root / "var/lib/dkms/mok.pub"),
        }
        if dkms:
            self.env["KVC_TEST_DKMS"] = str(dkms)
        if not dkms:
            found = shutil.which("dkms", path=self.env["PATH"])
            if found:
                pytest.skip(f"this machine's {found} is on the sandbox's PATH: the no-DKMS scenarios cannot run")

    # --- the machine ---------------------------------------------------------------------
    def set_running(self, rel: str) -> None:
        (self.sandbox / "running-kernel").write_text(rel + "\n")

    def mkmodule(self, path: Path, *args: str) -> None:
        subprocess.run([str(STUBS / "mkmodule"), str(path), *args], check=True, env=self.env)

    def add_kernel(self, rel: str, driver: str | None, *, uvm_stems=("nvidia-uvm",), nvidia_stems=("nvidia",)) -> None:
        """Kernel `rel` with its headers and, if `driver`, that NVIDIA driver's modules (distribution
        files in kernel/, DKMS-built ones in updates/dkms), then depmod as the distribution runs it."""
        mods = self.root / "lib" / "modules" / rel
        build = mods / "build"
        (build / "include" / "config").mkdir(parents=True, exist_ok=True)
        config = "CONFIG_MODVERSIONS=y\nCONFIG_MODULE_SIG=y\nCONFIG_MODULE_SIG_HASH=\"sha512\"\n"
        (build / ".config").write_text(config)
        (build / "include" / "config" / "auto.conf").write_text(config)
        (build / "include" / "config" / "kernel.release").write_text(rel + "\n")
        (build / "Module.symvers").write_text("0x12345678\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n")
        for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            (mods / f).touch()
        if driver:
            self.install_driver(rel, driver, uvm_stems=uvm_stems, nvidia_stems=nvidia_stems)
        else:
            self.depmod(rel)

    def install_driver(self, rel: str, driver: str, *, uvm_stems=("nvidia-uvm",), nvidia_stems=("nvidia",),
                       compress: str | None = None) -> None:
        """(Re)place the NVIDIA driver's modules of kernel `rel` with those of `driver` (compressed
        with `compress`, "zst" or "xz", as Ubuntu and others ship them)."""
        d = self.root / "lib" / "modules" / rel / "updates" / "dkms"
        magic = f"vermagic={rel} SMP mod_unload modversions "
        for stem in nvidia_stems:
            self.mkmodule(d / f"{stem}.ko", "--info", f"version={driver}", "--info", "name=nvidia",
                          "--info", "license=Dual MIT/GPL", "--info", magic,
                          *[a for s, crc in EXPORTS[driver].items() for a in ("--export", f"{s}={crc}")])
        for stem in uvm_stems:
            self.mkmodule(d / f"{stem}.ko", "--info", f"version={driver}", "--info", "name=nvidia_uvm",
                          "--info", "depends=nvidia", "--info", magic,
                          *[a for s, crc in EXPORTS[driver].items() for a in ("--use", f"{s}={crc.removeprefix('abs:')}")])
        if compress:
            for ko in d.glob("*.ko"):
                subprocess.run({"zst": ["zstd", "-q", "--rm"], "xz": ["xz"]}[compress] + [str(ko)], check=True)
        self.depmod(rel)

    def depmod(self, rel: str) -> None:
        subprocess.run([str(self.kmod / "depmod"), "-b", str(self.root), "-C", str(self.root / "etc/depmod.d"), rel],
                       check=True, capture_output=True)

    def load(self, rel: str, name: str = "nvidia-uvm", refcnt: int = 0) -> None:
        """Load `name` as the kernel would at boot (through the sandbox's modprobe)."""
        self.set_running(rel)
        subprocess.run([str(STUBS / "bin" / "modprobe"), name], check=True, env=self.env, capture_output=True)
        (self.root / "sys/module/nvidia_uvm/refcnt").write_text(f"{refcnt}\n")
        self.clear_log()

    def loaded(self, name: str = "nvidia_uvm") -> str | None:
        f = self.root / "sys" / "module" / name / "version"
        return f.read_text().strip() if f.exists() else None

    def resolves(self, rel: str, name: str = "nvidia-uvm") -> str:
        """The file kmod's modprobe would insert for `name` on kernel `rel`."""
        out = subprocess.run([str(self.kmod / "modprobe"), "-d", str(self.root), "-C", str(self.root / "etc/modprobe.d"),
                              "-S", rel, "--show-depends", name], capture_output=True, text=True, check=True)
        return [line.split()[1] for line in out.stdout.splitlines() if line.startswith("insmod")][-1]

    def dkms_keys(self) -> None:
        keys = self.root / "var/lib/dkms"
        (keys / "mok.key").write_text("key\n")
        (keys / "mok.pub").write_text("cert\n")

    def secure_boot(self, enrolled_key: bool) -> None:
        (self.sandbox / "sb-state").write_text("enabled\n")
        if enrolled_key:
            self.dkms_keys()
            (self.sandbox / "mok-enrolled").write_text(f"{self.root / 'var/lib/dkms/mok.pub'}\n")

    # --- running -------------------------------------------------------------------------
    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        self.clear_log()
        out = subprocess.run([str(INSTALL), *args], capture_output=True, text=True, env={**self.env, **env}, timeout=120)
        print(out.stderr)
        return out

    def run_dkms(self, *args: str) -> subprocess.CompletedProcess:
        """dkms as a kernel package's postinst hook runs it."""
        return subprocess.run([str(STUBS / "bin-dkms" / "dkms"), *args], capture_output=True, text=True,
                              env=self.env, timeout=120)

    def clear_log(self) -> None:
        (self.sandbox / "log").write_text("")

    def log(self) -> list[str]:
        return (self.sandbox / "log").read_text().splitlines()

    def mutations(self) -> list[str]:
        return [line for line in self.log() if line.split()[0] in MUTATING
                and not (line.startswith("dkms status"))]

    def snapshot(self) -> dict[str, str]:
        """Every file and link of the machine's disk (not sys/proc/dev, not the stand-ins' own)."""
        snap = {}
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if rel.split("/")[0] in (".sandbox", "sys", "proc", "dev"):
                continue
            if p.is_symlink():
                snap[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                snap[rel] = "dir"
        return snap

    def override(self) -> list[str]:
        f = self.root / "etc/depmod.d/pyvattn-kvc.conf"
        return [l for l in f.read_text().splitlines() if l.startswith("override")] if f.exists() else []


@pytest.fixture(scope="session")
def installed_machine(tmp_path_factory, kmod_sbin, work) -> Path:
    """Made once: driver OLD on kernel K1 (running), nvidia and nvidia-uvm loaded and idle."""
    box = Sandbox(tmp_path_factory.mktemp("machine"), kmod_sbin, work)
    box.add_kernel(K1, OLD)
    box.load(K1)
    return box.root


@pytest.fixture
def machine(tmp_path, kmod_sbin, work, installed_machine) -> Sandbox:
    """A copy of installed_machine of its own."""
    return Sandbox(tmp_path, kmod_sbin, work, like=installed_machine)


def _dkms_machine(tmp_path, kmod_sbin, work, machine_root: Path, suite: str) -> Sandbox:
    box = Sandbox(tmp_path, kmod_sbin, work, dkms=_dkms(suite), like=machine_root)
    box.suite = suite
    box.dkms_keys()  # DKMS makes its signing key pair on its first build; this one has built before
    return box


@pytest.fixture(params=["bookworm", "trixie"])
def dkms_machine(request, tmp_path, kmod_sbin, work, installed_machine) -> Sandbox:
    """The machine with Debian's dkms: bookworm's 3.0.10 counts a BUILD_EXCLUSIVE skip as a failed
    autoinstall, trixie's 3.2 as a skip, and dkms.conf.in acts on the difference."""
    return _dkms_machine(tmp_path, kmod_sbin, work, installed_machine, request.param)


@pytest.fixture
def trixie_dkms_machine(tmp_path, kmod_sbin, work, installed_machine) -> Sandbox:
    return _dkms_machine(tmp_path, kmod_sbin, work, installed_machine, "trixie")


def _stock(box: Sandbox, rel: str = K1) -> str:
    return str(box.root / "lib" / "modules" / rel / "updates" / "dkms" / "nvidia-uvm.ko")


def _ours(box: Sandbox, rel: str = K1, stem: str = "nvidia-uvm") -> str:
    return str(box.root / "lib" / "modules" / rel / "updates" / "kvc" / f"{stem}.ko")


# --- installing ----------------------------------------------------------------------------------
def test_fresh_install_loads_the_patched_module_for_this_kernel_only(machine):
    machine.add_kernel(K2, OLD)
    before = machine.snapshot()
    out = machine.run("install")
    assert out.returncode == 0, out.stderr
    assert machine.override() == [f"override nvidia-uvm {K1} updates/kvc"]
    assert machine.resolves(K1) == _ours(machine)
    assert machine.resolves(K2) == _stock(machine, K2), "the override leaked to another kernel"
    # built against nvidia.ko's CRCs, no KBUILD_MODPOST_WARN
    make = [l for l in machine.log() if l.startswith("make ")]
    assert len(make) == 1 and "KBUILD_EXTRA_SYMBOLS=" in make[0] and "MODPOST_WARN" not in make[0]
    assert "2 symbol CRCs of" in out.stderr
    # unloaded with rmmod only, loaded, smoke-tested
    assert machine.loaded() == f"{OLD}-kvc1"
    assert [l for l in machine.mutations() if l.split()[0] in ("rmmod", "modprobe")] == \
        ["rmmod nvidia_uvm", "modprobe nvidia-uvm"]
    assert "kvc-probe: ok" in out.stdout + out.stderr and "smoke test passed" in out.stderr
    assert any(l.startswith("mknod ") for l in machine.log()), "the device node was not made"
    added = set(machine.snapshot()) - set(before)
    assert added >= {f"lib/modules/{K1}/updates/kvc/nvidia-uvm.ko", "etc/depmod.d/pyvattn-kvc.conf",
                     "var/lib/pyvattn-kvc/installed"}


def test_reinstall_replaces_the_first_and_uninstall_restores_exactly_what_was_there(machine):
    before = machine.snapshot()
    assert machine.run("install").returncode == 0
    first = machine.snapshot()
    out = machine.run("install")
    assert out.returncode == 0, out.stderr
    assert machine.override() == [f"override nvidia-uvm {K1} updates/kvc"]
    assert machine.snapshot() == first
    assert machine.loaded() == f"{OLD}-kvc1"
    out = machine.run("uninstall")
    assert out.returncode == 0, out.stderr
    assert machine.snapshot() == before
    assert machine.loaded() == OLD and machine.resolves(K1) == _stock(machine)
    assert [l for l in machine.mutations() if l.split()[0] in ("rmmod", "modprobe")] == \
        ["rmmod nvidia_uvm", "modprobe nvidia-uvm"]


def test_driver_upgraded_on_disk_but_not_loaded_is_refused(machine):
    machine.install_driver(K1, NEW)  # apt upgrade, no reboot yet: OLD still loaded
    before = machine.snapshot()
    out = machine.run("install")
    assert out.returncode == 1
    assert f"nvidia.ko {OLD} is loaded but {NEW} is installed" in out.stderr and "reboot" in out.stderr
    assert machine.snapshot() == before and machine.mutations() == []


def test_module_in_use_is_installed_but_not_reloaded(machine):
    (machine.root / "sys/module/nvidia_uvm/refcnt").write_text("3\n")
    out = machine.run("install")
    assert out.returncode == 0, out.stderr
    assert "in use (refcnt 3)" in out.stderr
    assert machine.loaded() == OLD
    assert not [l for l in machine.mutations() if l.split()[0] in ("rmmod", "modprobe")]
    assert machine.resolves(K1) == _ours(machine)


@pytest.mark.parametrize("flag, why", [("broken", "smoke test failed"), ("fail-load", "modprobe nvidia-uvm failed")])
def test_failed_load_or_smoke_test_rolls_back_to_the_drivers_module(machine, flag, why):
    before = machine.snapshot()
    out = machine.run("install", KVC_TEST_TREE_FLAGS=flag)
    assert out.returncode == 1
    assert why in out.stderr and "rolling back" in out.stderr
    assert machine.snapshot() == before
    assert machine.loaded() == OLD and machine.resolves(K1) == _stock(machine)


@pytest.mark.parametrize("flag, why", [("build-fails", "planted build failure"), ("no-source", "no source for driver")])
def test_build_failure_changes_nothing(machine, flag, why):
    before = machine.snapshot()
    out = machine.run("install", KVC_TEST_TREE_FLAGS=flag)
    assert out.returncode == 1 and why in out.stderr and "refused" in out.stderr
    assert machine.snapshot() == before and machine.mutations() == []
    assert machine.loaded() == OLD


def test_secure_boot_without_dkms_refuses_with_the_steps(machine):
    machine.secure_boot(enrolled_key=False)
    before = machine.snapshot()
    out = machine.run("install")
    assert out.returncode == 1
    assert "Secure Boot is on" in out.stderr and "mokutil --import" in out.stderr
    assert machine.snapshot() == before and machine.mutations() == []


def test_kernel_locked_down_counts_as_needing_signatures(machine):
    (machine.root / "sys/kernel/security/lockdown").write_text("none [integrity] confidentiality\n")
    out = machine.run("install")
    assert out.returncode == 1 and "locked down" in out.stderr


def test_ambiguous_driver_files_are_refused(machine):
    machine.install_driver(K1, OLD, nvidia_stems=("nvidia", "nvidia-current"))
    out = machine.run("install")
    assert out.returncode == 1 and "several NVIDIA (nvidia.ko) modules" in out.stderr
    assert machine.mutations() == []


def test_renamed_distribution_modules_get_an_override_of_their_own_name(tmp_path, kmod_sbin, work):
    """Debian installs nvidia-current-uvm.ko and loads it through a modprobe.d install line."""
    box = Sandbox(tmp_path, kmod_sbin, work)
    box.add_kernel(K1, OLD, uvm_stems=("nvidia-current-uvm",), nvidia_stems=("nvidia-current",))
    (box.root / "etc/modprobe.d/nvidia.conf").write_text(
        "install nvidia modprobe -i nvidia-current $CMDLINE_OPTS\n"
        "install nvidia-uvm modprobe nvidia ; modprobe -i nvidia-current-uvm $CMDLINE_OPTS\n")
    box.load(K1)
    assert box.loaded() == OLD
    out = box.run("install")
    assert out.returncode == 0, out.stderr
    assert box.override() == [f"override nvidia-current-uvm {K1} updates/kvc"]
    assert box.resolves(K1, "nvidia-current-uvm") == _ours(box, stem="nvidia-current-uvm")
    assert box.loaded() == f"{OLD}-kvc1"


def test_compressed_driver_modules(tmp_path, kmod_sbin, work):
    """Ubuntu ships nvidia.ko.zst: its CRCs are read from the decompressed copy."""
    if shutil.which("zstd") is None:
        pytest.skip("zstd is not installed")
    box = Sandbox(tmp_path, kmod_sbin, work)
    box.add_kernel(K1, None)
    box.install_driver(K1, OLD, compress="zst")
    box.load(K1)
    assert box.resolves(K1).endswith("updates/dkms/nvidia-uvm.ko.zst")
    out = box.run("install")
    assert out.returncode == 0, out.stderr
    assert "2 symbol CRCs of" in out.stderr and "nvidia.ko.zst match" in out.stderr
    assert box.resolves(K1) == _ours(box) and box.loaded() == f"{OLD}-kvc1"


def test_dry_run_changes_nothing_and_shows_each_action(machine):
    before = machine.snapshot()
    out = machine.run("--dry-run", "install")
    assert out.returncode == 0, out.stderr
    assert machine.snapshot() == before and machine.mutations() == []
    for action in ("+ ", "kvc-module.sh place", "depmod -a", "rmmod nvidia_uvm", "modprobe nvidia-uvm"):
        assert action in out.stderr, action
    assert machine.loaded() == OLD


# --- uninstalling --------------------------------------------------------------------------------
def test_uninstall_with_nothing_installed_does_nothing(machine):
    before = machine.snapshot()
    out = machine.run("uninstall")
    assert out.returncode == 0 and "nothing to do" in out.stderr
    assert machine.snapshot() == before and machine.mutations() == []


def test_usage_errors_exit_2(machine):
    out = machine.run("frobnicate")
    assert out.returncode == 2 and "usage" in out.stderr


# --- DKMS ------------------------------------------------------------------------------------------
def test_dkms_install_kernel_upgrades_and_uninstall(dkms_machine):
    """Through Debian's real dkms; with trixie's also under Secure Boot with an enrolled MOK key,
    so every module DKMS builds must come out signed."""
    box = dkms_machine
    signing = box.suite == "trixie"
    if signing:
        box.secure_boot(enrolled_key=True)
    before = box.snapshot()
    out = box.run("install")
    assert out.returncode == 0, out.stderr
    assert box.loaded() == f"{OLD}-kvc1" and box.resolves(K1) == _ours(box)
    assert (box.root / f"usr/src/nvidia-uvm-kvc-{OLD}/dkms.conf").exists()
    assert ("DKMS signs the module" in out.stderr) == signing
    # a new kernel with the same driver: DKMS builds it (where its autoinstall can skip cleanly)
    box.add_kernel(K2, OLD)
    auto = box.run_dkms("autoinstall", "-k", K2)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    if box.suite == "trixie":
        assert f"override nvidia-uvm {K2} updates/kvc" in box.override()
        assert box.resolves(K2) == _ours(box, K2)
    else:  # dkms 3.0.10: no AUTOINSTALL, the new kernel gets the driver's own module
        assert box.resolves(K2) == _stock(box, K2)
    # a new kernel with another driver: never built, stays the driver's own, and no failure
    box.add_kernel(K3, NEW)
    auto = box.run_dkms("autoinstall", "-k", K3)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert box.resolves(K3) == _stock(box, K3)
    assert all(K3 not in line for line in box.override())
    # not even when asked directly: BUILD_EXCLUSIVE, with the reason
    out = box.run_dkms("build", "-m", "nvidia-uvm-kvc", "-v", OLD, "-k", K3)
    assert out.returncode != 0 and "BUILD_EXCLUSIVE" in out.stdout + out.stderr
    assert f"not for kernel {K3}" in out.stderr
    for rel in (K1, K2) if signing else ():
        assert subprocess.run([str(KMOD / "kvc-module.sh"), "signed", _ours(box, rel)], env=box.env).returncode == 0
    # uninstall takes all of it away (the kernels added since stay, as they were)
    out = box.run("uninstall")
    assert out.returncode == 0, out.stderr
    after = box.snapshot()
    assert {k: v for k, v in after.items() if K2 not in k and K3 not in k} == before
    assert box.loaded() == OLD and box.resolves(K2) == _stock(box, K2)


def test_secure_boot_with_dkms_but_no_enrolled_key_refuses(trixie_dkms_machine):
    box = trixie_dkms_machine
    box.secure_boot(enrolled_key=False)
    before = box.snapshot()
    out = box.run("install")
    assert out.returncode == 1 and "not enrolled" in out.stderr and "mokutil --import" in out.stderr
    assert box.snapshot() == before
