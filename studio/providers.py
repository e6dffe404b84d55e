"""External providers: models served by vLLM, TGI, Ollama, llama.cpp, a hosted API or another studio.

Anything that speaks the OpenAI API can serve the studio's chat, image and speech models, which is how the studio
grows past one machine: the heavy models run on a GPU server or cluster and the studio stays the front end.
A YAML file (`--providers`) lists the providers and the models to expose; each model becomes an external
`ModelSpec`. The model cache "loads" it as a small client object (no memory budget), and the chat, image and
speech services hand the work to the functions here, which call the provider through the `openai` package.
Every provider failure becomes a `ProviderError` whose message is meant for the user.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import numpy as np
import openai
import soundfile
import yaml
from PIL import Image

from studio.cache import CacheError
from studio.config import ConfigError
from studio.registry import ModelSpec, Registry

if TYPE_CHECKING:
    from studio.backends.chat import ChatEvent, ChatRequest
    from studio.backends.image import ImageResult
    from studio.runtime import Studio

MODALITIES = ("chat", "image", "speech")
PROVIDER_KEYS = {"name", "base_url", "api_key_env", "timeout", "max_retries", "extensions", "models"}
MODEL_KEYS = {"id", "name", "modality", "label", "options"}
# Caps for the tabs' sliders and the services' checks; a model's `options` in the file override them.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "chat": {"max_new_tokens": 4096, "default_max_new_tokens": 512},
    "image": {"steps": 30, "max_steps": 100, "guidance": 7.0, "width": 1024, "height": 1024, "max_size": 2048,
              "negative_prompt": True},
    "speech": {"voices": ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer"],
               "default_voice": "alloy"},
}


class ProviderError(CacheError):
    """The provider could not serve the request; `status` is the HTTP status the studio's API answers with.

    A CacheError (the model is not available right now), so every place that reports those to the user (the
    tabs' gr.Error, the API's error handlers) reports this too."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    api_key_env: str | None = None  # None: the server needs no key (a local vLLM, Ollama, llama.cpp)
    timeout: float = 120.0  # seconds for one request (connect, and each read while streaming)
    max_retries: int = 1  # the openai package retries connection errors, 429 and 5xx with back-off
    # Also send the fields beyond OpenAI's: top_k and repetition_penalty for chat; negative_prompt, steps,
    # guidance_scale, seed and adapters for images. vLLM and another studio understand them; OpenAI refuses them.
    extensions: bool = False


@dataclass
class ProviderClient:
    """What the model cache holds for an external model: a client and the provider's name for the model."""

    provider: Provider
    model: str
    client: openai.OpenAI


@dataclass
class ProviderSpeech(ProviderClient):
    """An external speech model, with the speech service's model interface (`speak`, `sample_rate`, `seeded`),
    so long text is split, spoken piece by piece, stopped and logged exactly as with a local voice."""

    sample_rate: int = 24_000  # OpenAI's rate until the provider's first answer tells its own
    seeded: ClassVar[bool] = False  # the OpenAI speech API takes no seed

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        with _calling(self):
            answer = self.client.audio.speech.create(model=self.model, input=text, voice=voice or "default",
                                                     response_format="wav")
        try:
            audio, rate = soundfile.read(io.BytesIO(answer.content), dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError) as exc:
            raise ProviderError(f"provider {self.provider.name} answered with audio that is not WAV: {exc}") from exc
        self.sample_rate = int(rate)  # one model always answers at one rate
        return audio.mean(axis=1)


# ---------------------------------------------------------------------------------------------- configuration


def read_config(path: Path) -> list[ModelSpec]:
    """Parse the providers file into external ModelSpecs; raises ConfigError naming the bad entry."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--providers: cannot read {path}: {exc}") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--providers: {path} must hold a YAML list of providers (see README)")
    specs: list[ModelSpec] = []
    for number, item in enumerate(data, 1):
        where = f"--providers: {path}: provider {number}"
        entry = _mapping(item, where, PROVIDER_KEYS)
        provider = Provider(
            name=_text(entry, "name", where),
            base_url=_text(entry, "base_url", where).rstrip("/"),
            api_key_env=_text(entry, "api_key_env", where, required=False),
            timeout=_number(entry, "timeout", where, Provider.timeout),
            max_retries=int(_number(entry, "max_retries", where, Provider.max_retries)),
            extensions=_flag(entry, "extensions", where),
        )
        if not provider.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: base_url must start with http:// or https://, got {provider.base_url!r}")
        models = entry.get("models")
        if not isinstance(models, list) or not models:
            raise ConfigError(f"{where} ({provider.name}): models must be a non-empty list")
        for model_number, model in enumerate(models, 1):
            model_where = f"{where} ({provider.name}), model {model_number}"
            specs.append(_spec(provider, _mapping(model, model_where, MODEL_KEYS), model_where))
    return specs


def _spec(provider: Provider, entry: dict, where: str) -> ModelSpec:
    model_id = _text(entry, "id", where)
    modality = _text(entry, "modality", where)
    if modality not in MODALITIES:
        raise ConfigError(f"{where}: modality {modality!r} is not one of {', '.join(MODALITIES)}")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: options must be a mapping")
    remote = _text(entry, "name", where, required=False) or model_id
    label = _text(entry, "label", where, required=False) or remote
    return ModelSpec(id=model_id, modality=modality, label=f"{label} · {provider.name} (external)",
                     loader="studio.providers:load_client", params=0, external=True,
                     options={**DEFAULT_OPTIONS[modality], **options, "provider": provider, "remote_model": remote})


def _mapping(item: Any, where: str, keys: set[str]) -> dict:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(sorted(keys))}")
    unknown = sorted(set(item) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(keys))}")
    return item


def _text(entry: dict, key: str, where: str, required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return str(value).strip()


def _number(entry: dict, key: str, where: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def _flag(entry: dict, key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def register(registry: Registry, path: Path) -> list[ModelSpec]:
    """Add the providers' models to the registry at start-up (their ids must not clash with local ones)."""
    specs = read_config(path)
    for spec in specs:
        try:
            registry.add(spec)
        except ValueError:
            raise ConfigError(f"--providers: model id {spec.id!r} is already taken; give the external model "
                              "another id (and its provider's name for it in `name`)") from None
    return specs


def provider_of(spec: ModelSpec) -> Provider:
    return spec.options["provider"]


# ---------------------------------------------------------------------------------------------- the client


def load_client(spec: ModelSpec, path: Path | None, device: str, dtype: str) -> ProviderClient:
    """The cache's loader for external models: a client object, no weights and no memory budget."""
    provider = provider_of(spec)
    key = "not-needed"  # the openai package insists on a key; keyless servers ignore it
    if provider.api_key_env:
        key = os.environ.get(provider.api_key_env, "")
        if not key:
            raise ProviderError(f"{spec.id}: set the environment variable {provider.api_key_env} to "
                                f"{provider.name}'s API key and restart the studio", status=503)
    client = openai.OpenAI(base_url=provider.base_url, api_key=key, timeout=provider.timeout,
                           max_retries=provider.max_retries)
    kind = ProviderSpeech if spec.modality == "speech" else ProviderClient
    return kind(provider, spec.options["remote_model"], client)


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("error")
        if message:
            return str(message)[:300]
    return exc.message[:300]


def as_provider_error(handle: ProviderClient, exc: openai.OpenAIError) -> ProviderError:
    """Translate what the openai package raised into a message a user can act on."""
    p = handle.provider
    who = f"provider {p.name} ({p.base_url})"
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(f"{who} did not answer within {p.timeout:g} s; try again, or raise its timeout "
                             "in the providers file", 504)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        return ProviderError(f"cannot reach {who}: {cause}; is the server running?", 502)
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        if code in (401, 403):
            fix = f"check {p.api_key_env}" if p.api_key_env else "set api_key_env in the providers file"
            return ProviderError(f"{who} refused the API key (HTTP {code}): {_detail(exc)}; {fix}", 502)
        if code == 404:
            return ProviderError(f"{who} does not serve the model {handle.model!r} (HTTP 404): {_detail(exc)}", 502)
        if code == 429:
            return ProviderError(f"{who} is rate-limiting requests (HTTP 429); try again later", 429)
        if code >= 500:
            return ProviderError(f"{who} failed (HTTP {code}): {_detail(exc)}", 503 if code == 503 else 502)
        return ProviderError(f"{who} rejected the request (HTTP {code}): {_detail(exc)}", 400)
    return ProviderError(f"{who}: {exc}", 502)


@contextmanager
def _calling(handle: ProviderClient) -> Iterator[None]:
    try:
        yield
    except openai.OpenAIError as exc:
        raise as_provider_error(handle, exc) from exc


# ---------------------------------------------------------------------------------------------- generation
# The chat and image services call these for an external model (the speech service needs nothing: see
# ProviderSpeech). Each one runs inside `studio.generation`, so the request is queued, logged and counted like a
# local one, with `external` set in its log row.


def stream_chat(studio: Studio, req: ChatRequest, seed: int, *, client: str, endpoint: str,
                session: str | None = None, cancel: threading.Event | None = None) -> Iterator[ChatEvent]:
    """The chat service's stream for an external model: the same events, the reply streamed by the provider."""
    from studio.backends.chat import ChatEvent  # here: the chat service imports this module

    messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
        {"role": m["role"], "content": m["content"]} for m in req.messages]
    extra = {"top_k": req.top_k, "repetition_penalty": req.repetition_penalty}
    with studio.generation(modality="chat", model=req.model, client=client, endpoint=endpoint,
                           session=session) as (lease, rec):
        handle: ProviderClient = lease.model
        rec.set(prompt=req.messages[-1]["content"], seed=seed)
        usage, finish, pieces = {}, "stop", 0
        started = time.perf_counter()
        with _calling(handle), handle.client.chat.completions.create(
                model=handle.model, messages=messages, stream=True, stream_options={"include_usage": True},
                max_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed,
                stop=req.stop or openai.omit, extra_body=extra if handle.provider.extensions else None) as stream:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = {"prompt_tokens": chunk.usage.prompt_tokens,
                             "completion_tokens": chunk.usage.completion_tokens}
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        rec.first_output()
                        pieces += 1
                        yield ChatEvent(choice.delta.content)
                    if choice.finish_reason == "length":
                        finish = "length"
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"  # leaving the block closes the connection: the provider stops too
                    break
        seconds = time.perf_counter() - started
        usage = {"prompt_tokens": usage.get("prompt_tokens", 0),  # a server that sends no usage: count pieces
                 "completion_tokens": usage.get("completion_tokens", pieces)}
        rec.set(**usage, stopped=finish == "cancelled")
    yield ChatEvent("", done=True, usage=usage, finish_reason=finish, seed=seed,
                    tokens_per_s=round(usage["completion_tokens"] / seconds, 2) if seconds > 0 else 0.0)


def generate_images(studio: Studio, settings: dict, *, client: str, endpoint: str, session: str | None = None,
                    cancel: threading.Event | None = None, progress: Callable[[float, str], None] | None = None,
                    ) -> ImageResult:
    """The image service's path for an external model; `settings` are the checked request (ImageResult.settings).

    One provider call per image, with seed + i as locally, so Stop works between images."""
    from studio.backends.image import ImageResult, image_seed  # here: the image service imports this module

    images: list = []
    n, seed = settings["n"], settings["seed"]
    with studio.generation(modality="image", model=settings["model"], client=client, endpoint=endpoint,
                           session=session) as (lease, rec):
        handle: ProviderClient = lease.model
        rec.set(prompt=settings["prompt"], seed=seed, steps=settings["steps"], adapters=settings["adapters"])
        for index in range(n):
            if cancel is not None and cancel.is_set():
                break
            if progress is not None:
                progress(index / n, f"image {index + 1}/{n} · {handle.provider.name}")
            images.append(_draw(handle, settings, image_seed(seed, index)))
            rec.first_output()
        stopped = len(images) < n
        rec.set(output_pixels=settings["width"] * settings["height"] * len(images), stopped=stopped)
    return ImageResult(images, seed, settings, stopped)


def _draw(handle: ProviderClient, settings: dict, seed: int) -> Image.Image:
    extra = None
    if handle.provider.extensions:
        extra = {"negative_prompt": settings["negative_prompt"], "steps": settings["steps"],
                 "guidance_scale": settings["guidance"], "seed": seed, "adapters": settings["adapters"]}
    with _calling(handle):
        answer = handle.client.images.generate(model=handle.model, prompt=settings["prompt"], n=1,
                                               size=f"{settings['width']}x{settings['height']}",
                                               response_format="b64_json", extra_body=extra)
    encoded = answer.data[0].b64_json if answer.data else None
    if not encoded:
        raise ProviderError(f"provider {handle.provider.name} answered without a b64_json image")
    return Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
