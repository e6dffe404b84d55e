"""The Analytics tab: usage figures built from the request logs, with filters, auto-refresh and CSV export."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import gradio as gr

from studio import modalities
from studio.runtime import Studio
from studio.telemetry.analytics import FIGURES, Filters, export_csv, report, storage_warning
from studio.telemetry.logreader import LogReader
from studio.ui.controls import output_folder

RANGES = {"Last hour": timedelta(hours=1), "Last 24 hours": timedelta(days=1), "Last 7 days": timedelta(days=7),
          "Last 30 days": timedelta(days=30), "All time": None}
DEFAULT_RANGE = "Last 24 hours"
AUTO_BUCKET = "Auto (from the time range)"
BUCKETS = {AUTO_BUCKET: None, "Minute": "1min", "Hour": "1h", "Day": "1D"}  # pandas frequencies
AUTO_REFRESH_S = 10


def selection(span: str, start: float | None, end: float | None, modalities: list[str] | None,
              models: list[str] | None, bucket: str = AUTO_BUCKET, now: datetime | None = None) -> Filters:
    """The filters of the form; From / To (UTC timestamps), when set, replace the preset range."""
    now = now or datetime.now(timezone.utc)
    if bucket not in BUCKETS:
        raise gr.Error(f"Bucket: pick one of {', '.join(BUCKETS)}.")
    if start is None and end is None:
        if span not in RANGES:
            raise gr.Error(f"Time range: pick one of {', '.join(RANGES)}.")
        since = RANGES[span]
        first, last = (now - since if since else None), None
    else:
        first = datetime.fromtimestamp(start, timezone.utc) if start is not None else None
        last = datetime.fromtimestamp(end, timezone.utc) if end is not None else None
        if first and last and first >= last:
            raise gr.Error("From must be before To.")
    return Filters(first, last, tuple(modalities or ()), tuple(models or ()), BUCKETS[bucket])


def _number(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def summary(totals: dict, partial: int, folder: Path) -> str:
    """The totals line, or the empty state."""
    skipped = (f"\n\n{partial} partial or damaged log line(s) skipped (a write cut short by a crash)."
               if partial else "")
    if not totals["requests"]:
        return (f"**No requests in this selection.** Every generation, from the UI or the HTTP API, is logged to "
                f"`{folder}` and shows up here.{skipped}")
    t = totals
    own = " · ".join(f"{total.label} {_number(t[total.label], '{:,.1f}' if total.column else '{:,.0f}')}"
                     for modality in modalities.registered() for total in modality.totals if t[total.label])
    return (f"**{t['requests']:,} requests** · ok {t['ok']:,} · errors {t['errors']:,} "
            f"({_number(t['error_rate'], '{:.1%}')}) · stopped {t['stopped']:,} · models {t['models']} · "
            f"latency p50 {_number(t['p50_ms'])} ms, p95 {_number(t['p95_ms'])} ms · {own + ' · ' if own else ''}"
            f"cache hit rate {_number(t['cache_hit_rate'], '{:.0%}')} · loads {t['loads']:,} · "
            f"evictions {t['evictions']:,}{skipped}")


def render(reader: LogReader, span: str, start: float | None, end: float | None, modalities: list[str] | None,
           models: list[str] | None, bucket: str = AUTO_BUCKET) -> list:
    """Totals, the model choices and every figure for the selection. The Model filter offers the models of the
    chosen modalities only; a picked model of another modality is dropped from the selection."""
    filters = selection(span, start, end, modalities, models, bucket)
    logs = reader.read(filters.start, filters.end)
    requests = logs.requests
    if filters.modalities:
        requests = requests[requests["modality"].isin(filters.modalities)]
    known = sorted({str(m) for m in requests["model"].dropna().unique()})
    kept = [m for m in filters.models if m in known]
    result = report(logs, replace(filters, models=tuple(kept)))
    return [summary(result.totals, result.partial, reader.folder), gr.update(choices=known, value=kept),
            *(result.figures[name] for name in FIGURES)]


def export(reader: LogReader, span: str, start: float | None, end: float | None, modalities: list[str] | None,
           models: list[str] | None, bucket: str = AUTO_BUCKET) -> str:
    """The selected rows as a CSV file."""
    filters = selection(span, start, end, modalities, models, bucket)
    result = report(reader.read(filters.start, filters.end), filters)
    out = output_folder("export") / f"requests-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.csv"
    return str(export_csv(result.rows, out))


def build(studio: Studio) -> None:
    reader = LogReader(studio.log.folder)
    gr.Markdown(f"Usage from the request logs in `{studio.log.folder}` (times in UTC).")
    warning = storage_warning(studio.log.folder)
    if warning:
        gr.Markdown(f"> **Logs will not survive a restart.** {warning}", elem_id="analytics-storage-warning")
    with gr.Row():
        span = gr.Dropdown(list(RANGES), value=DEFAULT_RANGE, label="Time range")
        start = gr.DateTime(label="From (optional)", timezone="UTC", info="overrides the time range")
        end = gr.DateTime(label="To (optional)", timezone="UTC")
        modality = gr.Dropdown(list(modalities.names()), multiselect=True, label="Modality", info="all when empty")
        model = gr.Dropdown([], multiselect=True, label="Model", info="all of the modality when empty")
        bucket = gr.Dropdown(list(BUCKETS), value=AUTO_BUCKET, label="Requests per", info="bar width over time")
    with gr.Row():
        refresh = gr.Button("Refresh", variant="primary", scale=1)
        auto = gr.Checkbox(label=f"Auto-refresh every {AUTO_REFRESH_S} s", value=False, scale=1)
        download = gr.Button("Export CSV", scale=1)
    csv_file = gr.File(label="Filtered rows (CSV)", interactive=False, visible=False)
    totals = gr.Markdown()
    plots = {"requests": gr.Plot(show_label=False)}
    with gr.Row():
        plots["latency"], plots["chat"] = gr.Plot(show_label=False), gr.Plot(show_label=False)
    with gr.Row():
        plots["errors"], plots["cache"] = gr.Plot(show_label=False), gr.Plot(show_label=False)
    plots["adapters"] = gr.Plot(show_label=False)
    timer = gr.Timer(AUTO_REFRESH_S, active=False)

    inputs = [span, start, end, modality, model, bucket]
    outputs = [totals, model, *(plots[name] for name in FIGURES)]

    def show(*values):
        return render(reader, *values)

    def on_load():
        return render(reader, DEFAULT_RANGE, None, None, None, None)

    common = {"api_visibility": "private", "show_progress": "hidden", "concurrency_id": "analytics",
              "concurrency_limit": 1}
    gr.on([refresh.click, timer.tick, span.change, start.change, end.change, modality.change, model.input,
           bucket.change],
          show, inputs, outputs, **common)
    gr.on(None, on_load, None, outputs, **common)
    auto.change(lambda on: gr.Timer(active=on), auto, timer, api_visibility="private")
    download.click(lambda *values: gr.File(export(reader, *values), visible=True), inputs, csv_file,
                   api_visibility="private")
