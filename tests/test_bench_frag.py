"""scripts/bench_frag.py: git-ignored output unless --save, input errors exit 2, a small run's JSON."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_frag  # noqa: E402
import resultpath  # noqa: E402


def test_default_output_is_not_the_committed_results():
    assert Path(bench_frag.build_parser().parse_args([]).out) == resultpath.LOCAL / "bench_frag.json"
    assert Path(bench_frag.build_parser().parse_args(["--save"]).out) == resultpath.COMMITTED / "bench_frag.json"


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPTS / "bench_frag.py"), *argv], capture_output=True, text=True,
                          timeout=300)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = ((["--trace", "synthetic:x"], "synthetic"), (["--trace", str(tmp_path / "none.csv")], "none.csv"),
             (["--model", "gpt-9"], "gpt-9"), (["--jobs", "0"], "--jobs"), (["--budget-gib", "-1"], "--budget-gib"))
    for argv, words in cases:
        done = run(*argv, "--out", str(tmp_path / "x.json"))
        assert done.returncode == 2, (argv, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr, (argv, done.stderr)
    assert not (tmp_path / "x.json").exists()


def test_a_small_run_writes_its_json(tmp_path):
    out = tmp_path / "frag.json"
    done = run("--trace", "synthetic:300", "--jobs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    (row,) = doc["runs"]
    assert row["requests"] == 300 and row["schemes"] == 12 and row["served"] == 300 and row["steps"] > 0
    assert row["cpu_s"] > 0 and len(doc["machine"]["load_average_before"]) == 3
