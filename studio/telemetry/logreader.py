"""Reading the request logs into DataFrames: fast on a year of logs, incremental on refresh, tolerant of damage.

A file's new bytes go to pyarrow's JSON reader (C++, off the GIL) in one piece. A piece it refuses (a torn line, a
value of an unexpected type) is halved until the fault is confined to a few kilobytes, which are read line by line
with orjson: a damaged line costs its neighbours some speed, never their rows. The tables of one read are converted
to pandas together (per-file conversion would dominate a year of small files). The two paths type a row alike, so
how the bytes were split (a cold read, refreshes, damage) never shows in the frames, with two provisos: arrow cannot
tell a key that is absent from one that is null inside an object, so nested objects (adapters, extra) drop their
null-valued keys on both paths; and where a column mixes integers and fractions (never in the writer's own
columns), arrow's integers come back as floats.

Past days' files never change: once a day is over, its file is compiled into a columnar copy (Arrow IPC, in the
log folder's `.columnar/`), which a reader maps in milliseconds instead of parsing. The writer compiles a day when
it moves on to the next (`compile_day`); a reader compiles any past day it had to parse without one. The copy is
only a cache: it names the size and modification time of the file it was made from, and a copy that no longer
matches (or cannot be read) is ignored, so deleting `.columnar/` is always safe.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from pandas.api.types import union_categoricals

from studio import modalities
from studio.telemetry.requestlog import CACHE_COLUMNS, columns

logger = logging.getLogger(__name__)

BASE_NUMERIC = ("queue_ms", "latency_ms", "ttft_ms", "load_ms", "steps", "peak_memory_bytes", "prompt_chars")
CATEGORICAL = ("client", "endpoint", "modality", "model", "status", "error_type", "cache")
CACHE_CATEGORICAL = ("event", "model", "error_type")


_LINE_BY_LINE = 64 * 1024  # bytes: a refused piece this small is read line by line
_HEAD = 64  # bytes compared to notice a file rewritten in place
COLUMNAR = ".columnar"  # the columnar copies of past days, inside the log folder
_SOURCE = b"studio.source"  # the copy's metadata key: "size mtime_ns" of the file it was made from


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
        """The file's state and the rows appended since the last read, parsed (not yet converted). A past day's
        file read for the first time comes from its columnar copy, or is compiled into one once parsed."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._files.pop(path, None)
            return _FileState(0), []
        state = self._files.get(path)
        past = _day_of(path) < datetime.now(timezone.utc).strftime("%Y-%m-%d")
        if state is None and past:
            copy = _read_copy(path, st)
            if copy is not None:
                self._files[path] = _FileState(st.st_ino, _head(path), st.st_size)
                return self._files[path], [copy]
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
        if past and state.offset == 0 and complete == st.st_size:
            _write_copy(path, st, pieces, bad)
        state.offset += complete
        state.bad += bad
        return state, pieces


def _day_of(path: Path) -> str:
    """'2026-01-05' of 'requests-2026-01-05.jsonl'."""
    return path.stem[-10:]


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_HEAD)


def _copy_of(path: Path) -> Path:
    return path.parent / COLUMNAR / f"{path.stem}.arrow"


def _source(st: os.stat_result) -> bytes:
    return f"{st.st_size} {st.st_mtime_ns}".encode()


def _read_copy(path: Path, st: os.stat_result) -> pa.Table | None:
    """The columnar copy of a past day's file, if it was made from the file as it is now."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(_copy_of(path)))).read_all()
    except (OSError, pa.ArrowException):
        return None
    return table if (table.schema.metadata or {}).get(_SOURCE) == _source(st) else None


def _write_copy(path: Path, st: os.stat_result, pieces: list[_Piece], bad: int) -> None:
    """Keep a past day's rows as a columnar copy (best effort: a file with damaged lines, or a folder that refuses
    the write, is simply parsed again next time)."""
    if bad or not pieces or not all(isinstance(piece, pa.Table) for piece in pieces):
        return
    copy = _copy_of(path)
    try:
        table = pa.concat_tables(pieces, promote_options="permissive")
        copy.parent.mkdir(exist_ok=True)
        partial = copy.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(
                sink, table.schema.with_metadata({_SOURCE: _source(st)})) as writer:
            writer.write_table(table)
        partial.replace(copy)  # whole or not at all, also when two processes compile the same day
    except (OSError, pa.ArrowException) as exc:
        logger.warning("could not write the columnar copy of %s: %s", path.name, exc)


def compile_day(path: Path) -> None:
    """Make the columnar copy of a finished day's file (the request log calls this when it moves on to the next
    day), so that no reader has to parse that day again."""
    kind = _cache() if path.name.startswith("cache-") else _requests()
    try:
        st = os.stat(path)
        data = path.read_bytes()
    except OSError:
        return
    if _read_copy(path, st) is None and data.endswith(b"\n"):
        pieces, bad = _parse(data, kind)
        _write_copy(path, st, pieces, bad)


