"""Fast checks of driver-patch/ and kmod/ that need neither a GPU nor a kernel build.

The real compile check is `make driver-check` (run by `make test` after pytest); these catch a
broken series file, a header that no longer compiles in user space, or apply.sh accepting an
unsupported driver, in seconds.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "driver-patch"


def _series() -> list[tuple[str, str]]:
    rows = []
    for line in (PATCH / "series").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith("#"):
            rows.append((parts[0], parts[1]))
    return rows


def test_series_points_at_complete_patch_dirs():
    rows = _series()
    assert {v for v, _ in rows} >= {"535.261.03", "550.163.01", "580.142"}
    for _, d in rows:
        assert (PATCH / d / "uvm-kvc-hooks.patch").is_file(), d
        assert (PATCH / d / "uvm_kvc_compat.h").is_file(), d


@pytest.mark.parametrize("flags", [["-m64"], ["-m64", "-DUVM_KVC_ALIGN8="]])
def test_header_compiles_in_user_space(flags):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = '#include "uvm_kvc_ioctl.h"\nint main(void) { return (int)sizeof(UVM_KVC_MAP_PARAMS) - 72; }\n'
    out = subprocess.run(["gcc", *flags, "-std=c11", "-Wall", "-Werror", "-pedantic", "-fsyntax-only",
                          "-I", str(PATCH / "include"), "-x", "c", "-"],
                         input=src, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_hooks_patch_touches_only_expected_files():
    allowed = {"nvidia-uvm/nvidia-uvm-sources.Kbuild", "nvidia-uvm/uvm.c", "nvidia-uvm/uvm_test.c",
               "nvidia-uvm/uvm_lock.c", "nvidia-uvm/uvm_lock.h", "nvidia-uvm/uvm_map_external.c",
               "nvidia-uvm/uvm_va_range.c", "nvidia-uvm/uvm_va_range.h", "nvidia-uvm/uvm_va_space.c",
               "nvidia-uvm/uvm_va_space.h"}
    for _, d in _series():
        text = (PATCH / d / "uvm-kvc-hooks.patch").read_text()
        files = {line.split()[1][2:] for line in text.splitlines() if line.startswith("+++ ")}
        assert files <= allowed, (d, files - allowed)
        # no stock line is removed except the lock count and the module version
        removed = [l for l in text.splitlines() if l.startswith("-") and not l.startswith("---")]
        assert all("UVM_LOCK_ORDER_COUNT" in l or "MODULE_VERSION" in l or "UVM_ROUTE_CMD" in l
                   or l.strip() in ("-", "-    }") for l in removed), (d, removed)


def test_apply_refuses_unsupported_version(tmp_path):
    tree = tmp_path / "tree"
    (tree / "nvidia-uvm").mkdir(parents=True)
    (tree / "nvidia-uvm" / "uvm.c").write_text("/* stub */\n")
    out = subprocess.run([str(PATCH / "apply.sh"), str(tree), "470.256.02"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "not supported" in out.stderr
    assert sorted(p.name for p in (tree / "nvidia-uvm").iterdir()) == ["uvm.c"]


def test_apply_refuses_a_tree_it_cannot_patch(tmp_path):
    tree = tmp_path / "tree"
    (tree / "nvidia-uvm").mkdir(parents=True)
    (tree / "nvidia-uvm" / "uvm.c").write_text("/* not NVIDIA's file */\n")
    out = subprocess.run([str(PATCH / "apply.sh"), str(tree), "535.261.03"], capture_output=True, text=True)
    assert out.returncode == 1
    assert not (tree / "nvidia-uvm" / "uvm_kvc.c").exists()
