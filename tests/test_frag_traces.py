"""Trace loading: columns found by name in a user's CSV, and the shipped Mooncake subsample."""

from __future__ import annotations

import pytest

from pyvattn.frag.traces import SHIPPED, Request, load_trace, trace_path


def test_user_csv_columns_found_by_name_case_and_spacing_ignored(tmp_path):
    burst = tmp_path / "burstgpt.csv"  # BurstGPT's header: seconds since start, spaced names
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "5,ChatGPT,472,18,490,Conversation log\n7.5,GPT-4,1087,230,1317,API log\n")
    assert list(load_trace(burst)) == [Request(472, 18, 0.0), Request(1087, 230, 2.5)]
    openai = tmp_path / "usage.csv"
    openai.write_text("id,Input_Tokens,completion_tokens,timestamp_ms\na,10,3,1000\nb,20,4,1500\n")
    assert list(load_trace(openai)) == [Request(10, 3, 0.0), Request(20, 4, 0.5)]
    dated = tmp_path / "dated.csv"
    dated.write_text("arrival_time,prompt_len,output_len\n2024-03-31 00:59:59,1,2\n2024-03-31 01:00:01.25,3,4\n")
    assert [r.arrival_s for r in load_trace(dated)] == [0.0, 2.25]


def test_bad_user_csv_values_name_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt_tokens,output_tokens\n5,6\n5.5,6\n")
    with pytest.raises(ValueError, match=r"bad.csv:3"):
        load_trace(bad)
    when = tmp_path / "when.csv"
    when.write_text("timestamp,prompt_tokens,output_tokens\nyesterday,1,1\n")
    with pytest.raises(ValueError, match=r"when.csv:2: timestamp='yesterday' is neither a number of seconds nor a date-time"):
        load_trace(when)


def test_shipped_mooncake_subsample_and_license_notices():
    moon = load_trace("mooncake")
    assert len(moon) == 2000
    assert moon[0] == Request(6758, 500, 0.0)  # the first record of Mooncake's conversation trace
    assert moon[-1].arrival_s == pytest.approx(669.0)
    notices = (trace_path("arxiv").parent / "LICENSES.md").read_text()
    for name in SHIPPED.values():
        assert name in notices, name
