"""Request-length traces: the formats of the public traces, the ones shipped with pyvattn, and a
seeded synthetic generator.

Every loader returns a :class:`Trace` (token counts and arrival times as numpy arrays, in trace
order). Shipped traces (see ``pyvattn/data/traces/LICENSES.md`` for origin and license): ``arxiv``,
``sharegpt``, ``azure-conv``, ``azure-code``, ``mooncake`` (the first 2,000 requests of Mooncake's
conversation trace). ``synthetic:N`` (or ``synthetic:N:SEED``) generates N requests in memory (see
:func:`synthetic_trace`). Any path is accepted too: vAttention/Sarathi CSVs
(``num_prefill_tokens, num_decode_tokens``), Azure LLM inference CSVs (``TIMESTAMP, ContextTokens,
GeneratedTokens``), Vidur CSVs (``arrived_at, num_prefill_tokens, num_decode_tokens``), Mooncake
JSONL (``timestamp`` in ms, ``input_length``, ``output_length``), or a CSV of your own: its columns
are found by name (case and spacing ignored), e.g. ``prompt_tokens``/``input_tokens``/``Request
tokens`` and ``output_tokens``/``completion_tokens``/``Response tokens``, with an optional arrival
column (``arrival_s``, ``timestamp`` in seconds or as a date-time, ``timestamp_ms``).

Every value is checked: a token count is a finite whole number >= 0 (``7564.0`` is accepted, as
Sarathi writes it; ``12.7``, ``-1``, ``true``, ``inf`` and ``nan`` are not), an arrival time is a
finite number or a date-time, present on every row or on none. A bad value raises
:class:`TraceError` naming ``file:line``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np

SHIPPED = {
    "arxiv": "arxiv_sample.csv",
    "sharegpt": "sharegpt_8k_stats_llama2.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "mooncake": "mooncake_conversation_first2000.jsonl",
}
SYNTHETIC = "synthetic"

# Column names by role, normalised (lower case, letters and digits only); first match wins.
_PROMPT_COLUMNS = ("numprefilltokens", "contexttokens", "prompttokens", "inputlength", "inputtokens",
                   "requesttokens", "prefilltokens", "promptlength", "promptlen", "inputlen",
                   "numprompttokens", "numinputtokens")
_OUTPUT_COLUMNS = ("numdecodetokens", "generatedtokens", "outputtokens", "outputlength",
                   "completiontokens", "responsetokens", "decodetokens", "outputlen", "numoutputtokens",
                   "numgeneratedtokens", "numcompletiontokens")
# arrival column -> unit; "auto" is seconds if numeric, else an ISO date-time
_ARRIVAL_COLUMNS = {"arrivedat": "s", "arrivals": "s", "arrivaltime": "auto", "timestamp": "auto",
                    "timestamps": "s", "timestampms": "ms", "arrivalms": "ms"}


class TraceError(ValueError):
    """A trace that cannot be read; the message starts with ``file:line:`` where a line is at fault."""


@dataclass(frozen=True)
class Request:
    """One request: prompt (prefill) tokens, output (decode) tokens, arrival time if known."""

    prompt_tokens: int
    output_tokens: int
    arrival_s: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


class Trace:
    """Requests as arrays (int64 token counts; float64 arrival seconds from the first request, or
    None when the trace has no timestamps). A sequence of :class:`Request`: ``len``, iteration,
    ``trace[i]``, and ``trace[a:b]`` (a Trace)."""

    def __init__(self, name: str, prompt, output, arrival_s=None):
        self.name = name
        self.prompt = np.asarray(prompt, dtype=np.int64)
        self.output = np.asarray(output, dtype=np.int64)
        self.arrival_s = None if arrival_s is None else np.asarray(arrival_s, dtype=np.float64)
        if self.prompt.shape != self.output.shape or (self.arrival_s is not None
                                                      and self.arrival_s.shape != self.prompt.shape):
            raise ValueError("prompt, output and arrival_s must have one entry per request")

    @classmethod
    def from_requests(cls, name: str, requests) -> "Trace":
        """A trace of ``requests`` (:class:`Request` objects; arrival times on all or none)."""
        requests = list(requests)
        times = [r.arrival_s for r in requests]
        has_times = bool(requests) and all(t is not None for t in times)
        return cls(name, [r.prompt_tokens for r in requests], [r.output_tokens for r in requests],
                   times if has_times else None)

    @property
    def total(self) -> np.ndarray:
        return self.prompt + self.output

    @property
    def basename(self) -> str:
        """The trace's name without directories (what titles and file names show)."""
        return Path(self.name).name if self.name not in SHIPPED else self.name

    def __len__(self) -> int:
        return len(self.prompt)

    def __getitem__(self, index):
        if isinstance(index, slice):
            arrival = None if self.arrival_s is None else self.arrival_s[index]
            return Trace(self.name, self.prompt[index], self.output[index], arrival)
        arrival = None if self.arrival_s is None else float(self.arrival_s[index])
        return Request(int(self.prompt[index]), int(self.output[index]), arrival)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (Trace, list, tuple)) else NotImplemented

    def __repr__(self) -> str:
        return f"Trace({self.name!r}, {len(self)} requests{', timed' if self.arrival_s is not None else ''})"


def trace_path(name: str | Path) -> Path:
    """The file behind a shipped trace name, or ``name`` itself if it is an existing path."""
    if str(name) in SHIPPED:
        return Path(str(resources.files("pyvattn") / "data" / "traces" / SHIPPED[str(name)]))
    path = Path(name)
    if not path.is_file():
        raise TraceError(f"trace={str(name)!r} is neither a shipped trace {sorted(SHIPPED)}, "
                         f"'{SYNTHETIC}:N[:SEED]', nor a file")
    return path


def load_trace(name: str | Path, limit: int | None = None) -> Trace:
    """Requests of a shipped trace, a synthetic spec or a trace file, in order; the first ``limit``
    of them. Requests with no tokens at all are dropped."""
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"--requests={limit} must be >= 1")
    if str(name).startswith(SYNTHETIC + ":"):
        trace = _synthetic_from_spec(str(name))
    else:
        path = trace_path(name)
        try:
            trace = _load_jsonl(path, str(name)) if path.suffix == ".jsonl" else _load_csv(path, str(name))
        except UnicodeDecodeError as exc:
            line, column = _first_non_utf8(path)
            raise TraceError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {column} of the line)") from None
    keep = trace.total > 0
    if not keep.all():
        trace = Trace(trace.name, trace.prompt[keep], trace.output[keep],
                      None if trace.arrival_s is None else trace.arrival_s[keep])
    if not len(trace):
        raise TraceError(f"trace={str(name)!r}: no requests with tokens")
    return trace[:limit] if limit else trace


def _first_non_utf8(path: Path) -> tuple[int, int]:
    """Line number and byte offset in that line of the first byte that is not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, exc.start
    return 0, 0


def synthetic_trace(n: int, seed: int = 0, rate_per_s: float = 20.0) -> Trace:
    """``n`` requests drawn from log-normal length distributions shaped like ShareGPT's (median
    prompt ~1,700 tokens, output ~400; prompt clipped to 1..7,000, output to 1..1,000, so a request
    fits an 8K context) with Poisson arrivals at ``rate_per_s``. Same ``seed``, same trace."""
    if n < 1:
        raise ValueError(f"synthetic trace: N={n} must be >= 1")
    rng = np.random.default_rng(seed)
    prompt = np.clip(np.rint(rng.lognormal(np.log(1700), 0.9, n)), 1, 7000).astype(np.int64)
    output = np.clip(np.rint(rng.lognormal(np.log(400), 0.8, n)), 1, 1000).astype(np.int64)
    arrival = np.cumsum(rng.exponential(1.0 / rate_per_s, n))
    return Trace(f"{SYNTHETIC}:{n}:{seed}", prompt, output, arrival - arrival[0])


def _synthetic_from_spec(spec: str) -> Trace:
    parts = spec.split(":")[1:]
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise TraceError(f"trace={spec!r}: write '{SYNTHETIC}:N' or '{SYNTHETIC}:N:SEED' (whole numbers)")
    return synthetic_trace(int(parts[0]), int(parts[1]) if len(parts) == 2 else 0)


def _count(value, where: str, what: str) -> int:
    """A token count from a CSV cell (text) or a JSON value: a finite whole number >= 0."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise TraceError(f"{where}: {what}={value!r} is not a number") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        raise TraceError(f"{where}: {what}={value!r} is not a number")
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise TraceError(f"{where}: {what}={value!r} is not a whole token count >= 0")
    return int(number)


def _normalise(column: str) -> str:
    return "".join(c for c in column.lower() if c.isalnum())


def _find_column(cols: list[str], names) -> str | None:
    by_name = {_normalise(c): c for c in cols}
    return next((by_name[n] for n in names if n in by_name), None)


def _load_csv(path: Path, name: str) -> Trace:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        cols = next(reader, None) or []
        p_col, o_col = _find_column(cols, _PROMPT_COLUMNS), _find_column(cols, _OUTPUT_COLUMNS)
        if p_col is None or o_col is None:
            raise TraceError(f"{path}:1: columns {cols} name no prompt and output token counts "
                             f"(expected e.g. num_prefill_tokens,num_decode_tokens or prompt_tokens,output_tokens)")
        a_col = _find_column(cols, _ARRIVAL_COLUMNS)
        unit = _ARRIVAL_COLUMNS[_normalise(a_col)] if a_col else None
        p_i, o_i = cols.index(p_col), cols.index(o_col)
        a_i = cols.index(a_col) if a_col else None
        width = max(p_i, o_i, a_i if a_i is not None else 0) + 1
        prompt, output, arrival = [], [], []
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            where = f"{path}:{line}"
            if len(row) < width:
                raise TraceError(f"{where}: {len(row)} fields, the header has {len(cols)}")
            prompt.append(_count(row[p_i], where, p_col))
            output.append(_count(row[o_i], where, o_col))
            if a_i is not None:
                arrival.append(_seconds(row[a_i], unit, where, a_col))
    return Trace(name, prompt, output, _from_first(arrival) if a_i is not None else None)


def _seconds(text: str, unit: str, where: str, column: str) -> float:
    """An arrival time in seconds (relative values only matter)."""
    if not text.strip():
        raise TraceError(f"{where}: {column} is empty (arrival times must be on every row or none)")
    if unit == "auto":
        try:
            value = float(text)
        except ValueError:
            return _datetime_seconds(text, where, column)
    else:
        try:
            value = float(text) / (1000.0 if unit == "ms" else 1.0)
        except ValueError:
            raise TraceError(f"{where}: {column}={text!r} is not a number of {unit}") from None
    if not math.isfinite(value):
        raise TraceError(f"{where}: {column}={text!r} is not a finite arrival time")
    return value


def _datetime_seconds(text: str, where: str, column: str) -> float:
    head, _, frac = text.strip().partition(".")  # Azure: "2023-11-16 18:17:03.9799600" (7 digits)
    try:
        if frac and not frac.isdigit():
            raise ValueError(frac)
        when = datetime.fromisoformat(head)
    except ValueError:
        raise TraceError(f"{where}: {column}={text!r} is neither a number of seconds nor a date-time") from None
    fraction = float("0." + (frac or "0"))
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)  # not local time: no DST jumps
    return when.timestamp() + fraction


def _from_first(arrival: list[float]) -> np.ndarray:
    times = np.asarray(arrival, dtype=np.float64)
    return times - times[0] if len(times) else times


def _load_jsonl(path: Path, name: str) -> Trace:
    prompt, output, arrival = [], [], []
    timed = None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line, parse_constant=lambda c: c)  # NaN/Infinity kept as text
            except ValueError as exc:
                raise TraceError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "input_length" not in row or "output_length" not in row:
                raise TraceError(f"{where}: not a Mooncake record (needs input_length and output_length)")
            prompt.append(_count(row["input_length"], where, "input_length"))
            output.append(_count(row["output_length"], where, "output_length"))
            if timed is None:
                timed = "timestamp" in row
            if timed != ("timestamp" in row):
                raise TraceError(f"{where}: timestamp must be on every record or none")
            if timed:
                stamp = row["timestamp"]
                if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp):
                    raise TraceError(f"{where}: timestamp={stamp!r} is not a finite number of milliseconds")
                arrival.append(stamp / 1000.0)
    return Trace(name, prompt, output, _from_first(arrival) if timed else None)
