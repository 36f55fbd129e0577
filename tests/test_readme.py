"""README.md as a new user meets it: its Python runs as written, on CPU, and its prerequisites are
the ones `make` checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


def test_readme_has_python_to_run():
    assert PYTHON_BLOCKS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs_as_written_on_cpu(index, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a GPU machine runs it as a CPU-only one would
    r = subprocess.run([sys.executable, "-c", PYTHON_BLOCKS[index]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README python block {index + 1}:\n{r.stderr}"


def _prerequisites() -> list[str]:
    lines = (ROOT / ".ci" / "apt-prerequisites").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_readme_names_the_prerequisites_make_checks():
    install = re.search(r"sudo apt-get install ([^\n`]+)", README)
    assert install, "README: no apt-get install line"
    assert install.group(1).split() == _prerequisites()


def _fake_path(tmp_path: Path, *tools: str) -> str:
    """A PATH holding only ``tools`` (links to this machine's), to play a machine that lacks the rest."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        assert real, tool
        (bin_dir / tool).symlink_to(real)
    return str(bin_dir)


def prereqs(python: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "prereqs.sh"), python], capture_output=True, text=True, **kw)


def fake_python(tmp_path: Path, preamble: str) -> str:
    """This Python, made to look otherwise by ``preamble`` before it runs ``-c CODE``."""
    python = tmp_path / "python3"
    python.write_text(f"#!{sys.executable}\nimport sys\n{preamble}\nexec(sys.argv[2])\n")
    python.chmod(0o755)
    return str(python)


def test_prereqs_pass_here():
    r = prereqs(sys.executable)
    assert r.returncode == 0, r.stderr


def test_prereqs_name_a_missing_compiler(tmp_path):
    r = prereqs(sys.executable, env={"PATH": _fake_path(tmp_path, "grep", "dirname")})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "make: missing prerequisite gcc (no C compiler: the tests and the driver check compile C); "
        "on Debian or Ubuntu: sudo apt-get install gcc"]


def test_prereqs_name_a_python_without_venv(tmp_path):
    # as on Debian without python3-venv: no ensurepip
    r = prereqs(fake_python(tmp_path, "sys.modules['ensurepip'] = None"))
    assert r.returncode == 1
    assert "missing prerequisite python3-venv" in r.stderr and "apt-get install python3-venv" in r.stderr


def test_prereqs_name_an_old_python(tmp_path):
    r = prereqs(fake_python(tmp_path, "sys.version_info = (3, 8, 10)\nsys.version = '3.8.10'"))
    assert r.returncode == 1
    assert "3.8.10" in r.stderr and "Python 3.10 or newer" in r.stderr
