"""kmod/'s shell scripts under failure: every failing step names itself in one `kvc: error:` line,
and kmod/fetch.sh fetches into its cache only (the full run is `make driver-check`).

The fetch tests that read Debian's archive skip when it cannot be reached; the rest need no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KMOD = ROOT / "kmod"
DEAD_MIRROR = "http://127.0.0.1:9/debian"  # connection refused at once


@pytest.fixture
def no_retries(tmp_path) -> dict[str, str]:
    """apt configured not to retry (a refused connection is retried for 7 s otherwise)."""
    conf = tmp_path / "apt.conf"
    conf.write_text('Acquire::Retries "0";\n')
    return {"APT_CONFIG": str(conf)}


def bash(script: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    path = tmp_path / "step.sh"
    path.write_text(f". {KMOD / 'lib.sh'}\n{script}")
    return subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("kvc: error:")]


# --- kmod/lib.sh ---------------------------------------------------------------------------------
def test_a_failing_command_names_itself(tmp_path):
    r = bash("say starting\ncat /no/such/file\necho not reached\n", tmp_path)
    assert r.returncode != 0
    assert "not reached" not in r.stdout
    assert errors(r.stderr) == ["kvc: error: step.sh line 3: 'cat /no/such/file' failed with status 1"]
    piped = bash("ls /no/such/dir | sort\n", tmp_path)  # pipefail: the pipeline fails; bash names its last part
    assert errors(piped.stderr) == ["kvc: error: step.sh line 2: 'sort' failed with status 2"]


def test_a_failure_inside_a_substitution_is_reported_once(tmp_path):
    r = bash("inner() { false; echo not reached; }\nouter() { local x; x=$(inner); echo \"$x\"; }\n"
             "y=$(outer)\necho not reached either\n", tmp_path)
    assert r.returncode != 0
    assert "not reached" not in r.stdout
    assert errors(r.stderr) == ["kvc: error: step.sh line 2: 'false' failed with status 1"]


def test_die_is_one_line_even_from_a_substitution(tmp_path):
    r = bash("f() { die 'no sparse here: install sparse'; }\nx=$(f)\n", tmp_path)
    assert r.returncode == 1
    assert errors(r.stderr) == ["kvc: error: no sparse here: install sparse"]


def test_run_step_stops_a_failing_step_and_goes_on(tmp_path):
    r = bash("step() { echo \"start $1\"; [ \"$1\" != b ] || die \"step $1 broke\"; false; echo \"end $1\"; }\n"
             "for s in a b; do run_step rc step $s; echo \"$s: $rc\"; done\necho done\n", tmp_path)
    assert r.returncode == 0
    assert r.stdout.split("\n") == ["start a", "a: 1", "start b", "b: 1", "done", ""]
    assert errors(r.stderr) == ["kvc: error: step.sh line 2: 'false' failed with status 1",
                                "kvc: error: step b broke"]


def test_no_error_mark_left_behind(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("kvc-error.*"))
    bash("false\n", tmp_path)
    bash("true\n", tmp_path)
    assert set(Path(tempfile.gettempdir()).glob("kvc-error.*")) <= before


# --- kmod/fetch.sh and kvc.sh without the network ------------------------------------------------
def fetch(*args: str, cache: Path, user: int | None = None, **env) -> subprocess.CompletedProcess:
    cmd = [str(KMOD / "fetch.sh"), *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KVC_CACHE": str(cache), "HOME": str(cache), **env})


@pytest.mark.parametrize("args", [[], ["--suite"], ["--bogus", "sparse"], ["--name", "../x", "sparse"],
                                  ["sparse;rm"]], ids=str)
def test_fetch_usage_errors_exit_2(args, tmp_path):
    r = fetch(*args, cache=tmp_path / "c")
    assert r.returncode == 2
    assert len(errors(r.stderr)) == 1 and "usage: kmod/fetch.sh" in r.stderr
    assert not (tmp_path / "c").exists()


def _etc_apt() -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in Path("/etc/apt").rglob("*")} if Path("/etc/apt").is_dir() else {}


def test_fetch_from_an_unreachable_archive_is_one_error_line(tmp_path, no_retries):
    apt_before = _etc_apt()
    r = fetch("--no-deps", "sparse", cache=tmp_path / "c", FETCH_MIRROR=DEAD_MIRROR, **no_retries)
    assert r.returncode == 1
    assert len(errors(r.stderr)) == 1
    assert DEAD_MIRROR in errors(r.stderr)[0] and "FETCH_MIRROR" in errors(r.stderr)[0]
    assert _etc_apt() == apt_before
    assert not list((tmp_path / "c" / "root").iterdir())  # nothing half-unpacked


def test_kvc_check_without_its_downloads_fails_with_reasons(tmp_path, no_retries):
    env = {**os.environ, "KVC_CACHE": str(tmp_path / "c"), "KVC_BUILD": str(tmp_path / "b"),
           "FETCH_MIRROR": DEAD_MIRROR, **no_retries}
    r = subprocess.run([str(KMOD / "kvc.sh"), "check"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1
    assert DEAD_MIRROR in errors(r.stderr)[0]
    for noise in ("command not found", "unbound variable", "syntax error", "No such file"):
        assert noise not in r.stderr


def test_kvc_unknown_command(tmp_path):
    r = subprocess.run([str(KMOD / "kvc.sh"), "frobnicate"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert len(errors(r.stderr)) == 1 and errors(r.stderr)[0].startswith("kvc: error: usage: kvc.sh driver|")


# --- kmod/fetch.sh against Debian's archive ------------------------------------------------------
@pytest.fixture(scope="module")
def fetched_patch(tmp_path_factory) -> tuple[Path, Path]:
    """Debian's `patch` (128 KB, libc only) fetched into a new cache: (cache, prefix)."""
    cache = tmp_path_factory.mktemp("fetch") / "cache"
    r = fetch("--no-deps", "patch", cache=cache)
    if r.returncode != 0 and ("could not read every package list" in r.stderr or "names no Debian archive" in r.stderr):
        pytest.skip(f"Debian's archive is out of reach: {errors(r.stderr)}")
    assert r.returncode == 0, r.stderr
    return cache, Path(r.stdout.strip())


def test_fetch_unpacks_a_working_tool_into_the_cache(fetched_patch):
    cache, prefix = fetched_patch
    assert prefix.parent == cache / "root"
    version = subprocess.run([str(prefix / "usr" / "bin" / "patch"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "GNU patch" in version.stdout
    assert [p.name for p in (cache / "debs").iterdir()] == (prefix / ".fetch-debs").read_text().split()


def test_fetch_again_runs_no_apt_and_no_network(fetched_patch, tmp_path):
    cache, prefix = fetched_patch
    no_apt = tmp_path / "bin"
    no_apt.mkdir()
    for tool in ("apt-get", "apt-cache"):  # would fail the run if it were called
        (no_apt / tool).write_text("#!/bin/sh\necho called >&2\nexit 99\n")
        (no_apt / tool).chmod(0o755)
    r = fetch("--no-deps", "patch", cache=cache, FETCH_MIRROR=DEAD_MIRROR, PATH=f"{no_apt}:{os.environ['PATH']}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(prefix) and r.stderr == ""


def test_two_fetches_racing_make_one_prefix(fetched_patch):
    cache, _ = fetched_patch
    env = {**os.environ, "KVC_CACHE": str(cache)}
    cmd = [str(KMOD / "fetch.sh"), "--name", "race", "--no-deps", "xz-utils"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(cache / "root" / "race")}
    assert sorted(p.name for p in (cache / "root").iterdir() if p.name.startswith(".")) == []  # no leftovers
    assert (cache / "root" / "race" / "usr" / "bin" / "xz").is_file()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to play another user")
def test_fetch_works_the_same_for_a_user_without_privileges(fetched_patch):
    cache, _ = fetched_patch
    user_cache = Path(tempfile.mkdtemp(prefix="kvc-nobody-"))
    try:
        os.chown(user_cache, 65534, 65534)
        shutil.copytree(cache / "apt", user_cache / "apt")  # the lists, to spare the archive a second read
        subprocess.run(["chown", "-R", "65534:65534", str(user_cache)], check=True)
        r = fetch("--no-deps", "patch", cache=user_cache, user=65534)
        assert r.returncode == 0, r.stderr
        prefix = Path(r.stdout.strip())
        assert prefix.stat().st_uid == 65534 and (prefix / "usr" / "bin" / "patch").is_file()
    finally:
        shutil.rmtree(user_cache)


def test_absolute_symlinks_into_the_set_become_relative(fetched_patch):
    """Debian's kernel headers link /lib/modules/<rel>/build -> /usr/src/linux-headers-<rel>: in the
    prefix that link must lead to the prefix's copy, wherever the prefix lies."""
    cache, _ = fetched_patch
    meta = fetch("--no-deps", "linux-headers-amd64", cache=cache)
    assert meta.returncode == 0, meta.stderr
    deb = cache / "debs" / (Path(meta.stdout.strip()) / ".fetch-debs").read_text().split()[0]
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True).stdout
    headers = depends.split()[0]  # linux-headers-<abi>-amd64
    r = fetch("--no-deps", headers, cache=cache)
    assert r.returncode == 0, r.stderr
    prefix = Path(r.stdout.strip())
    build = prefix / "lib" / "modules" / headers.removeprefix("linux-headers-") / "build"
    assert not os.readlink(build).startswith("/")
    assert build.resolve() == prefix / "usr" / "src" / headers
    assert (build / ".config").is_file()
