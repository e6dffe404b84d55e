"""What the request log costs: HTTP throughput with and without the middleware, the Analytics figures on
1,000,000 rows, and the writer's rows per second.

- Throughput: the studio's own app (routes, error handlers, middleware from `app_kwargs`) is served twice by
  uvicorn in one server process, once with the middleware and once without; a keep-alive client sends GET
  /health in short batches alternating between the two (rotating which goes first), and the ratio is the median
  over rounds. The same comparison in-process (the ASGI app called directly on an async route, no network, no
  client, no thread hop) shows the middleware's cost alone, the strictest view.
- Analytics: a synthetic 1,000,000-row frame (30 days, 7 models of 4 modalities, errors, LoRA adapters) typed
  as the reader types it; `analytics_1m_rows_s` is filtering, every aggregate and every plotly figure
  (`analytics.report`) on that frame, no parsing, median of 3. The same rows written as the request log writes
  them (30 daily JSON Lines files, about 600 MB, in the page cache) give `analytics_cold_1m_rows_s`: a new
  `LogReader` reads them, with the past days' columnar copies the writer makes when a day ends, then the same
  report, median of 3 (the details hold the same when every file is parsed, without copies); its CPU seconds and the load average are in
  the details (on a shared machine the wall time mostly measures the neighbours). `analytics_refresh_s`: 1,000
  rows appended to today's file, then read (only the new bytes) and report again, for the tab's default range
  (last 24 hours), median of 3; the details hold the same for all time, where the report of a million rows
  dominates. Parsing rows/s on 50,000 rows is kept in the details.
- Writer: rows/s through `RequestLog.write` (shape, encode, locked append; fsync at most once a second), from
  one thread and from four.

    python bench/request_log.py            # writes bench/results/logging.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the repository, so `studio` imports

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import pandas as pd  # noqa: E402

from studio.telemetry import analytics, logreader  # noqa: E402
from studio.telemetry.requestlog import RequestLog, utc_stamp  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "logging.json"
CATALOG = [("chat", "tiny-llama"), ("chat", "tiny-qwen2"), ("image", "tiny-sd"), ("image", "tiny-sd-turbo"),
           ("text-to-speech", "piper-joe"), ("text-to-speech", "tiny-vits"), ("3d", "tiny-shap-e")]
ENDPOINTS = {"chat": "rest:/generate/text", "image": "rest:/generate/image", "text-to-speech": "rest:/generate/speech",
             "3d": "rest:/generate/3d"}
ERRORS = ["CacheBusy", "ModelLoadError", "ValueError", "RuntimeError"]
ADAPTERS = [{"pixel-art": 0.8}, {"watercolor": 0.6}, {"pixel-art": 0.5, "ink": 1.0}, {"anime": 0.9}]


# ---------------------------------------------------------------------------------------------------- throughput

def _apps():
    from fastapi import FastAPI

    from studio.config import parse_settings
    from studio.runtime import create_studio
    from studio.server import app_kwargs

    settings = parse_settings(["--profile", "tiny", "--log-dir", tempfile.mkdtemp(), "--memory-budget", "1GiB"],
                              env={})
    studio = create_studio(settings)
    apps = FastAPI(**app_kwargs(studio)), FastAPI(**{**app_kwargs(studio), "middleware": []})
    for app in apps:  # the cheapest route there is (no thread hop): the middleware's cost alone
        app.get("/ping")(ping)
    return apps


async def ping() -> dict:
    return {"ok": True}


def serve(port_with: int, port_without: int) -> None:
    """The server process: both apps on one event loop, so they share the CPU alike."""
    import uvicorn

    with_mw, without = _apps()
    servers = [uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                             access_log=False, lifespan="off"))
               for app, port in ((with_mw, port_with), (without, port_without))]

    async def main() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    asyncio.run(main())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare(spend: Callable[[str, int], float], rounds: int, batches: int, per_batch: int) -> dict:
    """Side by side: `spend(variant, n)` serves n requests and returns the seconds taken. Each round alternates
    short batches of the two variants (rotating which goes first), so load that drifts on a shared machine hits
    both alike; a round's ratio is throughput with / without over its summed times; the result is the median."""
    ratios, rates = [], {"with": [], "without": []}
    for r in range(rounds):
        spent = {"with": 0.0, "without": 0.0}
        for b in range(batches):
            for variant in (("with", "without") if (r + b) % 2 == 0 else ("without", "with")):
                spent[variant] += spend(variant, per_batch)
        ratios.append(spent["without"] / spent["with"])
        for variant, seconds in spent.items():
            rates[variant].append(batches * per_batch / seconds)
    return {"ratio": statistics.median(ratios), "with_rps": statistics.median(rates["with"]),
            "without_rps": statistics.median(rates["without"]), "requests": 2 * rounds * batches * per_batch}


def http_throughput(rounds: int, batches: int, per_batch: int) -> dict:
    ports = {"with": _free_port(), "without": _free_port()}
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(ports["with"]), str(ports["without"])])
    urls = {name: f"http://127.0.0.1:{port}/health" for name, port in ports.items()}
    try:
        with httpx.Client(timeout=30) as client:

            def spend(variant: str, n: int) -> float:
                start = time.perf_counter()
                for _ in range(n):
                    client.get(urls[variant]).raise_for_status()
                return time.perf_counter() - start

            deadline = time.monotonic() + 180
            for url in urls.values():  # wait for the server
                while True:
                    try:
                        client.get(url).raise_for_status()
                        break
                    except httpx.TransportError:
                        if time.monotonic() > deadline or server.poll() is not None:
                            raise
                        time.sleep(0.2)
            compare(spend, 1, 2, per_batch)  # warm up
            return compare(spend, rounds, batches, per_batch)
    finally:
        server.terminate()
        server.wait(timeout=30)


def asgi_throughput(rounds: int, batches: int, per_batch: int) -> dict:
    """The app called directly on an async route: the middleware's own cost, with nothing else around it."""
    apps = dict(zip(("with", "without"), _apps()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/ping", "raw_path": b"/ping", "root_path": "", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def call(app, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        return time.perf_counter() - start

    loop = asyncio.new_event_loop()
    try:
        def spend(variant: str, n: int) -> float:
            return loop.run_until_complete(call(apps[variant], n))

        compare(spend, 1, 2, per_batch)  # warm up (Starlette builds the middleware stack on the first call)
        return compare(spend, rounds, batches, per_batch)
    finally:
        loop.close()


# ---------------------------------------------------------------------------------------------------- analytics

def _categorical(codes: np.ndarray, names: list[str]) -> pd.Categorical:
    return pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype="str"))


def synthetic_logs(n: int, now: datetime, seed: int = 0) -> logreader.Logs:
    """`n` request rows over 30 days, typed exactly as `logreader.requests_frame` types parsed rows."""
    rng = np.random.default_rng(seed)
    start = now - timedelta(days=30)
    micros = np.sort(rng.integers(0, 30 * 86400 * 10**6, n))
    which = rng.integers(0, len(CATALOG), n)
    modality_names = sorted({m for m, _ in CATALOG})
    modality = np.array([modality_names.index(m) for m, _ in CATALOG])[which]
    is_chat, is_image = modality == modality_names.index("chat"), modality == modality_names.index("image")
    status = rng.choice(3, n, p=[0.94, 0.04, 0.02])  # ok, error, stopped
    error_code = np.where(status == 1, rng.integers(0, len(ERRORS), n), -1)
    latency = rng.lognormal(6.5, 0.8, n)
    nan = np.full(n, np.nan)
    adapter_pick = rng.integers(0, len(ADAPTERS) * 2, n)
    adapters = np.full(n, None, dtype=object)
    chosen = is_image & (adapter_pick < len(ADAPTERS))
    adapters[chosen] = [ADAPTERS[i] for i in adapter_pick[chosen]]
    df = pd.DataFrame({
        "ts": (pd.Timestamp(start) + pd.to_timedelta(micros, unit="us")).astype("datetime64[us, UTC]"),
        "request_id": pd.Series([f"{i:032x}" for i in range(n)], dtype=object),
        "client": _categorical(rng.integers(0, 4, n), ["gradio", "openai", "rest", "ui"]),
        "session": pd.Series([None] * n, dtype=object),
        "endpoint": _categorical(modality, [ENDPOINTS[m] for m in modality_names]),
        "modality": _categorical(modality, modality_names),
        "model": _categorical(which, [model for _, model in CATALOG]),
        "adapters": adapters,
        "status": _categorical(status, ["ok", "error", "stopped"]),
        "error_type": _categorical(error_code, ERRORS),
        "queue_ms": rng.exponential(5, n),
        "latency_ms": latency,
        "ttft_ms": np.where(is_chat | is_image, latency * rng.uniform(0.05, 0.3, n), nan),
        "load_ms": nan,
        "prompt_tokens": np.where(is_chat, rng.integers(5, 500, n), nan).astype("float64"),
        "completion_tokens": np.where(is_chat, rng.integers(1, 512, n), nan).astype("float64"),
        "steps": np.where(is_image, rng.integers(1, 30, n), nan).astype("float64"),
        "seed": pd.Series([None] * n, dtype=object),
        "images": np.where(is_image, 1.0, nan),
        "output_pixels": np.where(is_image, 512 * 512, nan),
        "audio_seconds": np.where(modality == modality_names.index("text-to-speech"), rng.uniform(1, 20, n), nan),
        "pieces": np.where(modality == modality_names.index("text-to-speech"), rng.integers(1, 8, n), nan),
        "faces": np.where(modality == modality_names.index("3d"), rng.integers(1000, 50000, n), nan).astype("float64"),
        "cache": _categorical(rng.choice(2, n, p=[0.9, 0.1]), ["hit", "load"]),
        "peak_memory_bytes": rng.uniform(1e9, 8e9, n),
        "prompt_chars": rng.integers(10, 2000, n).astype("float64"),
        "prompt_sha256": pd.Series(["0" * 64] * n, dtype=object),
        "prompt": pd.Series([None] * n, dtype=object),
        "external": pd.Series([False] * n, dtype=object),
        "extra": pd.Series([None] * n, dtype=object),
    })
    events = n // 200
    cache = pd.DataFrame({
        "ts": (pd.Timestamp(start) + pd.to_timedelta(np.sort(rng.integers(0, 30 * 86400 * 10**6, events)),
                                                     unit="us")).astype("datetime64[us, UTC]"),
        "event": _categorical(rng.choice(3, events, p=[0.6, 0.05, 0.35]), ["load", "load_failed", "evict"]),
        "model": _categorical(rng.integers(0, len(CATALOG), events), [model for _, model in CATALOG]),
        "seconds": rng.uniform(0.5, 30, events),
        "bytes": rng.uniform(1e8, 5e9, events),
        "error_type": _categorical(np.full(events, -1), ERRORS),
    })
    reference = logreader.requests_frame([])
    for column in reference.columns.difference(df.columns):  # other modalities' columns: empty on these rows
        df[column] = nan
    df = df[reference.columns]
    assert df.dtypes.astype(str).tolist() == reference.dtypes.astype(str).tolist(), "synthetic frame drifted"
    return logreader.Logs(df, cache)


def analytics_time(logs: logreader.Logs, selection: analytics.Filters) -> dict:
    """Aggregation alone: every figure from frames already typed (no parsing)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        result = analytics.report(logs, selection)
        times.append(time.perf_counter() - start)
    assert result.totals["requests"] == len(logs.requests) and len(result.figures) == len(analytics.FIGURES)
    return {"seconds": statistics.median(times), "all_runs": [round(t, 3) for t in times]}


def parse_rate(rows: int, now: datetime) -> float:
    """Rows per second of a cold read (JSON Lines -> typed frame) of realistic rows."""
    folder = Path(tempfile.mkdtemp())
    log = RequestLog(folder)
    records = synthetic_logs(rows, now, seed=1).requests.head(rows)
    with open(folder / f"requests-{now:%Y-%m-%d}.jsonl", "wb") as fh:
        for record in records.to_dict("records"):
            record["ts"] = utc_stamp(record["ts"].to_pydatetime())
            fh.write(orjson.dumps(log.shape(record), default=str, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    start = time.perf_counter()
    logs = logreader.LogReader(folder).read()
    seconds = time.perf_counter() - start
    assert len(logs.requests) == rows
    return rows / seconds


def _write_days(folder: Path, prefix: str, df: pd.DataFrame) -> None:
    """`df` as JSON Lines, one file per UTC day, appended: compact JSON with unescaped slashes, as orjson writes."""
    stamps = df["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str[:-3] + "Z"
    for day, part in df.assign(ts=stamps).groupby(stamps.str[:10]):
        text = part.to_json(orient="records", lines=True).replace("\\/", "/")
        with open(folder / f"{prefix}-{day}.jsonl", "a") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")


def write_requests(folder: Path, df: pd.DataFrame, seed: int = 2) -> None:
    """Request rows as the request log writes them: times rounded as the writer rounds them, every request with
    a seed, speech rows with an extra field (the clip count)."""
    df = df.copy()
    rng = np.random.default_rng(seed)
    for c in ("queue_ms", "latency_ms", "ttft_ms", "load_ms"):
        df[c] = df[c].round(1)
    df["audio_seconds"] = df["audio_seconds"].round(3)
    df["peak_memory_bytes"] = df["peak_memory_bytes"].round()
    df["seed"] = pd.Series(rng.integers(0, 2**32, len(df)).tolist(), index=df.index, dtype=object)
    speech = (df["modality"] == "text-to-speech").to_numpy()
    extra = np.full(len(df), None, dtype=object)
    extra[speech] = [{"pieces": int(k)} for k in rng.integers(1, 6, speech.sum())]
    df["extra"] = extra
    _write_days(folder, "requests", df)


def cold_times(folder: Path, selection: analytics.Filters, rows: int, copies: bool, runs: int = 3) -> dict:
    """Seconds from a new reader to every figure: read the files on disk, filter, aggregate, draw. With `copies`,
    the past days have their columnar copies, as the writer leaves them when a day ends (made before the clock
    starts); without, every run parses all the JSON Lines (the reader then writes the copies: that is part of the
    run). The CPU seconds (every thread of the process) tell what an idle machine would take when this one is
    shared."""
    today = f"{datetime.now(timezone.utc):%Y-%m-%d}.jsonl"  # still being written: no copy
    times, cpu, load = [], [], []
    for _ in range(runs):
        shutil.rmtree(folder / logreader.COLUMNAR, ignore_errors=True)
        if copies:
            for path in sorted(folder.glob("*.jsonl")):
                if not path.name.endswith(today):
                    logreader.compile_day(path)
        load.append(os.getloadavg()[0])
        start, start_cpu = time.perf_counter(), time.process_time()
        result = analytics.report(logreader.LogReader(folder).read(selection.start, selection.end), selection)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        assert result.totals["requests"] == rows and result.partial == 0
        del result  # one million rows at a time
    return {"seconds": statistics.median(times), "all_runs": [round(t, 3) for t in times],
            "cpu_s": round(statistics.median(cpu), 3), "load_average": round(statistics.median(load), 1)}


def refresh_times(folder: Path, now: datetime, selections: dict[str, analytics.Filters], rounds: int = 3,
                  rows: int = 1_000) -> dict[str, dict[str, float]]:
    """Per selection, the median seconds to read, and to read and report, after `rows` new requests were
    appended to today's file; each selection has its own reader, warm as the tab's is."""
    readers = {name: logreader.LogReader(folder) for name in selections}
    for name, reader in readers.items():
        reader.read(selections[name].start, selections[name].end)
    times = {name: {"read_s": [], "total_s": []} for name in selections}
    for r in range(rounds):
        new = synthetic_logs(rows, now, seed=100 + r).requests
        new["ts"] = pd.Series(pd.Timestamp(now) - pd.to_timedelta(np.linspace(60, 1, rows), unit="s")).astype(
            "datetime64[us, UTC]")  # the last minute: today's file
        write_requests(folder, new, seed=100 + r)
        for name, reader in readers.items():
            selection = selections[name]
            start = time.perf_counter()
            logs = reader.read(selection.start, selection.end)
            read = time.perf_counter()
            analytics.report(logs, selection)
            times[name]["read_s"].append(read - start)
            times[name]["total_s"].append(time.perf_counter() - start)
    return {name: {k: round(statistics.median(v), 3) for k, v in kinds.items()} for name, kinds in times.items()}


# ---------------------------------------------------------------------------------------------------- writer

def writer_rate(seconds: float, threads: int) -> float:
    log = RequestLog(Path(tempfile.mkdtemp()))
    fields = {"client": "rest", "endpoint": "rest:/generate/text", "modality": "chat", "model": "tiny-llama",
              "status": "ok", "queue_ms": 0.1, "latency_ms": 812.5, "ttft_ms": 40.2, "prompt_tokens": 37,
              "completion_tokens": 128, "seed": 1234, "cache": "hit", "prompt": "Tell me about the sea. " * 4}
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def work(t: int) -> None:
        while time.perf_counter() < stop:
            log.write(fields)
            counts[t] += 1

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    log.close()
    assert log.write_errors == 0
    return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows for the analytics timing")
    parser.add_argument("--rounds", type=int, default=7, help="throughput rounds (the median is reported)")
    parser.add_argument("--batches", type=int, default=10, help="alternating batches per round and variant")
    parser.add_argument("--per-batch", type=int, default=25, help="HTTP requests per batch")
    parser.add_argument("--serve", nargs=2, type=int, metavar=("PORT_WITH", "PORT_WITHOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return

    now = datetime.now(timezone.utc)
    logs = synthetic_logs(args.rows, now)
    whole = analytics.Filters(start=now - timedelta(days=30), end=now)
    figures = analytics_time(logs, whole)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_requests(folder, logs.requests)
        _write_days(folder, "cache", logs.cache)
        del logs
        log_bytes = sum(path.stat().st_size for path in folder.iterdir())
        cold = cold_times(folder, whole, args.rows, copies=True)
        parsed = cold_times(folder, whole, args.rows, copies=False)
        refresh = refresh_times(folder, now, {"last_24_hours": analytics.Filters(start=now - timedelta(days=1)),
                                              "all_time": analytics.Filters()})
    parse = parse_rate(50_000, now)
    single, four = writer_rate(3.0, 1), writer_rate(3.0, 4)
    http = http_throughput(args.rounds, args.batches, args.per_batch)
    asgi = asgi_throughput(args.rounds, args.batches, args.per_batch * 4)
    result = {
        "throughput_ratio": round(http["ratio"], 3),
        "analytics_1m_rows_s": round(figures["seconds"], 3),
        "analytics_cold_1m_rows_s": round(cold["seconds"], 3),
        "analytics_refresh_s": refresh["last_24_hours"]["total_s"],
        "rows_per_s": round(single),
        "details": {
            "http": {k: round(v, 3 if k == "ratio" else 1) if isinstance(v, float) else v for k, v in http.items()},
            "asgi_in_process": {k: round(v, 3) if k == "ratio" else round(v) for k, v in asgi.items()},
            "analytics_rows": args.rows,
            "analytics_runs_s": figures["all_runs"],
            "analytics_cold_runs_s": cold["all_runs"],
            "analytics_cold_cpu_s": cold["cpu_s"],
            "analytics_cold_load_average": cold["load_average"],
            "analytics_cold_without_copies_s": round(parsed["seconds"], 3),
            "analytics_cold_without_copies_runs_s": parsed["all_runs"],
            "analytics_cold_without_copies_cpu_s": parsed["cpu_s"],
            "analytics_log_mb": round(log_bytes / 1e6),
            "analytics_refresh_after_1000_rows": refresh,
            "parse_rows_per_s": round(parse),
            "writer_rows_per_s_4_threads": round(four),
            "machine": f"{os.cpu_count()} CPU cores, shared with other work while measured",
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"throughput_ratio     {result['throughput_ratio']}  (HTTP /health with / without middleware: "
          f"{http['with_rps']:.0f} / {http['without_rps']:.0f} req/s; in-process ASGI /ping {asgi['ratio']:.3f})")
    print(f"analytics_1m_rows_s  {result['analytics_1m_rows_s']}  (every aggregate and figure from {args.rows:,} "
          f"rows; JSON Lines parse {parse:,.0f} rows/s)")
    print(f"analytics_cold_1m_rows_s  {result['analytics_cold_1m_rows_s']}  (a new reader on {args.rows:,} rows in 30 "
          f"daily files, the past days' columnar copies made as the writer makes them: read, aggregate, draw; "
          f"{cold['cpu_s']} CPU s, load average {cold['load_average']}; parsing all {log_bytes / 1e6:,.0f} MB of "
          f"JSON Lines instead: {parsed['seconds']:.3f} s, {parsed['cpu_s']} CPU s)")
    print(f"analytics_refresh_s  {result['analytics_refresh_s']}  (1,000 rows appended, read + report, last 24 hours; "
          f"all time: read {refresh['all_time']['read_s']} s, with report {refresh['all_time']['total_s']} s)")
    print(f"rows_per_s           {result['rows_per_s']}  (one thread; {four:,.0f} with four)")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
