"""Request-length traces: the formats of the public traces, and the ones shipped with pyvattn.

Every loader returns a list of :class:`Request` in trace order. Shipped traces (see
``pyvattn/data/traces/LICENSES.md`` for origin and license): ``arxiv``, ``sharegpt``,
``azure-conv``, ``azure-code``, ``mooncake`` (the first 2,000 requests of Mooncake's conversation
trace). Any path is accepted too: vAttention/Sarathi CSVs (``num_prefill_tokens,
num_decode_tokens``), Azure LLM inference CSVs (``TIMESTAMP, ContextTokens, GeneratedTokens``),
Vidur CSVs (``arrived_at, num_prefill_tokens, num_decode_tokens``), Mooncake JSONL (``timestamp``
in ms, ``input_length``, ``output_length``), or a CSV of your own: its columns are found by name
(case and spacing ignored), e.g. ``prompt_tokens``/``input_tokens``/``Request tokens`` and
``output_tokens``/``completion_tokens``/``Response tokens``, with an optional arrival column
(``arrival_s``, ``timestamp`` in seconds or as a date-time, ``timestamp_ms``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

SHIPPED = {
    "arxiv": "arxiv_sample.csv",
    "sharegpt": "sharegpt_8k_stats_llama2.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "mooncake": "mooncake_conversation_first2000.jsonl",
}

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


@dataclass(frozen=True)
class Request:
    """One request: prompt (prefill) tokens, output (decode) tokens, arrival time if known."""

    prompt_tokens: int
    output_tokens: int
    arrival_s: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def trace_path(name: str | Path) -> Path:
    """The file behind a shipped trace name, or ``name`` itself if it is an existing path."""
    if str(name) in SHIPPED:
        return Path(str(resources.files("pyvattn") / "data" / "traces" / SHIPPED[str(name)]))
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"trace={str(name)!r} is neither a shipped trace {sorted(SHIPPED)} nor a file")
    return path


def load_trace(name: str | Path, limit: int | None = None) -> list[Request]:
    """Requests of a shipped trace or a trace file, in order; at most ``limit`` of them."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1")
    path = trace_path(name)
    rows = _load_jsonl(path) if path.suffix == ".jsonl" else _load_csv(path)
    requests = [r for r in rows if r.total_tokens > 0]
    if not requests:
        raise ValueError(f"trace={str(name)!r}: no requests with tokens in {path}")
    return requests[:limit] if limit else requests


def _number(text: str, path: Path, line: int) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}:{line}: {text!r} is not a token count") from None
    if value < 0 or value != int(value):
        raise ValueError(f"{path}:{line}: {text!r} is not a non-negative whole token count")
    return int(value)


def _normalise(column: str) -> str:
    return "".join(c for c in column.lower() if c.isalnum())


def _find_column(cols: list[str], names) -> str | None:
    by_name = {_normalise(c): c for c in cols}
    return next((by_name[n] for n in names if n in by_name), None)


def _load_csv(path: Path) -> list[Request]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        p_col, o_col = _find_column(cols, _PROMPT_COLUMNS), _find_column(cols, _OUTPUT_COLUMNS)
        if p_col is None or o_col is None:
            raise ValueError(f"trace {path}: columns {cols} name no prompt and output token counts "
                             f"(expected e.g. num_prefill_tokens,num_decode_tokens or "
                             f"prompt_tokens,output_tokens)")
        a_col = _find_column(cols, _ARRIVAL_COLUMNS)
        unit = _ARRIVAL_COLUMNS[_normalise(a_col)] if a_col else "s"
        out, t0 = [], None
        for line, row in enumerate(reader, start=2):
            arrival = None
            if a_col and row[a_col]:
                arrival = _seconds(row[a_col], unit)
                t0 = arrival if t0 is None else t0
                arrival -= t0
            out.append(Request(_number(row[p_col], path, line), _number(row[o_col], path, line), arrival))
    return out


def _seconds(text: str, unit: str) -> float:
    if unit == "auto":
        try:
            return float(text)
        except ValueError:
            unit = "datetime"
    if unit == "datetime":  # Azure: "2023-11-16 18:17:03.9799600" (7 fractional digits)
        head, _, frac = text.strip().partition(".")
        try:
            when = datetime.fromisoformat(head)
            when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)  # not local time: no DST jumps
            return when.timestamp() + float("0." + (frac or "0"))
        except ValueError:
            raise ValueError(f"arrival time {text!r} is neither a number of seconds nor a date-time") from None
    return float(text) / (1000.0 if unit == "ms" else 1.0)


def _load_jsonl(path: Path) -> list[Request]:
    out, t0 = [], None
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, output = int(row["input_length"]), int(row["output_length"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: not a Mooncake record ({exc})") from None
            arrival = float(row["timestamp"]) / 1000.0 if "timestamp" in row else None
            if arrival is not None:
                t0 = arrival if t0 is None else t0
                arrival -= t0
            out.append(Request(prompt, output, arrival))
    return out
