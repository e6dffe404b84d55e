"""Request logs that lose nothing, the X-Request-ID middleware and GET /metrics."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from conftest import free_port
from starlette.middleware import Middleware

from studio.telemetry.logreader import LogReader
from studio.telemetry.metrics import Metrics
from studio.telemetry.middleware import RequestIdMiddleware
from studio.runtime import Call
from studio.telemetry.requestlog import RequestLog, columns

ROOT = Path(__file__).resolve().parents[1]

# Writes rows tagged with its name from several threads, after `go` appears (so the processes overlap).
WRITER = """
import sys, threading, time
from pathlib import Path
from studio.telemetry.requestlog import RequestLog
folder, name, threads, per_thread, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
log = RequestLog(Path(folder), log_prompts=True)
while not go.exists():
    time.sleep(0.01)
def work(t):
    for i in range(per_thread):
        with log.record(client="api", endpoint="/t", modality="chat", model="m", writer=f"{name}-{t}-{i}") as rec:
            rec.set(prompt=f"{name}-{t}-{i}:" + "x" * (i * 1500 + t * 97))  # up to ~75 KB: rows > PIPE_BUF
ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
"""

# Writes rows as fast as it can until it is killed.
ENDLESS = """
import sys
from pathlib import Path
from studio.telemetry.requestlog import RequestLog
log = RequestLog(Path(sys.argv[1]), log_prompts=True)
i = 0
while True:
    log.write({"client": "api", "modality": "chat", "model": "m", "status": "ok", "prompt": "y" * (i % 5000)})
    i += 1
"""


def _lines(folder: Path) -> list[bytes]:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("requests-*.jsonl"))).splitlines()


def _check_rows(folder: Path, expected: set[str]) -> None:
    """Every line is one whole row with every column, each expected row exactly once, its prompt intact."""
    rows = [json.loads(line) for line in _lines(folder)]  # raises on an interleaved or torn line
    tags = [row["extra"]["writer"] for row in rows]
    assert len(tags) == len(expected) and set(tags) == expected
    for row in rows:
        assert tuple(row) == columns()
        assert row["prompt"].startswith(row["extra"]["writer"] + ":")
        assert row["prompt_sha256"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert row["prompt_chars"] == len(row["prompt"])


def _run(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env)


def test_eight_threads_write_every_row_once(tmp_path):
    log = RequestLog(tmp_path, log_prompts=True)

    def work(t: int) -> None:
        for i in range(50):
            with log.record(client="api", endpoint="/t", modality="chat", model="m", writer=f"t{t}-{i}") as rec:
                rec.set(prompt=f"t{t}-{i}:" + "x" * (i * 1500))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check_rows(tmp_path, {f"t{t}-{i}" for t in range(8) for i in range(50)})


def test_two_processes_share_one_folder(tmp_path):
    go = tmp_path / "go"
    procs = [_run(WRITER, tmp_path / "logs", name, 4, 50, go) for name in ("a", "b")]
    time.sleep(0.5)
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    _check_rows(tmp_path / "logs", {f"{n}-{t}-{i}" for n in "ab" for t in range(4) for i in range(50)})


def test_sigkill_mid_stream_keeps_every_complete_row(tmp_path):
    proc = _run(ENDLESS, tmp_path)
    deadline = time.monotonic() + 60
    while len(_lines(tmp_path)) < 300:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = next(tmp_path.glob("requests-*.jsonl")).read_bytes()
    complete = data.count(b"\n")
    reader = LogReader(tmp_path)
    logs = reader.read()
    assert len(logs.requests) == complete >= 300
    assert logs.partial == (0 if data.endswith(b"\n") else 1)

    # A row torn by a crash mid-write (only a part of its bytes reached the file): skipped and counted.
    path = next(tmp_path.glob("requests-*.jsonl"))
    with open(path, "ab") as fh:
        fh.write(data.splitlines()[0][:70])
    logs = reader.read()
    assert (len(logs.requests), logs.partial) == (complete, 1)

    # The next writer starts a fresh line: its row is whole, the torn one stays counted.
    RequestLog(tmp_path).write({"client": "api", "modality": "chat", "model": "after", "status": "ok"})
    logs = reader.read()
    assert (len(logs.requests), logs.partial) == (complete + 1, 1)
    assert logs.requests["model"].iloc[-1] == "after"
    assert len(LogReader(tmp_path).read().requests) == complete + 1  # a fresh reader agrees


def test_row_shape_status_and_prompt_privacy(make_studio):
    studio = make_studio()
    log = studio.log
    with log.record(client="ui", endpoint="/e", modality="image", model="m", session="s1") as rec:
        rec.first_output()
        rec.set(prompt="a secret", steps=2, adapters={"pixel": 0.5}, voice="x")
    with log.record(client="api", endpoint="/e", modality="chat", model="m") as rec:
        rec.set(stopped=True)
    with pytest.raises(ValueError), log.record(client="api", endpoint="/e", modality="chat", model="m"):
        raise ValueError("bad")

    def stream():
        with log.record(client="api", endpoint="/e", modality="chat", model="m") as rec:
            yield "piece"
            rec.set(stopped=False)  # the end: the final event follows
            yield "final"

    for reads in (1, 2):  # the consumer goes away mid-stream, then right after the final event
        gen = stream()
        for _ in range(reads):
            next(gen)
        gen.close()

    rows = [json.loads(line) for line in _lines(log.folder)]
    assert all(tuple(row) == columns() for row in rows)
    assert [(r["status"], r["error_type"]) for r in rows] == [("ok", None), ("stopped", None), ("error", "ValueError"),
                                                              ("stopped", None), ("ok", None)]
    first = rows[0]
    assert first["prompt"] is None and first["prompt_chars"] == 8
    assert first["prompt_sha256"] == hashlib.sha256(b"a secret").hexdigest()
    assert first["adapters"] == {"pixel": 0.5} and first["extra"] == {"voice": "x"} and first["session"] == "s1"
    assert first["ttft_ms"] is not None and first["latency_ms"] >= first["ttft_ms"]
    assert first["ts"].endswith("Z") and first["peak_memory_bytes"] > 0

    loud = make_studio("--log-prompts", "--log-dir", str(log.folder.parent / "loud"))
    with loud.log.record(client="ui", endpoint="/e", modality="chat", model="m") as rec:
        rec.set(prompt="kept")
    assert json.loads(_lines(loud.log.folder)[0])["prompt"] == "kept"


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_move(http, studio):
    for _ in range(3):
        response = http.get("/health")
        assert len(response.headers["x-request-id"]) == 32
    assert http.get("/health", headers={"X-Request-ID": "trace-42"}).headers["x-request-id"] == "trace-42"
    before = _samples(http.get("/metrics").text)
    health = ("http_requests_total", (("method", "GET"), ("route", "/health"), ("status", "200")))
    assert before[health] == 4

    llama = studio.registry.get("tiny-llama")
    with studio.generation(llama, Call("rest", "/generate/text")) as (_, rec):
        rec.first_output()
        rec.set(prompt_tokens=4, completion_tokens=6)
    with pytest.raises(RuntimeError), studio.generation(llama, Call("ui", "chat")):
        raise RuntimeError("boom")
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = _samples(response.text)
    model = ("model", "tiny-llama")
    assert after[health] == 4
    assert after[("http_requests_total", (("method", "GET"), ("route", "/metrics"), ("status", "200")))] == 1
    assert after[("gen_ai_server_requests_total",
                  (("client", "rest"), ("modality", "chat"), model, ("status", "ok")))] == 1
    assert after[("gen_ai_server_requests_total",
                  (("client", "ui"), ("modality", "chat"), model, ("status", "error")))] == 1
    assert after[("gen_ai_server_request_duration_seconds_count", (("modality", "chat"), model))] == 2
    assert after[("gen_ai_server_time_to_first_token_seconds_count", (("modality", "chat"), model))] == 1
    assert after[("gen_ai_server_generation_tokens_total", (model,))] == 6
    assert after[("gen_ai_server_prompt_tokens_total", (model,))] == 4
    assert after[("studio_model_loads_total", (model, ("outcome", "ok")))] == 1
    assert after[("studio_model_cache_hits_total", (model,))] == 1
    assert after[("studio_model_resident_bytes", (("modality", "chat"), model))] > 0

    assert studio.cache.unload("tiny-llama")
    final = _samples(http.get("/metrics").text)
    assert final[("studio_model_evictions_total", (model,))] == 1
    assert ("studio_model_resident_bytes", (("modality", "chat"), model)) not in final


def test_generation_rows_carry_the_response_request_id(studio):
    from studio.server import app_kwargs

    app = FastAPI(**app_kwargs(studio))

    @app.post("/probe")
    def probe() -> dict:
        with studio.generation(studio.registry.get("tiny-llama"), Call("rest", "/probe")):
            return {"ok": True}

    with TestClient(app) as client:
        ids = [client.post("/probe").headers["x-request-id"] for _ in range(2)]
    rows = [json.loads(line) for line in _lines(studio.log.folder)]
    assert [row["request_id"] for row in rows] == ids and len(set(ids)) == 2


def test_streamed_generate_text_is_logged_under_its_request_id(http, studio):
    body = {"prompt": "hello", "model": "tiny-llama", "max_new_tokens": 8, "seed": 1, "stream": True}
    with http.stream("POST", "/generate/text", json=body) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["done"] is True
    [row] = [json.loads(line) for line in _lines(studio.log.folder)]
    assert (row["request_id"], row["status"], row["endpoint"]) == (request_id, "ok", "rest:/generate/text")
    assert row["completion_tokens"] >= 1 and row["prompt_chars"] == 5 and row["prompt"] is None


def test_streaming_response_streams_through_the_middleware():
    """The first chunk reaches the client while the route still waits for the client's go-ahead."""
    metrics = Metrics()
    app = FastAPI(middleware=[Middleware(RequestIdMiddleware, metrics=metrics)])
    go = threading.Event()

    @app.get("/stream")
    def stream() -> StreamingResponse:
        def body():
            yield b"first\n"
            yield b"second\n" if go.wait(timeout=10) else b"buffered\n"

        return StreamingResponse(body(), media_type="text/plain")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.config.port}/stream"
        with httpx.stream("GET", url, timeout=20) as response:
            assert len(response.headers["x-request-id"]) == 32
            chunks = response.iter_lines()
            assert next(chunks) == "first"
            go.set()
            assert next(chunks) == "second"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert _samples(metrics.exposition().decode())[
        ("http_requests_total", (("method", "GET"), ("route", "/stream"), ("status", "200")))] == 1
