"""Usage analytics from the request logs: read the JSON Lines files, filter, aggregate and draw with plotly.

The Analytics tab and the benchmark call the same functions. `LogReader` keeps what it has parsed and on each
refresh reads only the bytes appended since (past days' files never change), so refreshing a large log costs
the aggregation, not a re-parse. Percentiles use linear interpolation (numpy's default) over successful
requests; error rates count every request.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import chain
from datetime import datetime, timedelta
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import plotly.graph_objects as go
from pandas.api.types import union_categoricals

from studio import modalities
from studio.config import SPACES_DATA
from studio.telemetry.requestlog import CACHE_COLUMNS, columns

BASE_NUMERIC = ("queue_ms", "latency_ms", "ttft_ms", "load_ms", "steps", "peak_memory_bytes", "prompt_chars")
CATEGORICAL = ("client", "endpoint", "modality", "model", "status", "error_type", "cache")
CACHE_CATEGORICAL = ("event", "model", "error_type")
FIGURES = ("requests", "latency", "chat", "errors", "cache", "adapters")


# ---------------------------------------------------------------------------------------------------- reading

# A file's new bytes go to pyarrow's JSON reader (C++, off the GIL, on every core) in one piece. A piece it
# refuses (a torn line, a value of an unexpected type) is halved until the fault is confined to a few kilobytes,
# which are read line by line with orjson: a damaged line costs its neighbours some speed, never their rows. The
# tables of one read are converted to pandas together (per-file conversion would dominate a year of small files).
# The two paths type a row alike, so how the bytes were split (a cold read, refreshes, damage) never shows in the
# frames, with two provisos: arrow cannot tell a key that is absent from one that is null inside an object, so
# nested objects (adapters, extra) drop their null-valued keys on both paths; and where a column mixes integers
# and fractions (never in the writer's own columns), arrow's integers come back as floats.

_LINE_BY_LINE = 64 * 1024  # bytes: a refused piece this small is read line by line
_HEAD = 64  # bytes compared to notice a file rewritten in place


@dataclass(frozen=True)
class _Kind:
    """The columns of one family of log files and how they are typed (other columns stay Python objects)."""

    columns: Sequence[str]
    numeric: Sequence[str]
    categorical: Sequence[str]

    def schema(self) -> pa.Schema:
        """The types arrow is told; the other columns' types it infers (text, ids, seeds, nested objects)."""
        told = {"ts": pa.timestamp("us", "UTC"), **dict.fromkeys(self.numeric, pa.float64()),
                **dict.fromkeys(self.categorical, pa.string())}
        return pa.schema([(c, told[c]) for c in self.columns if c in told])


def _requests() -> _Kind:
    return _Kind(columns(), numeric(), CATEGORICAL)


def _cache() -> _Kind:
    return _Kind(CACHE_COLUMNS, ("seconds", "bytes"), CACHE_CATEGORICAL)


def parse_lines(data: bytes) -> tuple[list[dict], int]:
    """The JSON objects in newline-terminated `data`, and how many lines were not one (torn rows); blank lines
    are neither, as for arrow."""
    rows, bad = [], 0
    loads, error = orjson.loads, orjson.JSONDecodeError
    for line in data.split(b"\n"):
        if not line or line.isspace():
            continue
        try:
            row = loads(line)
        except error:
            bad += 1
            continue
        if type(row) is dict:
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _compact(value: object) -> object:
    """`value` with the null-valued keys of its objects dropped, at any depth (see the section's comment)."""
    if type(value) is dict:
        return {k: _compact(v) if type(v) in _NESTED else v for k, v in value.items() if v is not None}
    if type(value) is list:
        return [_compact(v) if type(v) in _NESTED else v for v in value]
    return value


_NESTED = (dict, list)


def _category(values: pd.Series) -> pd.Series:
    """Categorical with text categories, so frames of new rows concatenate (see _concat)."""
    values = values.astype("category")
    return values.cat.rename_categories(values.cat.categories.astype("str"))


def _frame(rows: list[dict], kind: _Kind) -> pd.DataFrame:
    """Rows as a frame with exactly the kind's columns and fixed dtypes, whatever the rows hold (rows from an
    older version may lack some columns); text, ids and nested values stay Python objects."""
    df = pd.DataFrame({c: [_compact(r.get(c)) for r in rows] for c in kind.columns}, columns=list(kind.columns),
                      dtype=object)
    df["ts"] = pd.to_datetime(df["ts"], utc=True, format="ISO8601", errors="coerce").astype("datetime64[us, UTC]")
    for c in kind.numeric:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in kind.categorical:
        df[c] = _category(df[c])
    return df


def numeric() -> tuple[str, ...]:
    """The request columns read as numbers: timings and sizes, and every modality's output columns."""
    return (*BASE_NUMERIC, *modalities.log_columns())


def requests_frame(rows: list[dict]) -> pd.DataFrame:
    return _frame(rows, _requests())


def cache_frame(rows: list[dict]) -> pd.DataFrame:
    return _frame(rows, _cache())


def _objects(values: pa.ChunkedArray) -> pd.Series:
    """Python values as orjson gives them (nested objects compacted), None where null; dtype object, not the
    text dtype pandas would infer."""
    values = values.combine_chunks()
    if pa.types.is_string(values.type):
        return pd.Series(values.to_numpy(zero_copy_only=False), dtype=object)
    out = np.full(len(values), None, dtype=object)
    if values.null_count < len(values):
        present = values.drop_null()
        if pa.types.is_nested(present.type):
            items = np.fromiter(_python_objects(present), dtype=object, count=len(present))
        else:  # numbers and booleans: numpy makes the Python objects
            items = present.to_numpy(zero_copy_only=False).astype(object)
        out[values.is_valid().to_numpy(zero_copy_only=False)] = items
    return pd.Series(out, dtype=object)


def _python_objects(values: pa.Array) -> list:
    """Nested values, compacted. Objects of plain fields (adapters, most extras) are built once per distinct
    value and copied for each row, which costs a fraction of building each."""
    if not pa.types.is_struct(values.type) or any(pa.types.is_nested(f.type) for f in values.type):
        return [_compact(v) for v in values.to_pylist()]
    names = [f.name for f in values.type]
    built: dict[tuple, dict] = {}
    rows = []
    for key in zip(*(field.to_pylist() for field in values.flatten())) if names else [()] * len(values):
        value = built.get(key)
        if value is None:
            value = built[key] = {name: v for name, v in zip(names, key) if v is not None}
        rows.append(value.copy())
    return rows


def _arrow_category(values: pa.ChunkedArray) -> pd.Categorical:
    """Text as a categorical with sorted text categories, as `_category` makes it, encoded by arrow."""
    encoded = pc.dictionary_encode(values.combine_chunks())
    names = encoded.dictionary.to_pylist()
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = np.empty(len(names) + 1, dtype=np.int64)
    rank[order] = np.arange(len(names))
    rank[-1] = -1  # null: the index -1 picks this slot
    codes = rank[encoded.indices.fill_null(-1).to_numpy()]
    return pd.Categorical.from_codes(codes, categories=pd.Index([names[i] for i in order], dtype="str"),
                                     validate=False)


def _from_arrow(table: pa.Table, kind: _Kind) -> pd.DataFrame:
    """An arrow table of rows as a frame typed exactly as `_frame` types the same rows."""
    told = kind.schema()
    data = {}
    for c in kind.columns:
        if c in table.column_names:
            values = table.column(c)
        else:  # no row of this piece has the column
            values = pa.chunked_array([pa.nulls(table.num_rows, told.field(c).type if c in told.names else None)])
        if c == "ts":
            data[c] = values.to_pandas()
        elif c in kind.numeric:
            data[c] = values.to_numpy()
        elif c in kind.categorical:
            data[c] = _arrow_category(values)
        else:
            data[c] = _objects(values)
    return pd.DataFrame(data, columns=list(kind.columns), copy=False)  # no copy into consolidated blocks


_Piece = pa.Table | pd.DataFrame  # rows parsed by arrow, still to convert, or a frame of rows arrow refused


def _parse(data: bytes, kind: _Kind) -> tuple[list[_Piece], int]:
    """The rows of newline-terminated `data`, in order, and how many lines were not JSON objects."""
    try:
        return [pj.read_json(pa.BufferReader(data), parse_options=pj.ParseOptions(
            explicit_schema=kind.schema(), unexpected_field_behavior="infer"))], 0
    except pa.ArrowException:
        cut = data.find(b"\n", len(data) // 2) + 1
        if len(data) <= _LINE_BY_LINE or cut >= len(data):
            rows, bad = parse_lines(data)
            return [_frame(rows, kind)], bad
        first, bad = _parse(data[:cut], kind)
        second, more = _parse(data[cut:], kind)
        return first + second, bad + more


def _convert(pieces: list[_Piece], kind: _Kind) -> tuple[pd.DataFrame | None, list[pd.DataFrame]]:
    """A frame for each piece, in order. The arrow tables are converted together, which costs far less than one
    conversion each when there are many small files; their frames are views of that whole (also returned)."""
    tables = [piece for piece in pieces if isinstance(piece, pa.Table)]
    if not tables:
        return None, list(pieces)
    try:
        whole = _from_arrow(pa.concat_tables(tables, promote_options="permissive"), kind)
    except pa.ArrowException:  # types that no promotion reconciles (text here, objects there): one at a time
        return None, [_from_arrow(p, kind) if isinstance(p, pa.Table) else p for p in pieces]
    frames, start = [], 0
    for piece in pieces:
        if isinstance(piece, pa.Table):
            piece, start = whole.iloc[start:start + piece.num_rows].reset_index(drop=True), start + piece.num_rows
        frames.append(piece)
    return whole, frames


def _concat(frames: list[pd.DataFrame], categorical: Sequence[str]) -> pd.DataFrame:
    """Concatenate keeping categorical columns categorical (pandas turns differing categories into objects)."""
    if len(frames) == 1:
        return frames[0]
    df = pd.concat(frames, ignore_index=True)
    for c in categorical:
        df[c] = union_categoricals([f[c] for f in frames])
    return df


@dataclass
class _FileState:
    inode: int
    head: bytes = b""  # the file's first bytes at the last read: a file truncated and rewritten since differs
    offset: int = 0  # bytes parsed so far: always just after a newline
    frame: pd.DataFrame | None = None
    bad: int = 0  # invalid lines skipped
    open_tail: bool = False  # bytes after the last newline: a row being written, or one torn by a crash


@dataclass
class Logs:
    requests: pd.DataFrame
    cache: pd.DataFrame
    partial: int = 0  # lines skipped: torn rows, plus an unterminated last line


class LogReader:
    """Reads a log folder into DataFrames, parsing each file's new bytes only once."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[Path, _FileState] = {}
        self._joined: dict[str, tuple[list[pd.DataFrame], pd.DataFrame]] = {}  # per family: frames -> concatenated
        self._lock = threading.Lock()

    def read(self, start: datetime | None = None, end: datetime | None = None) -> Logs:
        """Rows of the daily files that can hold [start, end) (a day's margin each side: filter for exact times)."""
        with self._lock:
            requests, bad = self._family("requests", _requests(), start, end)
            cache, cache_bad = self._family("cache", _cache(), start, end)
        return Logs(requests, cache, bad + cache_bad)

    def _family(self, prefix: str, kind: _Kind, start: datetime | None,
                end: datetime | None) -> tuple[pd.DataFrame, int]:
        first = (start - timedelta(days=1)).strftime("%Y-%m-%d") if start else ""
        last = (end + timedelta(days=1)).strftime("%Y-%m-%d") if end else "9999"
        paths = sorted(self.folder.glob(f"{prefix}-*.jsonl"))
        for gone in [p for p in self._files if p.name.startswith(prefix) and p not in paths]:
            del self._files[gone]
        chosen = [path for path in paths if first <= path.stem[len(prefix) + 1:] <= last]
        with ThreadPoolExecutor(2) as pool:  # arrow parses without the GIL: two files at a time
            updates = list(pool.map(lambda path: self._update(path, kind), chosen))
        whole, frames = _convert([piece for _, pieces in updates for piece in pieces], kind)
        # A first read of every file, all parsed by arrow: `whole` is already the files' rows, in order.
        first_read = whole is not None and all(state.frame is None and all(isinstance(p, pa.Table) for p in pieces)
                                               for state, pieces in updates)
        frames = iter(frames)
        for state, pieces in updates:
            new = [next(frames) for _ in pieces]
            if new:
                state.frame = _concat(([state.frame] if state.frame is not None else []) + new, kind.categorical)
        states = [state for state, _ in updates if state.frame is not None]
        joined = self._join(prefix, states, kind, whole if first_read else None)
        return joined, sum(state.bad + state.open_tail for state, _ in updates)

    def _join(self, prefix: str, states: list[_FileState], kind: _Kind, whole: pd.DataFrame | None) -> pd.DataFrame:
        """The files' frames as one (`whole` when given); the previous one again while none changed (each change
        of filter reads). The files' frames then become views of it, so their rows are held once."""
        if not states:
            return _frame([], kind)
        joined_from, joined = self._joined.get(prefix, ([], None))
        if whole is not None:
            joined = whole
        elif len(joined_from) != len(states) or any(a is not s.frame for a, s in zip(joined_from, states)):
            joined = _concat([state.frame for state in states], kind.categorical)
            start = 0
            for state in states:
                rows = joined.iloc[start:start + len(state.frame)].reset_index(drop=True)  # a view, not a copy
                state.frame, start = rows, start + len(rows)
        self._joined[prefix] = ([state.frame for state in states], joined)
        return joined

    def _update(self, path: Path, kind: _Kind) -> tuple[_FileState, list[_Piece]]:
        """The file's state and the rows appended since the last read, parsed (not yet converted)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._files.pop(path, None)
            return _FileState(0), []
        state = self._files.get(path)
        if state is None or state.inode != st.st_ino or st.st_size < state.offset:  # new, replaced or truncated
            state = self._files[path] = _FileState(st.st_ino)
        if st.st_size <= state.offset:
            return state, []
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
            if not head.startswith(state.head):  # truncated, then grew past where we were
                state = self._files[path] = _FileState(st.st_ino)
            state.head = head
            fh.seek(state.offset)
            data = fh.read(st.st_size - state.offset)
        complete = data.rfind(b"\n") + 1
        state.open_tail = complete < len(data)
        pieces, bad = _parse(data[:complete], kind) if complete else ([], 0)
        state.offset += complete
        state.bad += bad
        return state, pieces


# ---------------------------------------------------------------------------------------------------- filters

@dataclass(frozen=True)
class Filters:
    start: datetime | None = None
    end: datetime | None = None
    modalities: tuple[str, ...] = ()
    models: tuple[str, ...] = ()


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

def time_bucket(start: datetime | pd.Timestamp, end: datetime | pd.Timestamp) -> str:
    """Bucket width for requests over time: about 30 to 200 bars whatever the range."""
    span = pd.Timestamp(end) - pd.Timestamp(start)
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
        "stopped": int((df["status"] == "stopped").sum()),
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
                      yaxis2={"anchor": "x2", "rangemode": "nonnegative"}, annotations=[
                          {"text": text, "x": x, "xref": "paper", "xanchor": "center", "y": 1, "yref": "paper",
                           "yanchor": "bottom", "showarrow": False} for text, x in zip(panels, (0.225, 0.775))])
    return go.Figure(traces, layout={"title": title, "barmode": "group", **layout})


def _bars(table: pd.DataFrame, columns: Mapping[str, str], title: str, yaxis: str) -> go.Figure:
    if table.empty:
        return _empty(title)
    return _figure(title, [_bar(table, column, label) for column, label in columns.items()],
                   yaxis={"title": yaxis})


def requests_figure(df: pd.DataFrame, freq: str) -> go.Figure:
    title = f"Requests over time (per {freq}, UTC)"
    series = requests_over_time(df, freq)
    if series.empty:
        return _empty(title)
    traces = [go.Bar(name=f"{modality} · {model}", x=part["time"].tolist(), y=part["requests"].tolist())
              for (modality, model), part in series.groupby(["modality", "model"], observed=True)]
    return _figure(title, traces, barmode="stack", yaxis={"title": "requests"})


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
                   panels=("error rate by model", "error types"), showlegend=False, yaxis={"tickformat": ".0%"})


def cache_figure(table: pd.DataFrame) -> go.Figure:
    title = "Model cache"
    if table.empty:
        return _empty(title)
    counts = [_bar(table, column, column.replace("_", " ")) for column in ("hits", "loads", "evictions",
                                                                           "failed_loads")]
    return _figure(title, [*counts, _bar(table, "mean_load_s", "mean load s", panel=2, showlegend=False)],
                   panels=("requests and cache events", "mean load time (s)"))


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
        freq = time_bucket(filters.start or df["ts"].min(), filters.end or df["ts"].max())
    else:
        freq = "1h"
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
        "adapters": _bars(adapters, {"uses": "uses"}, "Most used LoRA adapters", "requests"),
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
