"""Command line: python -m pyvattn {info,demo,top,frag,serve} ...

The parsers are built without importing torch, so --help answers at once; a command imports what
it needs when it runs. Bad arguments are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .frag.models import MODELS, get_model
from .frag.traces import SHIPPED
from .units import parse_size

# The names of pyvattn.backends.backend_names() (which imports torch), plus "auto".
BACKENDS = ("auto", "uvm64k", "cuda-vmm", "host")
MODEL_NAMES = ", ".join(m.name.lower() for m in MODELS.values())
TRACE_NAMES = ", ".join(SHIPPED)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless it has none); descriptions keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``python -m pyvattn demo: error: ... (see --help)``, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types: each raises ArgumentTypeError naming what is wrong -------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def size(text: str) -> int:
    try:
        return parse_size(text, "size")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 65536, 64KiB, 2MiB, 1GiB)") from None


def page_size(text: str) -> int | str:
    if text == "auto":
        return text
    value = size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 bytes")
    return value


def device(text: str) -> str:
    if re.fullmatch(r"cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)")


def trace(text: str) -> str:
    if text in SHIPPED or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a shipped trace ({TRACE_NAMES}) nor a file")


def model(text: str):
    try:
        return get_model(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a known model ({MODEL_NAMES}) nor 'layers,kv_heads,head_dim'") from None


# --- the commands ------------------------------------------------------------------------------
def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda or cuda:N; default: cuda if torch sees a GPU, else cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    arg = p.add_argument
    arg("--trace", type=trace, default="arxiv", metavar="NAME", help=f"shipped trace ({TRACE_NAMES}) or a trace file")
    arg("--requests", type=positive_int, default=24, metavar="N", help="requests taken from the start of the trace")
    arg("--model", type=model, default="llama-3-8b", metavar="NAME",
        help=f"KV heads and head dim of this model ({MODEL_NAMES}; or 'layers,kv_heads,head_dim')")
    arg("--layers", type=positive_int, default=4, metavar="N",
        help="layers to allocate (fewer than the model's, so the demo runs in seconds)")
    arg("--max-batch", type=positive_int, default=16, metavar="N", help="request slots (most requests running at once)")
    arg("--max-seq-len", type=positive_int, default=32768, metavar="TOKENS", help="longest request, in tokens")
    arg("--page-size", type=page_size, default="auto", metavar="SIZE",
        help="bytes per page, e.g. 64KiB, 2MiB; auto: the backend's own (64 KiB on host)")
    arg("--budget", type=size, default="1GiB", metavar="SIZE", help="physical memory for K and V of every layer")
    arg("--device", type=device, default="cpu", metavar="DEVICE", help="cpu, cuda or cuda:N")
    arg("--backend", choices=BACKENDS, default="auto", help="where physical pages come from")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def add_top_arguments(p: argparse.ArgumentParser) -> None:
    arg = p.add_argument
    arg("--name", default=None, metavar="NAME", help="the SharedBudget to show; default: every one on this machine")
    arg("--once", action="store_true", help="print one frame and exit (for scripts)")
    arg("--interval", type=positive_seconds, default=1.0, metavar="S", help="seconds between frames")


def build_parser() -> Parser:
    parser = Parser(
        prog="python -m pyvattn",
        description="pyvattn: KV-cache memory for LLM serving, the vAttention way.",
        epilog="examples:\n"
               "  python -m pyvattn info              which backends run here, and which one auto picks\n"
               "  python -m pyvattn demo              KV tensors growing for requests of a real trace\n"
               "  python -m pyvattn top               processes sharing a SharedBudget, and their bytes\n"
               "  python -m pyvattn frag --help       memory wasted by allocation schemes on real traces\n"
               "  python -m pyvattn serve --help      a model served on pyvattn's continuous-batching engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_info_arguments(sub.add_parser(
        "info", help="backends available here and what backend='auto' picks",
        description="Which backends can run here, which one backend='auto' picks, and why."))
    add_demo_arguments(sub.add_parser(
        "demo", help="KV tensors growing for a batch of requests from a real trace",
        description="Admits requests from a real trace into a KVCache, prefills and decodes them, and\n"
                    "prints where the memory goes (legend in the output). Every K/V value is written and\n"
                    "read back. The same requests under static reservation are shown side by side."))
    add_top_arguments(sub.add_parser(
        "top", help="the SharedBudget ledgers, live: bytes each process's caches use, retain and charge",
        description="The SharedBudget ledgers in /dev/shm (or $PYVATTN_BUDGET_DIR), refreshed every\n"
                    "--interval seconds until Ctrl-C: for each account its process, label, and bytes\n"
                    "used / retained / charged; for each budget its limit and headroom. Processes that\n"
                    "exited are marked; their share returns to the budget at the next charge that needs it."))
    sub.add_parser("frag", add_help=False, help="fragmentation of allocation schemes on request traces (frag --help)")
    sub.add_parser("serve", add_help=False, help="a model served by pyvattn's continuous-batching engine "
                                                 "(serve --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "frag":  # the fragmentation tool has its own parser
        from .frag.cli import main as frag_main

        return frag_main(argv[1:])
    if argv and argv[0] == "serve":  # its own parser too: `serve --help` imports no torch
        from .serve import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import collect, render

        facts = collect(args.device)
        print(json.dumps(facts, indent=2) if args.json else render(facts))
        return 0
    if args.command == "top":
        from .budget.top import main as top_main

        return top_main(args.name, args.once, args.interval)
    from .demo import run

    try:
        return run(args)
    except KeyboardInterrupt:  # the cache is closed on the way out
        print("python -m pyvattn demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
