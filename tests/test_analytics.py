"""Analytics from a small hand-made log: every figure equals the value computed by hand."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest

from studio.telemetry import analytics, logreader
from studio.telemetry.analytics import Filters, export_csv, report, storage_warning
from studio.telemetry.logreader import LogReader
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
        "replies": 5, "tokens in": 25, "tokens out": 55, "clips": 0, "audio seconds": 0.0, "transcripts": 0,
        "audio seconds heard": 0.0, "characters transcribed": 0, "images": 2,
        "3D meshes": 0, "videos": 0, "video seconds": 0.0, "frames": 0.0, "ms per frame": None,
        "transcripts": 0, "audio seconds heard": 0.0, "characters transcribed": 0,
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


def _row(i: int, day: int = 5) -> dict:
    """A varied request row: some lack columns (older versions), carry unknown keys, adapters or nested extras
    with null values (which any read drops, see analytics' reading section)."""
    row = {**(CHAT if i % 3 else IMAGE), "ts": f"2026-01-{day:02d}T{10 + i // 60:02d}:{i % 60:02d}:00.000Z",
           "request_id": f"{i:032x}", "status": ("ok", "error", "stopped")[i % 5 % 3], "seed": i,
           "latency_ms": 10 + i if i % 4 else 10.5 + i, "external": i % 6 == 0}
    if i % 3 == 0:
        row["adapters"] = {"pixel": 0.5, "ink": 1.0} if i % 2 else {"pixel": 0.8}
    if i % 5 == 0:
        row["extra"] = {"pieces": i % 4, "note": None, "parts": [{"k": None, "v": i}]}
    if i % 7 == 0:
        row["retired_column"] = [1, 2]
    if i % 11 == 0:
        del row["client"]
    return row


def _line(i: int, day: int = 5) -> bytes:
    return json.dumps(_row(i, day)).encode() + b"\n"


def _categories_sorted(df: pd.DataFrame) -> pd.DataFrame:
    """Category order depends on the order rows were read in; values must not."""
    used = {c: df[c].cat.remove_unused_categories() for c in logreader.CATEGORICAL}
    return df.assign(**{c: s.cat.set_categories(sorted(s.cat.categories)) for c, s in used.items()})


def _line_by_line(folder: Path) -> tuple[pd.DataFrame, int]:
    """The request files read again the slow, obvious way: every complete line through orjson."""
    frames, partial = [], 0
    for path in sorted(folder.glob("requests-*.jsonl")):
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1
        rows, bad = logreader.parse_lines(data[:complete])
        frames.append(logreader.requests_frame(rows))
        partial += bad + (complete < len(data))
    return logreader._concat(frames, logreader.CATEGORICAL), partial


def _agree(reader: LogReader, folder: Path, partial: int) -> None:
    """The reader's refresh equals a cold read by a new reader and the line-by-line read, skipped lines too."""
    warm, cold = reader.read(), LogReader(folder).read()
    slow, slow_partial = _line_by_line(folder)
    assert warm.partial == cold.partial == slow_partial == partial
    pd.testing.assert_frame_equal(_categories_sorted(warm.requests), _categories_sorted(cold.requests))
    pd.testing.assert_frame_equal(_categories_sorted(cold.requests), _categories_sorted(slow))


@pytest.mark.parametrize("piece", [logreader._LINE_BY_LINE, 512])
def test_incremental_reads_agree_with_full_rereads(tmp_path, monkeypatch, piece):
    """Torn middle lines, an unterminated last line, appends, a rotated, a truncated and a deleted file; with
    small pieces the reader halves refused pieces many times over."""
    monkeypatch.setattr(logreader, "_LINE_BY_LINE", piece)
    first, second = tmp_path / "requests-2026-01-05.jsonl", tmp_path / "requests-2026-01-06.jsonl"
    first.write_bytes(b"".join(_line(i) for i in range(40)) + b'{"ts": "2026-01-05T11:0\n'
                      + b"".join(_line(i) for i in range(40, 150)) + b'{"model": "tiny-llama", "st\n'
                      + _line(150))
    row = _line(0, day=6)
    second.write_bytes(b"".join(_line(i, day=6) for i in range(1, 60)) + row[:30])  # a row being written
    reader = LogReader(tmp_path)
    _agree(reader, tmp_path, partial=3)

    with open(second, "ab") as fh:  # the row completed, more rows, a writer killed mid-row, the next one
        fh.write(row[30:] + b"".join(_line(i, day=6) for i in range(60, 90)) + _line(90, day=6)[:25] + b"\n"
                 + _line(91, day=6))
    _agree(reader, tmp_path, partial=3)

    rotated = tmp_path / "rotated.tmp"  # replaced by a new file (new inode), smaller
    rotated.write_bytes(b"".join(_line(i) for i in range(200, 220)))
    rotated.replace(first)
    _agree(reader, tmp_path, partial=1)

    with open(second, "r+b") as fh:  # truncated in place to its first 10 rows
        fh.truncate(len(b"".join(_line(i, day=6) for i in range(1, 11))))
    _agree(reader, tmp_path, partial=0)

    with open(second, "r+b") as fh:  # truncated and rewritten past where the reader was (copytruncate)
        fh.truncate(0)
        fh.write(b"".join(_line(i, day=6) for i in range(300, 330)))
    _agree(reader, tmp_path, partial=0)

    first.unlink()
    _agree(reader, tmp_path, partial=0)
    assert reader.read().requests["request_id"].tolist() == [f"{i:032x}" for i in range(300, 330)]


def test_refresh_parses_only_appended_bytes(tmp_path, monkeypatch):
    path = tmp_path / "requests-2026-01-05.jsonl"
    path.write_bytes(b"".join(_line(i) for i in range(100)))
    reader = LogReader(tmp_path)
    assert len(reader.read().requests) == 100
    parsed = []
    real = logreader._parse
    monkeypatch.setattr(logreader, "_parse", lambda data, kind: parsed.append(len(data)) or real(data, kind))
    new = b"".join(_line(i) for i in range(100, 103))
    with open(path, "ab") as fh:
        fh.write(new + b'{"ts": "2026')
    logs = reader.read()
    assert parsed == [len(new)] and (len(logs.requests), logs.partial) == (103, 1)
    parsed.clear()
    assert reader.read().requests is logs.requests and parsed == []  # nothing new: nothing parsed or joined


def _pieces_read(data: bytes) -> tuple[list[pd.DataFrame], int]:
    """The reader's way with new bytes: parse into pieces, convert them."""
    pieces, bad = logreader._parse(data, logreader._requests())
    return logreader._convert(pieces, logreader._requests())[1], bad


def test_arrow_and_line_by_line_reads_type_rows_alike():
    """Every row arrow accepts becomes the frame the line-by-line path makes of it, so how the bytes were split
    into pieces never shows in the result; rows arrow refuses (a number as text) are read line by line."""
    data = b"".join(_line(i) for i in range(120)) + b'{"ts": "2026-01-05T13:00:00+01:00", "faces": 7}\n'
    rows, bad = logreader.parse_lines(data)
    expected = logreader.requests_frame(rows)
    frames, skipped = _pieces_read(data)
    assert len(frames) == 1 and bad == skipped == 0
    pd.testing.assert_frame_equal(frames[0], expected)
    assert expected["extra"][0] == {"pieces": 0, "parts": [{"v": 0}]}
    assert str(expected["ts"].iloc[-1]) == "2026-01-05 12:00:00+00:00"

    odd = data + b'{"ts": "2026-01-05T14:00:00.000Z", "latency_ms": "12.5", "model": 7}\n'
    frames, skipped = _pieces_read(odd)
    df = logreader._concat(frames, logreader.CATEGORICAL)
    assert skipped == 0 and len(df) == len(rows) + 1
    assert df["latency_ms"].iloc[-1] == 12.5 and df["model"].iloc[-1] == "7"
    pd.testing.assert_frame_equal(_categories_sorted(df.iloc[:-1]), _categories_sorted(expected))


def test_files_whose_types_do_not_merge_are_converted_one_by_one(tmp_path):
    (tmp_path / "requests-2026-01-05.jsonl").write_text("".join(json.dumps({**_row(i), "session": "s"}) + "\n"
                                                                for i in (1, 2)))
    (tmp_path / "requests-2026-01-06.jsonl").write_text(json.dumps({**_row(3, day=6), "session": {"id": 7}}) + "\n")
    df = LogReader(tmp_path).read().requests
    assert df["session"].tolist() == ["s", "s", {"id": 7}] and df["seed"].tolist() == [1, 2, 3]
    slow, _ = _line_by_line(tmp_path)
    pd.testing.assert_frame_equal(_categories_sorted(df), _categories_sorted(slow))


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
    assert out[1]["choices"] == ["tiny-llama"]  # the chosen modality's models only
    everything = analytics_tab.render(LogReader(folder), "All time", None, None, None, ["tiny-llama"])
    assert everything[1]["choices"] == ["tiny-llama", "tiny-sd"] and everything[1]["value"] == ["tiny-llama"]
    images = analytics_tab.render(LogReader(folder), "All time", None, None, ["image"], ["tiny-llama"])
    assert images[1] == gr.update(choices=["tiny-sd"], value=[])  # a chat model is no image model's filter
    assert images[0].startswith("**3 requests**")
    per_day = analytics_tab.render(LogReader(folder), "All time", None, None, ["image"], None, "Day")
    requests_figure = per_day[2]  # 3 requests in one bar: ticks 0, 1, 2, 3, never 0.5
    assert requests_figure.layout.title.text == "Requests over time (per 1D, UTC)"
    assert requests_figure.layout.yaxis.dtick == 1 and requests_figure.layout.yaxis.tickformat == ",d"
    with pytest.raises(gr.Error, match="Bucket: pick one of"):
        analytics_tab.selection("All time", None, None, None, None, "Fortnight")
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


def test_a_past_day_is_read_from_its_columnar_copy_once_compiled(tmp_path, monkeypatch):
    """A finished day's file is parsed once: a cold reader then maps its columnar copy (the same frame); a copy
    that no longer matches its file (appended to since) is ignored, and a damaged day is parsed every time."""
    day, damaged = tmp_path / "requests-2026-01-05.jsonl", tmp_path / "requests-2026-01-06.jsonl"
    day.write_bytes(b"".join(_line(i) for i in range(50)))
    damaged.write_bytes(b"".join(_line(i, day=6) for i in range(10)) + b'{"torn\n' + _line(10, day=6))
    first = LogReader(tmp_path).read()
    assert (tmp_path / logreader.COLUMNAR / "requests-2026-01-05.arrow").exists()
    assert not (tmp_path / logreader.COLUMNAR / "requests-2026-01-06.arrow").exists()

    parsed = []
    real = logreader._parse
    monkeypatch.setattr(logreader, "_parse", lambda data, kind: parsed.append(len(data)) or real(data, kind))
    again = LogReader(tmp_path).read()
    assert parsed == [damaged.stat().st_size]  # the compiled day was not parsed
    pd.testing.assert_frame_equal(_categories_sorted(again.requests), _categories_sorted(first.requests))
    assert again.partial == first.partial == 1

    with open(day, "ab") as fh:  # the copy no longer describes the file
        fh.write(_line(50))
    parsed.clear()
    assert len(LogReader(tmp_path).read().requests) == 62 and day.stat().st_size in parsed


def test_the_request_log_compiles_a_day_when_it_moves_on_to_the_next(tmp_path, monkeypatch):
    from studio.telemetry import requestlog

    done = threading.Event()
    log = requestlog.RequestLog(tmp_path, finished_day=lambda path: (logreader.compile_day(path), done.set()))
    monkeypatch.setattr(requestlog.time, "time", lambda: 20458 * 86400 + 60.0)  # 2026-01-05, a minute past midnight
    log.write({"client": "rest", "modality": "chat", "model": "tiny-llama", "status": "ok"})
    monkeypatch.setattr(requestlog.time, "time", lambda: 20459 * 86400 + 60.0)  # the next day
    log.write({"client": "rest", "modality": "chat", "model": "tiny-llama", "status": "ok"})
    assert done.wait(30)
    assert (tmp_path / logreader.COLUMNAR / "requests-2026-01-05.arrow").exists()
    assert len(LogReader(tmp_path).read().requests) == 2
