"""Usage analytics from the request logs (read by studio.telemetry.logreader): filter, aggregate, draw with plotly.

The Analytics tab and the benchmark call the same functions. Percentiles use linear interpolation (numpy's default)
over successful requests; error rates count every request.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Mapping

import orjson
import pandas as pd
import plotly.graph_objects as go

from studio import modalities
from studio.config import SPACES_DATA
from studio.telemetry.logreader import Logs

FIGURES = ("requests", "latency", "chat", "errors", "cache", "adapters")


# ---------------------------------------------------------------------------------------------------- filters

@dataclass(frozen=True)
class Filters:
    start: datetime | None = None
    end: datetime | None = None
    modalities: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    bucket: str | None = None  # requests over time per this pandas frequency ("1min", "1h", "1D"); None: auto


def apply_filters(logs: Logs, filters: Filters) -> Logs:
    """Requests and cache events inside the time range, for the chosen modalities and models (empty = all).

    Masks are combined first and the frames copied once, and not at all when everything is kept."""
    df, ev = logs.requests, logs.cache
    keep, keep_ev = pd.Series(True, index=df.index), pd.Series(True, index=ev.index)
    if filters.start is not None:
        keep &= df["ts"] >= filters.start
        keep_ev &= ev["ts"] >= filters.start
    if filters.end is not None:
        keep &= df["ts"] < filters.end
        keep_ev &= ev["ts"] < filters.end
    if filters.modalities:
        keep &= df["modality"].isin(filters.modalities)
        keep_ev &= ev["model"].isin(df.loc[keep, "model"].unique())  # cache events name the model only
    if filters.models:
        keep &= df["model"].isin(filters.models)
        keep_ev &= ev["model"].isin(filters.models)
    return replace(logs, requests=df if keep.all() else df[keep], cache=ev if keep_ev.all() else ev[keep_ev])


# ---------------------------------------------------------------------------------------------------- aggregates

MAX_BUCKETS = 2000  # bars of requests over time: a finer bucket than this allows is widened (the title says)


def time_bucket(start: datetime | pd.Timestamp, end: datetime | pd.Timestamp, wanted: str | None = None) -> str:
    """Bucket width for requests over time: `wanted` while it gives at most MAX_BUCKETS bars, else (and when
    None) about 30 to 200 bars whatever the range."""
    span = pd.Timestamp(end) - pd.Timestamp(start)
    if wanted is not None and span / pd.Timedelta(wanted) <= MAX_BUCKETS:
        return wanted
    for limit, freq in ((timedelta(hours=3), "1min"), (timedelta(hours=12), "5min"), (timedelta(days=3), "1h"),
                        (timedelta(days=14), "6h")):
        if span <= limit:
            return freq
    return "1D"


def requests_over_time(df: pd.DataFrame, freq: str) -> pd.DataFrame:
    """Requests per time bucket and (modality, model): columns time, modality, model, requests."""
    counts = df.groupby([df["ts"].dt.floor(freq), df["modality"], df["model"]], observed=True).size()
    return counts.rename("requests").reset_index().rename(columns={"ts": "time"})


def _percentiles(values: pd.Series, by: pd.Series, names: Mapping[float, str]) -> pd.DataFrame:
    """Per group percentiles (linear interpolation), one column per entry of `names`."""
    table = values.groupby(by, observed=True).quantile(list(names)).unstack()
    return table.reindex(columns=list(names)).rename(columns=names)


def latency_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per model: successful requests and end-to-end latency p50 / p95 / p99 in ms."""
    ok = df["status"] == "ok"
    latency, by = df["latency_ms"][ok], df["model"][ok]
    table = _percentiles(latency, by, {0.5: "p50_ms", 0.95: "p95_ms", 0.99: "p99_ms"})
    return table.assign(requests=by.groupby(by, observed=True).size())[["requests", "p50_ms", "p95_ms", "p99_ms"]]


def chat_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per chat model: time to first token p50 / p95 (ms) and decode speed (tokens/s after the first token)."""
    chat = df.loc[(df["status"] == "ok") & (df["modality"] == "chat"),
                  ["model", "latency_ms", "ttft_ms", "completion_tokens"]]
    decode_s = (chat["latency_ms"] - chat["ttft_ms"]) / 1000
    speed = ((chat["completion_tokens"] - 1) / decode_s).where((chat["completion_tokens"] > 1) & (decode_s > 0))
    by = chat["model"]
    ttft = _percentiles(chat["ttft_ms"], by, {0.5: "ttft_p50_ms", 0.95: "ttft_p95_ms"})
    return ttft.assign(tokens_per_s=speed.groupby(by, observed=True).median(),
                       completion_tokens=chat["completion_tokens"].groupby(by, observed=True).sum())


def error_tables(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Per model requests, errors and error rate; and the count of each error type."""
    failed = df["status"] == "error"
    grouped = failed.groupby(df["model"], observed=True)
    table = pd.DataFrame({"requests": grouped.size(), "errors": grouped.sum()})
    table["error_rate"] = table["errors"] / table["requests"]
    types = df.loc[failed, "error_type"].value_counts()
    return table, types[types > 0]


def cache_table(df: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Per model: requests served from memory (hits) or after a load, loads, failed loads, evictions, load time."""
    by = df["model"]
    table = pd.DataFrame({"hits": (df["cache"] == "hit").groupby(by, observed=True).sum(),
                          "waited_for_load": (df["cache"] == "load").groupby(by, observed=True).sum()})
    counts = events.groupby(["model", "event"], observed=True).size().unstack(fill_value=0)
    loads = events[events["event"] == "load"].groupby("model", observed=True)["seconds"]
    table = table.join(counts.reindex(columns=["load", "load_failed", "evict"], fill_value=0), how="outer")
    table = table.join(loads.mean().rename("mean_load_s"), how="outer")
    table = table.rename(columns={"load": "loads", "load_failed": "failed_loads", "evict": "evictions"})
    counts = ["hits", "waited_for_load", "loads", "failed_loads", "evictions"]
    table[counts] = table[counts].fillna(0).astype("int64")
    return table


def adapter_table(df: pd.DataFrame, top: int = 10) -> pd.DataFrame:
    """The most used LoRA adapters: uses and mean weight."""
    # Few distinct (adapter, weight) pairs recur across many rows: count them in C first.
    pairs = Counter(chain.from_iterable(map(dict.items, df["adapters"].dropna())))
    counted = pd.DataFrame([(name, weight, n) for (name, weight), n in pairs.items()],
                           columns=["adapter", "weight", "n"])
    grouped = counted.assign(total=counted["weight"] * counted["n"]).groupby("adapter")
    uses = grouped["n"].sum().astype("int64")
    table = pd.DataFrame({"uses": uses, "mean_weight": grouped["total"].sum() / uses})
    return table.sort_values(["uses", "mean_weight"], ascending=False).head(top)


def totals(df: pd.DataFrame, events: pd.DataFrame) -> dict[str, float | int | None]:
    """Totals for the period: requests, outcomes, latency and the cache, then each modality's own figures
    (`Modality.totals`, keyed by their labels)."""
    ok = df["status"] == "ok"
    n = len(df)
    errors = int((df["status"] == "error").sum())
    hits = int((df["cache"] == "hit").sum())
    served = hits + int((df["cache"] == "load").sum())
    latency = df["latency_ms"][ok]
    result: dict[str, float | int | None] = {
        "requests": n,
        "ok": int(ok.sum()),
        "errors": errors,
        "stopped": int(df["status"].isin(["stopped", "cancelled"]).sum()),  # ended early: Stop, or a client gone
        "error_rate": errors / n if n else None,
        "models": int(df["model"].nunique()),
        "p50_ms": float(latency.quantile(0.5)) if len(latency.dropna()) else None,
        "p95_ms": float(latency.quantile(0.95)) if len(latency.dropna()) else None,
        "cache_hit_rate": hits / served if served else None,
        "loads": int((events["event"] == "load").sum()),
        "evictions": int((events["event"] == "evict").sum()),
    }
    for modality in modalities.registered():
        rows = ok & (df["modality"] == modality.name)
        for total in modality.totals:
            if total.column is None:
                result[total.label] = int(rows.sum())
                continue
            value = float(df.loc[rows, total.column].sum())
            if total.per is not None:
                per = float(df.loc[rows & df[total.column].notna(), total.per].sum())
                value = value / per if per else None
            result[total.label] = value
    return result


# ---------------------------------------------------------------------------------------------------- figures

# Figures are built in one constructor call each: plotly validates on every add_*/update_* call, and
# make_subplots alone costs ten times a whole figure.

def count_axis(largest: float, **axis) -> dict:
    """A y axis of counts: whole-number ticks (Plotly would put ticks at 0.5 steps below about ten)."""
    return {"tickformat": ",d", **({"dtick": 1} if largest < 10 else {}), **axis}


def _empty(title: str) -> go.Figure:
    hidden = {"visible": False}
    return go.Figure(layout={"title": title, "xaxis": hidden, "yaxis": hidden, "annotations": [
        {"text": "No data for this selection", "showarrow": False, "font": {"size": 16}}]})


def _bar(table: pd.DataFrame | pd.Series, column: str | None, label: str, panel: int = 1, **kwargs) -> go.Bar:
    values = table if column is None else table[column]
    axes = {"xaxis": "x2", "yaxis": "y2"} if panel == 2 else {}
    return go.Bar(name=label, x=[str(i) for i in table.index], y=values.tolist(), **axes, **kwargs)


def _figure(title: str, traces: list[go.Bar], panels: tuple[str, str] | None = None, **layout) -> go.Figure:
    """One figure; with `panels`, two side by side (traces with panel=2 go right) titled as given."""
    layout["yaxis"] = {"rangemode": "nonnegative", **layout.get("yaxis", {})}  # all counts, rates and times
    if panels:
        layout.update(xaxis={"domain": [0, 0.45]}, xaxis2={"domain": [0.55, 1], "anchor": "y2"},
                      yaxis2={"anchor": "x2", "rangemode": "nonnegative", **layout.get("yaxis2", {})}, annotations=[
                          {"text": text, "x": x, "xref": "paper", "xanchor": "center", "y": 1, "yref": "paper",
                           "yanchor": "bottom", "showarrow": False} for text, x in zip(panels, (0.225, 0.775))])
    return go.Figure(traces, layout={"title": title, "barmode": "group", **layout})


def _bars(table: pd.DataFrame, columns: Mapping[str, str], title: str, yaxis: str, counts: bool = False) -> go.Figure:
    if table.empty:
        return _empty(title)
    axis = count_axis(table[list(columns)].max().max(), title=yaxis) if counts else {"title": yaxis}
    return _figure(title, [_bar(table, column, label) for column, label in columns.items()], yaxis=axis)


def requests_figure(df: pd.DataFrame, freq: str) -> go.Figure:
    title = f"Requests over time (per {freq}, UTC)"
    series = requests_over_time(df, freq)
    if series.empty:
        return _empty(title)
    traces = [go.Bar(name=f"{modality} · {model}", x=part["time"].tolist(), y=part["requests"].tolist())
              for (modality, model), part in series.groupby(["modality", "model"], observed=True)]
    tallest = series.groupby("time")["requests"].sum().max()  # the bars are stacked
    return _figure(title, traces, barmode="stack", yaxis=count_axis(tallest, title="requests"))


def chat_figure(table: pd.DataFrame) -> go.Figure:
    title = "Chat: time to first token and decode speed"
    if table.empty:
        return _empty(title)
    return _figure(title, [_bar(table, "ttft_p50_ms", "TTFT p50"), _bar(table, "ttft_p95_ms", "TTFT p95"),
                           _bar(table, "tokens_per_s", "tokens/s", panel=2)],
                   panels=("time to first token (ms)", "tokens/s after the first (median)"))


def errors_figure(table: pd.DataFrame, types: pd.Series) -> go.Figure:
    title = "Errors"
    if table.empty:
        return _empty(title)
    return _figure(title, [_bar(table, "error_rate", "error rate"), _bar(types, None, "errors", panel=2)],
                   panels=("error rate by model", "error types"), showlegend=False, yaxis={"tickformat": ".0%"},
                   yaxis2=count_axis(types.max()))


def cache_figure(table: pd.DataFrame) -> go.Figure:
    title = "Model cache"
    if table.empty:
        return _empty(title)
    counts = [_bar(table, column, column.replace("_", " ")) for column in ("hits", "loads", "evictions",
                                                                           "failed_loads")]
    largest = table[["hits", "loads", "evictions", "failed_loads"]].max().max()
    return _figure(title, [*counts, _bar(table, "mean_load_s", "mean load s", panel=2, showlegend=False)],
                   panels=("requests and cache events", "mean load time (s)"), yaxis=count_axis(largest))


@dataclass
class Report:
    """Everything the Analytics tab shows for one selection."""

    rows: pd.DataFrame
    totals: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, go.Figure] = field(default_factory=dict)
    partial: int = 0


def report(logs: Logs, filters: Filters = Filters()) -> Report:
    """Filter, aggregate and draw every Analytics figure."""
    selected = apply_filters(logs, filters)
    df, events = selected.requests, selected.cache
    if len(df):
        freq = time_bucket(filters.start or df["ts"].min(), filters.end or df["ts"].max(), filters.bucket)
    else:
        freq = filters.bucket or "1h"
    latency = latency_table(df)
    chat = chat_table(df)
    errors, error_types = error_tables(df)
    cache = cache_table(df, events)
    adapters = adapter_table(df)
    figures = {
        "requests": requests_figure(df, freq),
        "latency": _bars(latency, {"p50_ms": "p50", "p95_ms": "p95", "p99_ms": "p99"},
                         "Latency by model (successful requests)", "ms"),
        "chat": chat_figure(chat),
        "errors": errors_figure(errors, error_types),
        "cache": cache_figure(cache),
        "adapters": _bars(adapters, {"uses": "uses"}, "Most used LoRA adapters", "requests", counts=True),
    }
    tables = {"latency": latency, "chat": chat, "errors": errors, "error_types": error_types.to_frame("errors"),
              "cache": cache, "adapters": adapters}
    return Report(df, totals(df, events), tables, figures, logs.partial)


# ---------------------------------------------------------------------------------------------------- export

def export_csv(df: pd.DataFrame, path: Path) -> Path:
    """The rows as CSV; adapters and extra fields as JSON text."""
    as_json = {c: df[c].map(lambda v: orjson.dumps(v).decode() if v is not None else "")
               for c in ("adapters", "extra")}
    out = df.assign(ts=df["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), **as_json)
    out.to_csv(path, index=False)
    return Path(path)


# ---------------------------------------------------------------------------------------------------- storage

def _filesystem(folder: Path) -> str | None:
    """The type of the filesystem holding `folder` (Linux /proc/self/mounts), None where unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].encode().decode("unicode_escape")  # spaces are written as \040
        inside = str(folder) == point or str(folder).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, parts[2]
    return fstype


def storage_warning(folder: Path, env: Mapping[str, str] | None = None) -> str | None:
    """Why the logs in `folder` would not survive a restart, or None when they (as far as we can tell) do."""
    env = os.environ if env is None else env
    folder = Path(folder).resolve()
    if env.get("SPACE_ID") and not folder.is_relative_to(SPACES_DATA):
        return (f"The request logs are in {folder}, on this Space's disk, which is wiped at every restart. "
                "Enable persistent storage in the Space settings: logs then go to /data/logs.")
    fstype = _filesystem(folder)
    if fstype in ("tmpfs", "ramfs"):
        return f"The request logs are in {folder}, in memory ({fstype}): they are lost at the next restart."
    if fstype == "overlay":
        return (f"The request logs are in {folder}, inside a container's writable layer: they are lost when the "
                "container is recreated. Mount a volume and point --log-dir at it.")
    return None
