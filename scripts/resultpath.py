"""Where a benchmark writes its JSON: a git-ignored folder unless the committed results are asked for.

``add_output_arguments(parser, "bench_x")`` gives a script ``--save`` (write
``benchmarks/results/bench_x.json``, the committed results) and ``--out PATH`` (default
``bench-results/bench_x.json``, git-ignored); ``args.out`` is then the path to write. Paths are
relative to the repository, whatever the working directory. No torch import: scripts that only
parse arguments stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "benchmarks" / "results"
LOCAL = REPO / "bench-results"


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Add the mutually exclusive ``--save`` / ``--out`` pair for ``name.json``."""
    where = parser.add_mutually_exclusive_group()
    committed = COMMITTED / f"{name}.json"
    where.add_argument("--save", action="store_const", dest="out", const=str(committed),
                       help=f"write the committed results, {committed.relative_to(REPO)}")
    where.add_argument("--out", default=str(LOCAL / f"{name}.json"),
                       help=f"JSON file to write (default: bench-results/{name}.json, git-ignored)")
    # both write `out`: argparse takes the default of the first one added (--save's None) otherwise
    parser.set_defaults(out=str(LOCAL / f"{name}.json"))
