"""``python -m pyvattn top``: the SharedBudget ledgers of this machine, live."""

from __future__ import annotations

import sys
import time

from ..errors import LedgerError, LedgerNotFound
from ..units import format_size
from .shared import SharedBudget, ledger_dir, ledger_names, ledger_path


def render(budget: SharedBudget) -> str:
    """One ledger as a table: each account's process, label and bytes, then the totals."""
    rows = budget.rows()
    limit, used = budget.limit, sum(r.charged for r in rows)
    head = (f"budget {budget.name}: limit {'none' if limit is None else format_size(limit)}, "
            f"charged {format_size(used)}, headroom "
            f"{'unlimited' if limit is None else format_size(max(0, limit - used))}  ({budget.path})")
    lines = [head, f"{'PID':>8}  {'ACCOUNT':<24}{'USED':>12}{'RETAINED':>12}{'CHARGED':>12}"]
    for r in sorted(rows, key=lambda r: (r.pid, r.label)):
        label = r.label if r.alive else f"{r.label} (exited)"
        lines.append(f"{r.pid:>8}  {label:<24}{format_size(r.used):>12}{format_size(r.retained):>12}"
                     f"{format_size(r.charged):>12}")
    if not rows:
        lines.append(f"{'':>8}  (no accounts)")
    return "\n".join(lines)


class Top:
    """The frames of ``top``: the ledger ``name``, or every ledger on the machine when ``None``."""

    def __init__(self, name: str | None):
        self.name = name
        self._open: dict[str, SharedBudget] = {}
        if name is not None:
            self._open[name] = SharedBudget(name, create=False)  # LedgerNotFound / LedgerCorrupt

    def frame(self) -> str:
        names = [self.name] if self.name is not None else ledger_names()
        parts = []
        for name in names:
            try:
                if name not in self._open:
                    self._open[name] = SharedBudget(name, create=False)
                parts.append(render(self._open[name]))
            except LedgerError as exc:
                parts.append(f"budget {name}: {exc}")
        return "\n\n".join(parts) if parts else f"no pyvattn budgets in {ledger_dir()}"

    def close(self) -> None:
        for budget in self._open.values():
            budget.close()


def main(name: str | None, once: bool, interval: float) -> int:
    prog = "python -m pyvattn top"
    try:
        top = Top(name)
    except LedgerNotFound:
        here = ", ".join(ledger_names()) or "none"
        print(f"{prog}: error: no budget named {name!r} ({ledger_path(name)}); budgets here: {here}", file=sys.stderr)
        return 2
    except (LedgerError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    live = not once and sys.stdout.isatty()
    try:
        while True:
            text = top.frame()
            print(("\x1b[H\x1b[J" if live else "") + text + ("" if live or once else "\n"), flush=True)
            if once:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 130
    finally:
        top.close()
