"""External OpenAI-compatible providers: a second studio process serves the first one's external models; a stub
server plays a provider that fails; a closed port plays one that is down."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import openai
import pytest
import soundfile
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from conftest import call, free_port
from studio.backends.chat import ChatRequest, complete_chat
from studio.backends.image import ImageRequest, generate_images
from studio.backends.remote import ProviderError
from studio.backends.speech import SpeechRequest, synthesize
from studio.config import ConfigError, parse_settings
from studio.runtime import create_studio
from studio.server import launch
from studio.ui import chat_tab

ROOT = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "Write a poem about the moon"}]
GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for file in sorted(folder.glob("requests-*.jsonl")) for line in file.read_text().split("\n")
            if line.strip()]


@pytest.fixture(scope="module")
def studio_b(tmp_path_factory):
    """The provider: another studio process (tiny profile) on its own loopback port; yields (url, log folder).

    It starts in the background (studio A starts meanwhile); `studio_a` waits for it."""
    logs = tmp_path_factory.mktemp("provider-logs")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py", "--profile", "tiny", "--port", str(port), "--log-dir",
                             str(logs), "--memory-budget", "2GiB"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield f"http://127.0.0.1:{port}", logs, proc
    proc.terminate()
    proc.wait(timeout=30)


def wait_until_serving(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail(f"the provider studio did not start (exit code {proc.poll()})")


@pytest.fixture(scope="module")
def stub():
    """A provider that answers every chat request with the HTTP status named by the model ("429", "500", ...),
    after checking the API key; "slow" answers after 3 s."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        model = (await request.json())["model"]
        if request.headers.get("authorization") != "Bearer right-key":
            return JSONResponse({"error": {"message": "Incorrect API key provided"}}, status_code=401)
        if model == "slow":
            await asyncio.sleep(3)
            model = "500"
        return JSONResponse({"error": {"message": f"stub failure {model}"}}, status_code=int(model))

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


PROVIDERS = """
- name: studio-b
  base_url: {b}/v1
  extensions: true
  models:  # no options: studio B publishes its models' limits and defaults
    - {{id: remote-llama, name: tiny-llama, modality: chat, label: Tiny Llama on B}}
    - {{id: remote-sd, name: tiny-sd-turbo, modality: image}}
    - {{id: remote-joe, name: piper-joe, modality: text-to-speech}}
    - {{id: remote-sphinx, name: pocketsphinx-en, modality: speech-to-text}}
- name: down
  base_url: http://127.0.0.1:{closed}/v1
  max_retries: 0
  models: [{{id: down-llama, modality: chat}}]
- name: stub
  base_url: {stub}/v1
  api_key_env: STUDIO_TEST_STUB_KEY
  timeout: 0.5
  max_retries: 0
  models: [{{id: stub-429, name: "429", modality: chat}}, {{id: stub-500, name: "500", modality: chat}},
           {{id: stub-503, name: "503", modality: chat}}, {{id: stub-slow, name: slow, modality: chat}}]
- name: stub-wrong-key
  base_url: {stub}/v1
  api_key_env: STUDIO_TEST_WRONG_KEY
  max_retries: 0
  models: [{{id: stub-key, name: "200", modality: chat}}]
- name: no-key
  base_url: {stub}/v1
  api_key_env: STUDIO_TEST_UNSET_KEY
  models: [{{id: stub-unset, modality: chat}}]
"""


@pytest.fixture(scope="module")
def studio_a(studio_b, stub, tmp_path_factory):
    """The studio under test, with studio B, a closed port and the stub as providers, served on its own port."""
    tmp = tmp_path_factory.mktemp("studio-a")
    (tmp / "providers.yaml").write_text(PROVIDERS.format(b=studio_b[0], closed=free_port(), stub=stub))
    settings = parse_settings(["--profile", "tiny", "--port", str(free_port()), "--log-dir", str(tmp / "logs"),
                               "--memory-budget", "2GiB", "--providers", str(tmp / "providers.yaml")], env={})
    studio = create_studio(settings)
    demo, url = launch(studio, block=False)
    wait_until_serving(studio_b[0], studio_b[2])
    with pytest.MonkeyPatch.context() as env:  # the keys are read when a model is first used
        env.setenv("STUDIO_TEST_STUB_KEY", "right-key")
        env.setenv("STUDIO_TEST_WRONG_KEY", "wrong-key")
        env.delenv("STUDIO_TEST_UNSET_KEY", raising=False)
        yield studio, url.rstrip("/")
    demo.close()


@pytest.fixture
def api(studio_a) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{studio_a[1]}/v1", api_key="none", max_retries=0, timeout=60)


def local_greedy_reply(studio) -> str:
    """What tiny-llama answers here; studio B builds the same tiny model from the same folder."""
    return complete_chat(studio, ChatRequest(messages=HELLO, model="tiny-llama", **GREEDY), call()).text


def test_external_models_join_the_pickers_and_the_model_list(studio_a, api):
    studio = studio_a[0]
    assert "remote-llama" in studio.models("chat") and "tiny-llama" in studio.models("chat")
    assert "remote-sd" in studio.models("image") and "remote-joe" in studio.models("text-to-speech")
    spec = studio.registry.get("remote-llama")
    assert spec.external and spec.label == "Tiny Llama on B · studio-b (external)"
    listed = {m.id: m for m in api.models.list()}
    assert listed["remote-llama"].owned_by == "studio-b" and listed["remote-llama"].model_extra["external"]
    assert listed["tiny-llama"].owned_by == "studio" and not listed["tiny-llama"].model_extra["external"]


def test_chat_tab_streams_a_reply_made_by_the_provider(studio_a, studio_b):
    studio, b_logs = studio_a[0], studio_b[1]
    updates = list(chat_tab.respond(chat_tab.runner(studio), HELLO, "remote-llama", "", GREEDY["max_new_tokens"], 0.0,
                                    1.0, 0, 1.0, None, session="s1"))
    reply = updates[-1][0][-1]["content"]
    assert len(updates) > 2 and reply == local_greedy_reply(studio)  # streamed, and B's tiny-llama wrote it
    assert "tokens" in updates[-1][1]
    row_a = next(r for r in _rows(studio.log.folder) if r["model"] == "remote-llama")
    assert (row_a["external"], row_a["client"], row_a["status"]) == (True, "ui", "ok")
    row_b = next(r for r in reversed(_rows(b_logs)) if r["model"] == "tiny-llama")
    assert (row_b["client"], row_b["endpoint"], row_b["external"]) == ("openai", "openai:/v1/chat/completions", False)
    assert row_a["completion_tokens"] == row_b["completion_tokens"] and row_a["load_ms"] < 1000


def test_openai_api_streams_through_to_the_provider(studio_a, api):
    stream = api.chat.completions.create(model="remote-llama", messages=HELLO, max_tokens=12, temperature=0,
                                         stream=True, extra_body={"top_k": 0, "repetition_penalty": 1.0})
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == local_greedy_reply(studio_a[0])
    row = [r for r in _rows(studio_a[0].log.folder) if r["model"] == "remote-llama"][-1]
    assert (row["external"], row["client"], row["endpoint"]) == (True, "openai", "openai:/v1/chat/completions")


def test_images_and_speech_come_from_the_provider_with_its_own_defaults(studio_a):
    """No steps and no voice in the requests, and none in the providers file: the provider's defaults apply (a
    studio provider publishes them), not generic ones it would refuse."""
    studio = studio_a[0]
    remote = generate_images(studio, ImageRequest(prompt="a lighthouse", model="remote-sd", seed=9, n=2), call("ui"))
    local = generate_images(studio, ImageRequest(prompt="a lighthouse", model="tiny-sd-turbo", seed=9, n=2),
                            call("ui"))
    for theirs, ours in zip(remote.images, local.images, strict=True):  # seeds, steps and size went along
        assert np.array_equal(np.asarray(theirs), np.asarray(ours))
    clip = synthesize(studio, SpeechRequest(text="Hello from the other studio.", model="remote-joe"), call("ui"))
    assert clip.sample_rate == 22050 and clip.seconds > 0.5 and np.abs(clip.audio).max() > 0.01


def test_speech_to_text_comes_from_the_provider_chunk_by_chunk(studio_a, studio_b):
    """Studio B's PocketSphinx hears Piper's words as this studio's own does; B logs the request as an OpenAI one,
    and its languages reach this studio's checks."""
    from studio.backends.transcription import TranscriptionRequest, transcribe, validate
    from studio.contract import InputError

    studio = studio_a[0]
    spoken = synthesize(studio, SpeechRequest(text="Please open the door and turn on the light.", model="piper-joe"),
                        call())
    buffer = io.BytesIO()
    soundfile.write(buffer, spoken.audio, spoken.sample_rate, format="WAV", subtype="PCM_16")
    wav = buffer.getvalue()
    theirs = transcribe(studio, TranscriptionRequest(wav, "door.wav", "remote-sphinx"), call("ui"))
    ours = transcribe(studio, TranscriptionRequest(wav, "door.wav", "pocketsphinx-en"), call("ui"))
    assert "open the door" in theirs.text and theirs.text == ours.text
    assert theirs.transcript.language == "en" and len(theirs.transcript.segments) == len(ours.transcript.segments)
    row_b = next(r for r in reversed(_rows(studio_b[1])) if r["model"] == "pocketsphinx-en")
    assert row_b["endpoint"] == "openai:/v1/audio/transcriptions" and row_b["audio_in_seconds"] > 1
    with pytest.raises(InputError, match="^language: remote-sphinx hears only english"):
        validate(studio, TranscriptionRequest(wav, "door.wav", "remote-sphinx", language="fr"))


def test_a_studio_provider_lends_its_limits_to_the_pickers_and_checks(studio_a):
    from studio.backends.image import ImageOptions, validate
    from studio.contract import InputError

    studio = studio_a[0]
    studio.model("remote-sd", "image")  # the first use asks studio B once
    opts = ImageOptions.of(studio.registry.get("remote-sd"))
    assert (opts.steps, opts.max_steps, opts.max_size, opts.negative_prompt) == (1, 4, 128, False)
    with pytest.raises(InputError, match="^steps: must be from 1 to 4 for remote-sd"):
        validate(studio, ImageRequest(prompt="a lighthouse", model="remote-sd", steps=9))
    assert studio.registry.get("remote-llama").options["max_new_tokens"] == 128


def test_a_provider_that_is_down_gives_a_clear_error_and_the_studio_keeps_working(studio_a, api):
    studio = studio_a[0]
    with pytest.raises(gr.Error) as shown:
        list(chat_tab.respond(chat_tab.runner(studio), HELLO, "down-llama", "", 8, 0.0, 1.0, 0, 1.0, None,
                              session="s2"))
    assert "cannot reach provider down" in shown.value.message and "refused" in shown.value.message
    with pytest.raises(openai.APIStatusError) as caught:
        api.chat.completions.create(model="down-llama", messages=HELLO, stream=True)
    assert caught.value.status_code == 502 and "cannot reach provider down" in caught.value.body["message"]
    assert api.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=4).choices[0].message.content
    failed = [r for r in _rows(studio.log.folder) if r["model"] == "down-llama"]
    assert [(r["status"], r["external"]) for r in failed] == [("error", True)] * 2


@pytest.mark.parametrize("model, status, words", [
    ("stub-key", 502, "refused the API key (HTTP 401): Incorrect API key provided; check STUDIO_TEST_WRONG_KEY"),
    ("stub-429", 429, "is rate-limiting requests (HTTP 429)"),
    ("stub-500", 502, "failed (HTTP 500): stub failure 500"),
    ("stub-503", 503, "failed (HTTP 503)"),
    ("stub-slow", 504, "did not answer within 0.5 s"),
    ("stub-unset", 503, "set the environment variable STUDIO_TEST_UNSET_KEY"),
])
def test_provider_failures_become_clear_errors_on_every_surface(studio_a, api, model, status, words):
    with pytest.raises(ProviderError) as raised:
        complete_chat(studio_a[0], ChatRequest(messages=HELLO, model=model), call("ui"))
    assert raised.value.status == status and words in str(raised.value)
    with pytest.raises(openai.APIStatusError) as caught:
        api.chat.completions.create(model=model, messages=HELLO)
    assert caught.value.status_code == status and words in caught.value.body["message"]
    rest = httpx.post(f"{studio_a[1]}/generate/text", json={"model": model, "messages": HELLO}, timeout=30)
    assert rest.status_code == status and words in rest.json()["detail"]


@pytest.mark.parametrize("text, words", [
    ("name: x", "must hold a YAML list of providers"),
    ("- {name: x, models: [{id: a, modality: chat}]}", "provider 1: base_url must be a non-empty string"),
    ("- {name: x, base_url: localhost:8000, models: [{id: a, modality: chat}]}", "must start with http://"),
    ("- {name: x, base_url: 'http://h/v1', models: [{id: a, modality: video}]}", "model 1: modality 'video'"),
    ("- {name: x, base_url: 'http://h/v1', modles: []}", "unknown key 'modles'"),
    ("- {name: x, base_url: 'http://h/v1', timeout: soon, models: [{id: a, modality: chat}]}", "timeout must be"),
    ("- {name: x, base_url: 'http://h/v1', models: [{id: tiny-llama, modality: chat}]}",
     "model id 'tiny-llama' is already taken"),
])
def test_a_bad_providers_file_stops_start_up_naming_the_entry(tmp_path, text, words):
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        create_studio(parse_settings(["--profile", "tiny", "--log-dir", str(tmp_path), "--providers", str(path)],
                                     env={}))
    assert str(raised.value).startswith("--providers:") and words in str(raised.value)
