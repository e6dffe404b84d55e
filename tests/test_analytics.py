"""Analytics from a small hand-made log: every figure equals the value computed by hand."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest

from studio.telemetry import analytics
from studio.telemetry.analytics import Filters, LogReader, export_csv, report, storage_warning
from studio.ui import analytics_tab


def _at(hh_mm: str) -> str:
    return f"2026-01-05T{hh_mm}:00.000Z"


CHAT = {"client": "rest", "endpoint": "rest:/generate/text", "modality": "chat", "model": "tiny-llama"}
IMAGE = {"client": "ui", "endpoint": "ui:image", "modality": "image", "model": "tiny-sd", "images": 1}
ROWS = [
    *({**CHAT, "ts": _at(f"10:0{i}"), "status": "ok", "latency_ms": 100.0 * (i + 1), "ttft_ms": 50.0 + 10 * i,
       "prompt_tokens": 5, "completion_tokens": 11, "cache": "load" if i == 0 else "hit"} for i in range(5)),
    {**CHAT, "ts": _at("10:05"), "status": "error", "error_type": "ValueError", "latency_ms": 10.0, "cache": "hit"},
    {**CHAT, "ts": _at("10:06"), "status": "stopped", "latency_ms": 700.0},
    {**IMAGE, "ts": _at("11:00"), "status": "ok", "latency_ms": 1000.0, "adapters": {"pixel": 0.8}, "cache": "load"},
    {**IMAGE, "ts": _at("11:30"), "status": "ok", "latency_ms": 3000.0, "adapters": {"pixel": 0.6, "ink": 1.0},
     "cache": "hit"},
    {**IMAGE, "ts": _at("11:45"), "status": "error", "error_type": "CacheBusy", "latency_ms": 5.0},
]
EVENTS = [
    {"ts": _at("09:59"), "event": "load", "model": "tiny-llama", "seconds": 1.5},
    {"ts": _at("10:59"), "event": "load", "model": "tiny-sd", "seconds": 2.5},
    {"ts": _at("10:59"), "event": "evict", "model": "tiny-llama"},
    {"ts": _at("11:29"), "event": "load", "model": "tiny-sd", "seconds": 3.5},
]


@pytest.fixture
def folder(tmp_path) -> Path:
    """The log folder: rows written by hand (older rows lack columns), with one row torn by a crash."""
    lines = [json.dumps(row) for row in ROWS]
    lines.insert(7, '{"ts": "2026-01-05T10:07:00.000Z", "client": "ap')
    (tmp_path / "requests-2026-01-05.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "cache-2026-01-05.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    return tmp_path


def test_aggregates_equal_hand_computed_values(folder):
    logs = LogReader(folder).read()
    assert (len(logs.requests), len(logs.cache), logs.partial) == (10, 4, 1)
    result = report(logs)

    assert result.totals == pytest.approx({
        "requests": 10, "ok": 7, "errors": 2, "stopped": 1, "error_rate": 0.2, "models": 2,
        "p50_ms": 400.0, "p95_ms": 2400.0,  # ok latencies 100..500, 1000, 3000: rank 3 and 5.7 of 0..6
        "cache_hit_rate": 0.75, "loads": 3, "evictions": 1,
        # each modality's own totals (studio.modalities), over its successful requests
        "replies": 5, "tokens in": 25, "tokens out": 55, "clips": 0, "audio seconds": 0.0, "images": 2,
        "3D meshes": 0,
    })
    latency = result.tables["latency"]
    assert latency.loc["tiny-llama"].tolist() == [5, 300.0, 480.0, 496.0]
    assert latency.loc["tiny-sd"].tolist() == [2, 2000.0, 2900.0, 2980.0]

    chat = result.tables["chat"].loc["tiny-llama"]
    assert (chat["ttft_p50_ms"], chat["ttft_p95_ms"], chat["completion_tokens"]) == (70.0, 88.0, 55)
    assert chat["tokens_per_s"] == pytest.approx(10 / 0.23)  # median of 10 tokens / (latency - ttft)
    assert list(result.tables["chat"].index) == ["tiny-llama"]

    errors = result.tables["errors"]
    assert errors.loc["tiny-llama"].tolist() == [7, 1, pytest.approx(1 / 7)]
    assert errors.loc["tiny-sd"].tolist() == [3, 1, pytest.approx(1 / 3)]
    assert result.tables["error_types"]["errors"].to_dict() == {"ValueError": 1, "CacheBusy": 1}

    cache = result.tables["cache"]
    assert cache.loc["tiny-llama", ["hits", "waited_for_load", "loads", "failed_loads", "evictions"]].tolist() == [
        5, 1, 1, 0, 1]
    assert cache.loc["tiny-sd", ["hits", "waited_for_load", "loads", "evictions"]].tolist() == [1, 1, 2, 0]
    assert cache.loc["tiny-sd", "mean_load_s"] == 3.0

    adapters = result.tables["adapters"]
    assert adapters.index.tolist() == ["pixel", "ink"]
    assert adapters["uses"].tolist() == [2, 1] and adapters["mean_weight"].tolist() == pytest.approx([0.7, 1.0])

    hourly = analytics.requests_over_time(result.rows, "1h")
    assert [(t.hour, m, n) for t, m, n in hourly[["time", "model", "requests"]].itertuples(index=False)] == [
        (10, "tiny-llama", 7), (11, "tiny-sd", 3)]

    latency_bars = {trace.name: trace.y for trace in result.figures["latency"].data}
    assert latency_bars["p95"] == pytest.approx([480.0, 2900.0])
    assert set(result.figures) == set(analytics.FIGURES)


def test_filters(folder):
    logs = LogReader(folder).read()
    images = report(logs, Filters(modalities=("image",)))
    assert images.totals["requests"] == 3 and images.totals["loads"] == 2 and images.totals["evictions"] == 0
    assert report(logs, Filters(models=("tiny-llama",))).totals["requests"] == 7
    window = Filters(start=datetime(2026, 1, 5, 10, 0, tzinfo=timezone.utc),
                     end=datetime(2026, 1, 5, 10, 3, tzinfo=timezone.utc))
    assert report(logs, window).rows["latency_ms"].tolist() == [100.0, 200.0, 300.0]
    assert report(LogReader(folder).read(window.start, window.end), window).totals["requests"] == 3


def test_empty_logs_give_an_empty_state(tmp_path):
    result = report(LogReader(tmp_path).read())
    assert result.totals["requests"] == 0 and result.totals["error_rate"] is None
    assert all(fig.layout.annotations[0].text == "No data for this selection" for fig in result.figures.values())
    out = analytics_tab.render(LogReader(tmp_path), "Last 24 hours", None, None, None, None)
    assert out[0].startswith("**No requests in this selection.**") and out[1]["choices"] == []


def test_reader_reads_only_new_bytes_and_notices_a_replaced_file(folder):
    reader = LogReader(folder)
    path = folder / "requests-2026-01-05.jsonl"
    assert len(reader.read().requests) == 10
    with open(path, "a") as fh:
        fh.write(json.dumps({**CHAT, "ts": _at("12:00"), "status": "ok", "latency_ms": 1.0}) + "\n")
        fh.write('{"ts": "2026-01-05T12:01')  # a row still being written: counted, not consumed
    logs = reader.read()
    assert (len(logs.requests), logs.partial) == (11, 2)
    with open(path, "a") as fh:
        fh.write(':00.000Z", "status": "ok", "model": "tiny-llama"}\n')
    logs = reader.read()
    assert (len(logs.requests), logs.partial) == (12, 1)
    assert logs.requests["model"].dtype == "category"
    path.write_text(json.dumps(ROWS[0]) + "\n")  # rotated away and replaced by a smaller file
    assert len(reader.read().requests) == 1


def test_export_csv_round_trip(folder, tmp_path):
    rows = report(LogReader(folder).read(), Filters(modalities=("image",))).rows
    out = export_csv(rows, tmp_path / "out.csv")
    back = pd.read_csv(out)
    assert len(back) == 3 and list(back.columns)[:3] == ["ts", "request_id", "client"]
    assert json.loads(back.loc[1, "adapters"]) == {"pixel": 0.6, "ink": 1.0}
    assert back.loc[0, "ts"] == "2026-01-05T11:00:00.000000Z"


def test_tab_renders_the_log(make_studio, folder):
    studio = make_studio("--log-dir", str(folder))
    with gr.Blocks():
        analytics_tab.build(studio)
    out = analytics_tab.render(LogReader(folder), "All time", None, None, ["chat"], None)
    assert out[0].startswith("**7 requests**") and "1 partial" in out[0]
    assert out[1]["choices"] == ["tiny-llama", "tiny-sd"]
    start = datetime(2026, 1, 5, 11, tzinfo=timezone.utc).timestamp()
    assert analytics_tab.render(LogReader(folder), "All time", start, None, None, None)[0].startswith(
        "**3 requests**")
    with pytest.raises(gr.Error, match="From must be before To"):
        analytics_tab.selection("All time", start, start, None, None)
    csv = analytics_tab.export(LogReader(folder), "All time", None, None, None, ["tiny-sd"])
    assert len(pd.read_csv(csv)) == 3


def test_storage_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(analytics, "_filesystem", lambda folder: "ext4")
    assert storage_warning(tmp_path, env={}) is None
    assert "wiped at every restart" in storage_warning(tmp_path, env={"SPACE_ID": "me/studio"})
    assert storage_warning(Path("/data/logs"), env={"SPACE_ID": "me/studio"}) is None
    monkeypatch.setattr(analytics, "_filesystem", lambda folder: "tmpfs")
    assert "lost at the next restart" in storage_warning(tmp_path, env={})
    monkeypatch.setattr(analytics, "_filesystem", lambda folder: "overlay")
    assert "Mount a volume" in storage_warning(tmp_path, env={})


@pytest.mark.skipif(not Path("/proc/self/mounts").exists(), reason="reads Linux mount table")
def test_filesystem_type_of_a_folder():
    assert analytics._filesystem(Path("/proc/self")) == "proc"
