"""Reliability under load and hostile input (issue 20): each test reproduces a failure a load or fuzz run found."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from conftest import call, tiny_studio
from studio.backends.image import ImageRequest, generate_images
from studio.tiny.image import random_lora

RACE_SECONDS = 30


def test_adapter_loads_and_model_loads_never_interleave(tmp_path):
    """peft swaps a torch function process-wide while it loads an adapter; a model loading on another thread
    meanwhile failed ('_is_hf_initialized', 'Cannot copy out of meta tensor') and could leave the process unable to
    load anything. One thread reloads an adapter (its file keeps changing, so it is deleted and loaded again),
    the other loads and unloads models, for 30 s: no error, and a load afterwards works."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    studio = tiny_studio(tmp_path / "logs", "--lora-dir", str(tmp_path / "loras"))
    with studio.cache.use("tiny-sd") as lease:
        random_lora(tmp_path / "loras" / "a.safetensors", lease.model.pipe.unet, lease.model.pipe.text_encoder, seed=1)
    errors: list[str] = []
    until = time.monotonic() + RACE_SECONDS
    rounds = {"adapter": 0, "model": 0}

    def reload_adapter() -> None:
        while time.monotonic() < until:
            rounds["adapter"] += 1
            os.utime(tmp_path / "loras" / "a.safetensors", ns=(rounds["adapter"] * 10**9,) * 2)
            try:
                generate_images(studio, ImageRequest(prompt="x", model="tiny-sd", steps=1, adapters={"a": 1.0}), call())
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                errors.append(f"adapter: {exc!r}")

    def load_models() -> None:
        while time.monotonic() < until:
            model = ("tiny-llama", "tiny-vits", "tiny-qwen2")[rounds["model"] % 3]
            rounds["model"] += 1
            try:
                studio.cache.unload(model)
                with studio.cache.use(model):
                    pass
            except Exception as exc:  # noqa: BLE001
                errors.append(f"model: {exc!r}")

    try:
        workers = [threading.Thread(target=reload_adapter), threading.Thread(target=load_models)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == [] and min(rounds.values()) > 3, (rounds, errors[:3])
        with studio.cache.use("tiny-bark") as lease:  # a model not loaded before: the process still loads
            assert not lease.hit
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- no 500 from input

SURROGATE = "\\ud800"  # as JSON writes it: a lone UTF-16 surrogate, which no UTF-8 text can hold


def _raw(text: str) -> dict:
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


@pytest.mark.parametrize("path, body, status, field", [
    ("/generate/text", '{"prompt": "hi %s"}', 422, "prompt"),
    ("/generate/text", '{"messages": [{"role": "user", "content": "hi %s"}]}', 422, "messages[0].content"),
    ("/generate/text", '{"prompt": "hi", "system": "%s"}', 422, "system"),
    ("/generate/text", '{"prompt": "hi", "stream": true, "system": "%s"}', 422, "system"),
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "%s"}]}', 400,
     "messages[0].content"),
    ("/generate/speech", '{"text": "Hi %s."}', 422, "text"),
    ("/v1/audio/speech", '{"model": "piper-joe", "input": "Hi %s.", "voice": "joe"}', 400, "input"),
    ("/generate/image", '{"prompt": "a fox %s", "steps": 1}', 422, "prompt"),
    ("/v1/images/generations", '{"model": "tiny-sd-turbo", "prompt": "a fox %s"}', 400, "prompt"),
    ("/generate/3d", '{"prompt": "a chair %s", "steps": 1}', 422, "prompt"),
])
def test_text_that_is_not_valid_unicode_is_refused_naming_the_field(http, path, body, status, field):
    answer = http.post(path, **_raw(body.replace("%s", SURROGATE)))
    detail = answer.json()
    message = detail["error"]["message"] if "error" in detail else detail["detail"]
    assert answer.status_code == status and message.startswith(f"{field}: "), answer.text


@pytest.mark.parametrize("path, body, status, field", [
    ("/generate/text", {"prompt": "hi", "temperature": 1e-300}, 422, "temperature"),
    ("/generate/text", {"prompt": "hi", "repetition_penalty": 1e-300}, 422, "repetition_penalty"),
    ("/generate/text", {"prompt": "hi", "temperature": 1e-300, "stream": True}, 422, "temperature"),
    ("/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                              "temperature": 1e-300, "stream": True}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                              "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
])
def test_sampling_values_that_would_break_sampling_are_refused(http, path, body, status, field):
    """They once passed validation and crashed sampling (inf or nan probabilities) with a 500."""
    answer = http.post(path, json=body)
    detail = answer.json()
    message = detail["error"]["message"] if "error" in detail else detail["detail"]
    assert answer.status_code == status and message.startswith(f"{field}: "), answer.text


def test_a_row_is_never_lost_over_its_content(tmp_path):
    from studio.telemetry.logreader import LogReader
    from studio.telemetry.requestlog import RequestLog

    log = RequestLog(tmp_path, log_prompts=True)
    log.write({"client": "rest", "modality": "chat", "model": "m", "status": "ok", "prompt": "a \ud800 b",
               "extra": {"note\udc00": "x \udfff"}})
    [row] = LogReader(tmp_path).read().requests.to_dict("records")
    assert row["prompt"] == "a \ufffd b" and row["prompt_chars"] == 5 and log.write_errors == 0


def test_a_damaged_weights_file_is_a_clear_counted_load_failure(tmp_path, monkeypatch):
    """Random bytes in a model's safetensors file gave a bare 500 (an OverflowError while sizing it) that no
    counter saw; now it is a 502 naming the model and the file inside it, counted, and the entry stays clean."""
    import shutil

    from conftest import routes
    from studio.weights import ensure_local

    monkeypatch.setenv("STUDIO_TINY_DIR", str(tmp_path / "tiny"))
    studio = tiny_studio(tmp_path / "logs")
    folder = ensure_local(studio.registry.get("tiny-llama"))
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    with routes(studio) as http:
        answer = http.post("/generate/text", json={"prompt": "hi", "model": "tiny-llama"})
        again = http.post("/generate/text", json={"prompt": "hi", "model": "tiny-llama"})
    assert answer.status_code == again.status_code == 502
    message = answer.json()["detail"]
    assert "tiny-llama" in message and "model.safetensors" in message and str(tmp_path) not in message
    snap = studio.cache.snapshot()
    assert snap.load_failures == 2 and snap.models == [] and snap.used_bytes == 0
    shutil.rmtree(folder)  # rebuilt on the next use: the studio recovers without a restart
    with routes(studio) as http:
        assert http.post("/generate/text", json={"prompt": "hi", "model": "tiny-llama",
                                                 "max_new_tokens": 2}).status_code == 200


def test_a_long_history_is_fitted_in_linear_work(studio):
    """1,000 turns (67 KB) once took 10 s before generation: truncation tokenized every suffix again. Now each
    message is tokenized once and the template applied a bounded number of times, whatever the history's length."""
    from studio.backends.chat import fit_history

    history = []
    for i in range(1000):
        history += [{"role": "user", "content": f"Question {i}: tell me about the weather and the sea."},
                    {"role": "assistant", "content": f"Answer {i}: the quick brown fox jumps over the lazy dog."}]
    history.append({"role": "user", "content": "NEWEST: what about music?"})
    assert sum(len(m["content"]) for m in history) > 67_000
    with studio.cache.use("tiny-llama") as lease:
        tokenizer = lease.model.tokenizer

    class Counting:
        def __init__(self):
            self.texts = self.templates = 0

        def __call__(self, *args, **kwargs):
            self.texts += 1
            return tokenizer(*args, **kwargs)

        def apply_chat_template(self, *args, **kwargs):
            self.templates += 1
            return tokenizer.apply_chat_template(*args, **kwargs)

    counting = Counting()
    ids, dropped = fit_history(counting, history, 192)
    assert len(ids) <= 192 and dropped > 1900
    assert counting.texts <= len(history) and counting.templates <= 4, vars(counting)


def test_a_failed_request_leaves_the_keep_alive_connection_usable(live_server, monkeypatch):
    """After a 500 the server once closed the connection, and the client's next request on it was reset. The
    internal error is answered (500, request id) and the same connection serves the next request."""
    import http.client
    import json
    from urllib.parse import urlparse

    from studio.api import speech

    _studio, url = live_server

    def broken(*_args, **_kwargs):
        raise RuntimeError("a fault inside the service")

    monkeypatch.setattr(speech, "synthesize", broken)
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    try:
        body = json.dumps({"text": "Hello."})
        connection.request("POST", "/generate/speech", body, {"Content-Type": "application/json"})
        failed = connection.getresponse()
        detail = json.loads(failed.read())["detail"]
        assert failed.status == 500 and failed.getheader("x-request-id") in detail
        assert "a fault inside" not in detail and failed.getheader("connection") != "close"
        sock = connection.sock
        connection.request("GET", "/health")
        after = connection.getresponse()
        assert after.status == 200 and json.loads(after.read())["status"] in ("ok", "degraded")
        assert connection.sock is sock  # the same connection, not a new one
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------- bounded work

def test_an_oversized_body_is_refused_before_it_is_parsed(studio, monkeypatch):
    """A 10 MB chat prompt was parsed and tokenized (10-17 s of CPU) before being refused. Now a body over its
    route's limit is a 413 before anything reads it, whether it declares its length or streams in chunks."""
    from conftest import routes
    from studio.api import bodylimit, chat

    monkeypatch.setattr(chat, "stream_chat", lambda *a, **k: pytest.fail("the body reached the service"))
    monkeypatch.setattr(chat, "complete_chat", lambda *a, **k: pytest.fail("the body reached the service"))
    huge = ('{"prompt": "' + "word " * 2_000_000 + '"}').encode()

    def chunks():
        for start in range(0, len(huge), 65536):
            yield huge[start:start + 65536]

    with routes(studio) as http:
        for path in ("/generate/text", "/v1/chat/completions"):
            for content in (huge, chunks()):
                answer = http.post(path, content=content, headers={"Content-Type": "application/json"})
                assert answer.status_code == 413, answer.text
                detail = answer.json()
                message = detail["error"]["message"] if "error" in detail else detail["detail"]
                assert message.startswith("body: larger than the 1.00 MiB"), message
        small = http.post("/generate/image", json={"prompt": "a fox", "steps": 1, "model": "tiny-sd-turbo"})
        assert small.status_code == 200  # media routes take files: their limit follows --max-upload-size
    assert bodylimit.body_limit("/generate/image", studio.upload_limit) > 3 * studio.upload_limit
    assert bodylimit.body_limit("/generate/text", studio.upload_limit) == 2**20


def _wav() -> bytes:
    import io

    import numpy as np
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(16_000, dtype=np.float32), 16_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _multipart(fields: dict[str, str], name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "studio-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="a.wav"\r\n'
                 f'Content-Type: audio/wav\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


GONE = [  # path, JSON body (or a multipart one), the model it pins
    ("/generate/text", {"prompt": "hi", "model": "tiny-llama", "max_new_tokens": 64}, "tiny-llama"),
    ("/generate/text", {"prompt": "hi", "model": "tiny-llama", "max_new_tokens": 64, "stream": True}, "tiny-llama"),
    ("/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}, "tiny-llama"),
    ("/generate/image", {"prompt": "a fox", "model": "tiny-sd-turbo", "steps": 2}, "tiny-sd-turbo"),
    ("/v1/images/generations", {"prompt": "a fox", "model": "tiny-sd-turbo", "size": "64x64"}, "tiny-sd-turbo"),
    ("/generate/speech", {"text": "Hello there. And again.", "model": "tiny-vits"}, "tiny-vits"),
    ("/v1/audio/speech", {"input": "Hello there.", "model": "tiny-vits", "voice": "x"}, "tiny-vits"),
    ("/generate/3d", {"prompt": "a chair", "model": "tiny-shap-e", "steps": 2}, "tiny-shap-e"),
    ("/generate/video", {"prompt": "a fox", "model": "tiny-animatediff", "steps": 2, "frames": 2}, "tiny-animatediff"),
    ("/generate/transcript", None, "tiny-whisper"),
    ("/v1/audio/transcriptions", None, "tiny-whisper"),
]


@pytest.fixture(scope="module")
def gone_server(tmp_path_factory):
    from conftest import free_port, serving

    studio = tiny_studio(tmp_path_factory.mktemp("gone-logs"), "--port", str(free_port()))
    with serving(studio) as (_demo, url):
        yield studio, url


@pytest.mark.parametrize("path, body, model", GONE,
                         ids=[path + (" stream" if body and body.get("stream") else "") for path, body, _ in GONE])
def test_a_client_that_disconnects_cancels_its_generation(gone_server, monkeypatch, path, body, model):
    """A Bark request abandoned after 3 s ran on for 14 s, logged "ok", and the next request queued behind it.
    Here the generation is held (model loaded and pinned) until the client has gone; the connection's watcher must
    then set the call's cancel: the row says "cancelled" and the model is unpinned."""
    import json
    import socket
    from contextlib import contextmanager
    from urllib.parse import urlparse

    from conftest import collect_rows

    studio, url = gone_server
    started, real = threading.Event(), studio.generation

    @contextmanager
    def held(spec, call, **fields):
        with real(spec, call, **fields) as (lease, rec):
            started.set()
            assert call.cancel is not None and call.cancel.wait(120), "the client's disconnect was not noticed"
            yield lease, rec

    monkeypatch.setattr(studio, "generation", held)
    rows = collect_rows(studio)
    if body is None:
        payload, kind = _multipart({"model": model}, "file", _wav())
    else:
        payload, kind = json.dumps(body).encode(), "application/json"
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert started.wait(120), "the generation did not start"
    deadline = time.monotonic() + 120
    while not rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(row["endpoint"].split(":", 1)[1], row["status"]) for row in rows] == [(path, "cancelled")]
    entry = next(m for m in studio.cache.snapshot().models if m.id == model)
    assert entry.pins == 0


# ---------------------------------------------------------------------------------------------- smaller faults

def test_a_log_dir_that_cannot_be_made_is_one_line_and_exit_2(tmp_path):
    """It was a 17-line traceback and exit 1."""
    import subprocess
    import sys

    from test_spaces import APP

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STUDIO_LOG_DIR": ""}
    done = subprocess.run([sys.executable, str(APP), "--profile", "tiny", "--log-dir", str(blocker / "logs")],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("studio: error")]
    assert done.returncode == 2 and len(lines) == 1 and "--log-dir" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_health_is_degraded_while_log_writes_fail(studio, monkeypatch):
    from conftest import routes
    from studio.telemetry.requestlog import JsonlWriter

    real = JsonlWriter.write

    def full_disk(self, row):
        raise OSError(28, "No space left on device")

    with routes(studio) as http:
        assert http.get("/health").json()["status"] == "ok"
        monkeypatch.setattr(JsonlWriter, "write", full_disk)
        assert http.post("/generate/speech", json={"text": "Hi.", "model": "tiny-vits"}).status_code == 200
        health = http.get("/health").json()
        assert health["status"] == "degraded" and health["log_write_errors"] >= 1
        monkeypatch.setattr(JsonlWriter, "write", real)
        assert http.post("/generate/speech", json={"text": "Hi.", "model": "tiny-vits"}).status_code == 200
        assert http.get("/health").json()["status"] == "ok"


def test_the_readme_reads_logs_tolerantly(tmp_path):
    """README once suggested pandas.read_json(lines=True), which fails on a torn last line."""
    import re

    from test_spaces import ROOT

    readme = (ROOT / "README.md").read_text()
    assert "read_json(" not in readme.replace("`pandas.read_json(path, lines=True)` fails", "")
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "LogReader" in block)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "requests-2026-11-25.jsonl").write_text('{"status": "ok", "ts": "2026-11-25T10:00:00Z"}\n'
                                                                 '{"status": "o')
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(snippet, scope)  # noqa: S102 - the README's own code
    finally:
        os.chdir(cwd)
    assert len(scope["df"]) == 1 and scope["logs"].partial == 1
