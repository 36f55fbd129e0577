"""Command line: ``python -m pyvattn {info,demo,frag,serve} ...``."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "frag":  # the fragmentation tool has its own parser
        from .frag.cli import main as frag_main

        return frag_main(argv[1:])
    if argv and argv[0] == "serve":  # its own parser too: `serve --help` imports no torch
        from .serve import main as serve_main

        return serve_main(argv[1:])

    parser = argparse.ArgumentParser(prog="python -m pyvattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="backends available here and what backend='auto' picks")
    p_info.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if visible)")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_demo = sub.add_parser("demo", help="KV tensors growing for a batch of requests from a real trace")
    from .demo import add_arguments

    add_arguments(p_demo)
    sub.add_parser("frag", help="fragmentation comparison on request traces (see `frag --help`)")
    sub.add_parser("serve", help="a model served by pyvattn's continuous-batching engine (see `serve --help`)")
    args = parser.parse_args(argv)

    if args.command == "info":
        from .info import collect, render

        facts = collect(args.device)
        print(json.dumps(facts, indent=2) if args.json else render(facts))
        return 0
    from .demo import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
