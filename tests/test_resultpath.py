"""Benchmarks write git-ignored output unless asked for the committed results (scripts/resultpath.py)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import resultpath  # noqa: E402


def parse(*argv):
    ap = argparse.ArgumentParser()
    resultpath.add_output_arguments(ap, "bench_x")
    return ap.parse_args(list(argv)).out


def test_default_is_the_ignored_folder():
    assert Path(parse()) == resultpath.LOCAL / "bench_x.json"


def test_save_writes_the_committed_results():
    assert Path(parse("--save")) == resultpath.COMMITTED / "bench_x.json"


def test_out_names_any_path(tmp_path):
    assert parse("--out", str(tmp_path / "a.json")) == str(tmp_path / "a.json")
