"""The OpenAI-compatible API, used with the official `openai` package against the real running server."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile
from PIL import Image

from conftest import free_port
from studio.server import launch

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A studio with an API key and a LoRA adapter of its own, serving on a free port: (studio, base url)."""
    from studio.config import parse_settings
    from studio.runtime import create_studio
    from studio.tiny.image import random_lora

    tmp = tmp_path_factory.mktemp("openai-api")
    settings = parse_settings(["--profile", "tiny", "--port", str(free_port()), "--log-dir", str(tmp / "logs"),
                               "--lora-dir", str(tmp / "loras"), "--memory-budget", "4GiB", "--api-key", KEY], env={})
    studio = create_studio(settings)
    with studio.cache.use("tiny-sd-turbo") as lease:
        pipe = lease.model.pipe
        random_lora(tmp / "loras" / "ink.safetensors", pipe.unet, pipe.text_encoder, seed=3, strength=0.5)
    demo, url = launch(studio, block=False)
    yield studio, url.rstrip("/")
    demo.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def rows(server):
    """The request-log rows written during the test."""
    written: list[dict] = []
    server[0].log.add_listener(written.append)
    return written


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


def test_model_list_has_every_model_with_its_limits(server, client):
    models = {m.id: m for m in client.models.list()}
    studio = server[0]
    assert set(models) == {s.id for s in studio.registry} | set(studio.registry.aliases)
    assert models["tiny-llama"].owned_by == "studio"
    assert models["tiny-sd-turbo"].model_extra["options"]["max_steps"] == 4  # the caps another studio reads
    assert models["tiny-shap-e"].model_extra["modality"] == "3d"
    assert models["tiny-llama"].model_extra["modality"] == "chat"
    assert models["piper-joe"].model_extra["external"] is False
    assert models["piper-joe"].model_extra["voices"] == ["joe"]  # what `voice` takes
    assert client.models.retrieve("tiny-sd-turbo").model_extra["modality"] == "image"


def test_chat_completion_reports_usage_and_finish_reason(client, rows):
    first = client.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=6, seed=11)
    again = client.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=6, seed=11)
    choice = first.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens > 0 and 1 <= first.usage.completion_tokens <= 6
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert again.choices[0].message.content == choice.message.content  # same seed, same reply
    assert [(r["client"], r["endpoint"], r["status"], r["completion_tokens"]) for r in rows][0] == (
        "openai", "openai:/v1/chat/completions", "ok", first.usage.completion_tokens)


def test_streamed_chat_matches_the_whole_reply_and_ends_with_usage(client):
    whole = client.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_cut_the_reply(client):
    full = client.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if text[i:i + 2].strip())
    cut = client.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_client_that_leaves_a_stream_stops_the_model_and_frees_it(server, client, rows, monkeypatch):
    with server[0].cache.use("tiny-qwen2") as lease:  # 50 ms a token, like a real model: leaving is no race
        lm = lease.model.model
        forward = lm.forward
        monkeypatch.setattr(lm, "forward", lambda *a, **k: (time.sleep(0.05), forward(*a, **k))[1])
    stream = client.chat.completions.create(model="tiny-qwen2", messages=HELLO, max_tokens=128, temperature=0,
                                            stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while not rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows[0]["status"] in ("cancelled", "stopped")
    assert rows[0]["latency_ms"] < 128 * 50 / 2  # stopped long before the 128 tokens
    assert all(m.pins == 0 for m in server[0].cache.snapshot().models)


def _png(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def test_image_generation_b64_n_size_seed_and_adapters(client, rows):
    plain = client.images.generate(model="tiny-sd-turbo", prompt="a red fox", n=2, size="64x64",
                                   response_format="b64_json", extra_body={"seed": 5})
    styled = client.images.generate(model="tiny-sd-turbo", prompt="a red fox", size="64x64",
                                    extra_body={"seed": 5, "adapters": {"ink": 1.0}})
    again = client.images.generate(model="tiny-sd-turbo", prompt="a red fox", size="64x64", extra_body={"seed": 5})
    images = [_png(item) for item in plain.data]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # image i has seed + i
    assert np.array_equal(np.asarray(_png(again.data[0])), np.asarray(images[0]))
    assert not np.array_equal(np.asarray(_png(styled.data[0])), np.asarray(images[0]))  # the LoRA changed it
    assert rows[1]["adapters"] == {"ink": 1.0} and rows[1]["client"] == "openai"


def test_speech_is_a_wav_clip(client):
    answer = client.audio.speech.create(model="piper-joe", voice="joe", input="Hello from the studio.")
    audio, rate = soundfile.read(io.BytesIO(answer.content))
    assert rate == 22050 and len(audio) / rate > 0.5
    assert np.abs(audio).max() > 0.01  # a voice, not silence


@pytest.mark.parametrize("call, status, param", [
    (lambda c: c.chat.completions.create(model="no-such-model", messages=HELLO), 404, "model"),
    (lambda c: c.chat.completions.create(model="tiny-llama", messages=HELLO, temperature=7), 400, "temperature"),
    (lambda c: c.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=100000), 400, "max_tokens"),
    (lambda c: c.chat.completions.create(model="tiny-llama", messages=[]), 400, "messages"),
    (lambda c: c.chat.completions.create(model="tiny-llama", messages=HELLO, n=3), 400, "n"),
    (lambda c: c.chat.completions.create(model="tiny-llama", messages=HELLO, presence_penalty=1), 400,
     "presence_penalty"),
    (lambda c: c.chat.completions.create(model="tiny-sd-turbo", messages=HELLO), 400, "model"),
    (lambda c: c.images.generate(model="tiny-sd-turbo", prompt="x", size="big"), 400, "size"),
    (lambda c: c.images.generate(model="sd-turbo", prompt="x", size="512x512"), 400, "size"),  # the tiny twin's cap
    (lambda c: c.images.generate(model="tiny-sd-turbo", prompt="x", size="64x64", response_format="url"), 400,
     "response_format"),
    (lambda c: c.images.generate(model="tiny-sd-turbo", prompt="x", extra_body={"adapters": {"nope": 1}}), 400,
     "adapters"),
    (lambda c: c.audio.speech.create(model="piper-joe", voice="joe", input="hi", response_format="mp3"), 400,
     "response_format"),
    (lambda c: c.audio.speech.create(model="piper-joe", voice="joe", input="hi", speed=2), 400, "speed"),
    (lambda c: c.audio.speech.create(model="piper-joe", voice="alloy", input="hi"), 400, "voice"),
    (lambda c: c.audio.speech.create(model="tiny-nothing", voice="joe", input="hi"), 404, "model"),
])
def test_errors_have_the_openai_shape_and_status(client, call, status, param):
    with pytest.raises(openai.APIStatusError) as caught:
        call(client)
    assert caught.value.status_code == status
    error = caught.value.body
    assert error["param"] == param and error["message"].startswith(param)
    assert error["type"] == "invalid_request_error"
    assert "Value error" not in error["message"] and "after validation" not in error["message"]
    if param == "size" and "does not take" in error["message"]:
        assert "64 to 128" in error["message"]  # which sizes the model takes


def test_a_missing_or_wrong_key_is_refused_in_the_openai_shape(server):
    url = server[1]
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    missing = httpx.get(f"{url}/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert missing.headers["www-authenticate"] == "Bearer"
    other = httpx.post(f"{url}/generate/text", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "nope", "messages": HELLO})
    assert other.status_code == 404 and other.json()["field"] == "model"  # the rest keeps its {"detail"} shape


def _encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_edit_inpaints_where_the_mask_is_transparent_and_redraws_without_one(server, client, rows):
    from studio.backends.image import ImageRequest, generate_images
    from studio.runtime import Call

    studio = server[0]
    x, y = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64))
    picture = Image.fromarray((np.stack([x, y, 1 - x * y], -1) * 255).astype(np.uint8))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (20, 20, 44, 44))  # OpenAI's masks: transparent is edited
    edited = client.images.edit(image=("in.png", _encoded(picture), "image/png"),
                                mask=("m.png", _encoded(mask), "image/png"), prompt="a red fox", model="tiny-sd",
                                response_format="b64_json", extra_body={"seed": 5, "steps": 2})
    out = np.asarray(_png(edited.data[0]).convert("RGB"), dtype=np.int16)
    keep = np.asarray(mask.getchannel("A").resize((64, 64))) > 0
    keep[20 - 12:44 + 12, 20 - 12:44 + 12] = False  # the feathered edge (mask blur 4 reaches 12 px) may change
    assert out.shape == (64, 64, 3) and np.array_equal(out[keep], np.asarray(picture, dtype=np.int16)[keep])
    white = Image.new("L", (64, 64), 0)
    white.paste(255, (20, 20, 44, 44))
    same = generate_images(studio, ImageRequest(prompt="a red fox", model="tiny-sd", mode="inpaint", image=picture,
                                                mask=white, seed=5, steps=2), Call("rest", "test"))
    assert np.array_equal(out, np.asarray(same.images[0], dtype=np.int16))
    assert rows[0]["endpoint"] == "openai:/v1/images/edits" and rows[0]["status"] == "ok"
    redrawn = client.images.edit(image=("in.png", _encoded(picture), "image/png"), prompt="a red fox", model="tiny-sd",
                                 n=2, extra_body={"seed": 5, "steps": 2, "strength": 0.5})
    assert [_png(item).size for item in redrawn.data] == [(64, 64), (64, 64)]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("in.png", _encoded(picture), "image/png"), prompt="a red fox", model="tiny-sd",
                           mask=("m.png", _encoded(mask.resize((32, 32))), "image/png"))
    assert caught.value.body["param"] == "mask" and "32x32" in caught.value.body["message"]

