"""Chat: causal language models from transformers with their own chat template, or a model of an external
OpenAI-compatible provider; one service behind the Chat tab, `POST /generate/text`, `/v1/chat/completions` and MCP.

`stream_chat` validates the request, then relays the loaded model's `stream`. The local `TransformersChat` decodes
the requests to one model together, in a continuous batch (studio/backends/batching.py): a request joins the
running batch as it arrives and leaves it as it ends. Its reply ends within a step when the caller's cancel event
is set (the session's Stop, a client that went away), a stop string appears or the consumer stops reading.
Sampling draws from a generator owned by the request, so a seed reproduces a reply whatever else is in the batch.
`ProviderChat` streams the same events from a provider's chat completions.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator, Protocol

import openai
import torch
import transformers
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria, TextStreamer
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.streamers import BaseStreamer

from studio import devices
from studio.backends import quantization
from studio.backends.batching import BatchEngine, EngineBusy, EngineClosed, SamplingParams
from studio.backends.remote import ProviderClient, calling, connect_client
from studio.cache import CacheBusy, Workspace
from studio.contract import (Family, InputError, ModelOptions, UnsupportedModel, check_range, check_seed, check_text,
                             config_json, pick_seed, require)
from studio.registry import GPU_BF16, ModelSpec
from studio.runtime import Call, Studio

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4
MAX_MESSAGE_CHARS = 100_000  # per message; the newest one must also fit the model's context window
CHARS_PER_TOKEN = 8  # more than any tokenizer packs: text longer than this many chars per token cannot fit
TEMPERATURE = (0.01, 2.0)  # or exactly 0, greedy; below 0.01 the logits overflow (and it is greedy anyway)
REPETITION_PENALTY = (0.1, 2.0)
SECONDS_PER_TOKEN = 0.05  # GPU time per new token of a 0.5-1.1B model on a ZeroGPU slice


@dataclass(frozen=True)
class ChatOptions(ModelOptions):
    """A chat model's defaults and caps (a catalog entry overrides them)."""

    context_length: int | None = None  # None: the model config's max_position_embeddings
    max_new_tokens: int | None = 1024  # the cap
    default_max_new_tokens: int | None = 256
    temperature: float | None = 0.7
    top_p: float | None = 0.95
    top_k: int | None = 50
    repetition_penalty: float | None = 1.1


@dataclass
class ChatRequest:
    """One chat turn: the conversation so far (ending with the user's message) and how to sample the reply.

    Sampling fields left as None take the model's defaults. temperature 0 is greedy; top_k 0 turns top-k off;
    seed None draws a random seed, reported back so the reply can be reproduced."""

    messages: list[dict[str, str]]
    model: str | None = None  # None: the first chat model
    system: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks; vLLM's extension)


@dataclass
class ChatEvent:
    """A new piece of the reply; the last event (done=True) carries the totals instead."""

    text: str
    done: bool = False
    usage: dict[str, int] | None = None  # prompt_tokens, completion_tokens
    finish_reason: str | None = None  # "stop" (end of reply or stop string) | "length" | "cancelled"
    seed: int | None = None
    dropped_turns: int = 0  # oldest history messages left out so the prompt fits the context window
    tokens_per_s: float | None = None
    model: str | None = None  # the model that answered


@dataclass
class ChatResult:
    text: str
    model: str
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = "stop"
    seed: int = 0
    dropped_turns: int = 0
    tokens_per_s: float = 0.0


class ChatBackend(Protocol):
    """What the cache holds for a chat model, local or external: it streams one reply."""

    def stream(self, conversation: list[dict[str, str]], req: ChatRequest, seed: int,
               cancel: threading.Event | None) -> Iterator[ChatEvent]: ...


# ---------------------------------------------------------------------------------------------- validation


def validate(studio: Studio, req: ChatRequest) -> tuple[ModelSpec, ChatRequest]:
    """The model and the request with its defaults filled in; raises InputError naming the first bad field."""
    spec = studio.model(req.model, "chat")
    opts = ChatOptions.of(spec)
    require(isinstance(req.messages, list) and bool(req.messages), "messages",
            "must be a non-empty list of {role, content} messages")
    for i, message in enumerate(req.messages):
        require(isinstance(message, dict) and message.get("role") in ROLES, f"messages[{i}].role",
                f"must be one of {', '.join(ROLES)}")
        check_text(f"messages[{i}].content", message.get("content"), max_chars=MAX_MESSAGE_CHARS, required=False)
    require(req.messages[-1]["role"] == "user" and bool(req.messages[-1]["content"].strip()), "messages",
            "the last message must be a non-empty user message (the prompt)")
    if req.system is not None:
        check_text("system", req.system, max_chars=MAX_MESSAGE_CHARS, required=False)
    if req.max_new_tokens is not None:
        check_range("max_new_tokens", req.max_new_tokens, 1, opts.max_new_tokens, spec.id, whole=True)
    if req.temperature is not None:
        check_range("temperature", req.temperature, 0, TEMPERATURE[1])
        require(req.temperature == 0 or req.temperature >= TEMPERATURE[0], "temperature",
                f"must be 0 (greedy) or from {TEMPERATURE[0]:g} to {TEMPERATURE[1]:g}")
    if req.top_p is not None:
        check_range("top_p", req.top_p, 0, 1)
        require(req.top_p > 0, "top_p", "must be above 0 and at most 1")
    if req.top_k is not None:
        check_range("top_k", req.top_k, 0, None, whole=True)
    if req.repetition_penalty is not None:
        check_range("repetition_penalty", req.repetition_penalty, *REPETITION_PENALTY)
    check_seed(req.seed)
    stops = req.stop or []
    require(isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in stops),
            "stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings")
    require(isinstance(req.ignore_eos, bool), "ignore_eos", "must be true or false")
    if opts.context_length:
        newest = len(req.messages[-1]["content"]) + len(req.system or "")
        require(newest <= opts.context_length * CHARS_PER_TOKEN, "messages",
                f"the newest message has {newest:,} characters, more than {spec.id}'s context window of "
                f"{opts.context_length:,} tokens can hold")
    defaults = {name: getattr(opts, name) for name in ("temperature", "top_p", "top_k", "repetition_penalty")
                if getattr(req, name) is None}
    if req.max_new_tokens is None:
        defaults["max_new_tokens"] = opts.default_max_new_tokens
    return spec, replace(req, model=spec.id, **defaults)


def gpu_seconds(req: ChatRequest) -> float:
    return (req.max_new_tokens or ChatOptions.default_max_new_tokens) * SECONDS_PER_TOKEN


# ---------------------------------------------------------------------------------------------- the service


def stream_chat(studio: Studio, req: ChatRequest, call: Call) -> Iterator[ChatEvent]:
    """Stream the reply piece by piece, then one final event with usage, finish reason, seed and speed.

    Raises InputError for bad input before anything is generated."""
    spec, req = validate(studio, req)
    seed = pick_seed(req.seed)
    conversation = ([{"role": "system", "content": req.system}] if req.system else []) + [
        {"role": m["role"], "content": m["content"]} for m in req.messages]
    with studio.generation(spec, call, slots=studio.settings.max_batch) as (lease, rec):
        rec.set(prompt=req.messages[-1]["content"], seed=seed)
        started = time.perf_counter()
        model: ChatBackend = lease.model
        with closing(model.stream(conversation, req, seed, call.cancel)) as events:
            for event in events:
                if event.done:
                    final = event
                    break
                rec.first_output()
                yield event
        seconds = time.perf_counter() - started
        rec.set(**final.usage, stopped=final.finish_reason == "cancelled")
    # The final event comes after the request is logged and the model released, so a caller that stops reading
    # at it still counts as a finished request.
    completion = final.usage["completion_tokens"]
    yield replace(final, seed=seed, tokens_per_s=round(completion / seconds, 2) if seconds > 0 else 0.0, model=spec.id)


def complete_chat(studio: Studio, req: ChatRequest, call: Call) -> ChatResult:
    """The whole reply at once (the same path as streaming)."""
    pieces = []
    for event in stream_chat(studio, req, call):
        pieces.append(event.text)
        if event.done:
            return ChatResult("".join(pieces), event.model, event.usage, event.finish_reason, event.seed,
                              event.dropped_turns, event.tokens_per_s)
    raise RuntimeError("the chat stream ended without its final event")


# ---------------------------------------------------------------------------------------------- local models

CAUSAL_LM = Family("causal-lm", "Causal language model with a chat template (transformers)",
                   "studio.backends.chat:load_causal_lm", dtypes=GPU_BF16)
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def detect(path: Path) -> Family | None:
    """Any causal LM transformers loads (`AutoModelForCausalLM`, from config.json's architecture), if it has a
    chat template. One without a template (a base model) is refused rather than given a made-up one: the studio
    is a chat, and a base model answers a template it was not trained on with noise."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES)

    config = config_json(path) if path.is_dir() else None
    if config is None:
        return None
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type")
    if architectures:
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        if not any(a in causal or a.endswith("ForCausalLM") for a in architectures):
            return None
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES:
        return None
    name = architectures[0] if architectures else model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModel(f"{name} is not built into transformers {transformers.__version__} (the model ships "
                               "its own code, which the studio does not run: no trust_remote_code)")
    if not any((path / file).exists() for file in TOKENIZER_FILES):
        raise UnsupportedModel(f"{name} comes without a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    tokenizer = config_json(path, "tokenizer_config.json") or {}
    if not (tokenizer.get("chat_template") or any((path / file).exists() for file in TEMPLATE_FILES)):
        raise UnsupportedModel(f"{name} has no chat template: it is a base (pre-trained) model, not a chat "
                               "model; pick its instruct / chat version, or add a chat_template to its "
                               "tokenizer_config.json")
    context = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
        "max_position_embeddings")
    if not isinstance(context, int) or context <= 0:
        return CAUSAL_LM
    # The reply's cap and default leave room for the conversation in a small context window.
    defaults = ChatOptions()
    return replace(CAUSAL_LM, options={"context_length": context,
                                       "max_new_tokens": min(defaults.max_new_tokens, context // 2),
                                       "default_max_new_tokens": min(defaults.default_max_new_tokens, context // 4)})


def load_causal_lm(spec: ModelSpec, path: Path, device: str, dtype: str) -> TransformersChat:
    """A causal LM and its tokenizer, quantized as its catalog entry asks (studio.backends.quantization)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), **quantization.from_pretrained_kwargs(spec.quantize, device, dtype))
    model = quantization.apply(model, spec.quantize, device).eval()
    context = ChatOptions.of(spec).context_length or getattr(model.config, "max_position_embeddings", 2048)
    return TransformersChat(model, tokenizer, int(context))


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The model's own chat template, ending with the assistant's turn prompt."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def fit_history(tokenizer, messages: list[dict[str, str]], budget: int) -> tuple[list[int], int]:
    """Prompt ids that fit `budget` tokens, dropping the oldest turns first; returns (ids, messages dropped).

    System messages and the newest message always stay, and the kept history starts with a user turn (some
    templates insist on it). Linear in the history's length: each message's text is tokenized once, the template's
    markers are measured once on the whole conversation and spread over its messages, the oldest turns that do not
    fit by that count go, and the template is applied again to what is kept (one more turn goes in the rare case
    that the estimate was short). Fails only when the system messages and the newest message alone do not fit."""
    ids = prompt_ids(tokenizer, messages)
    if len(ids) <= budget:
        return ids, 0
    cost = [len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in messages]
    markers = -(-(len(ids) - sum(cost)) // len(messages))  # template tokens per message, rounded up
    used = sum(c + markers for m, c in zip(messages, cost) if m["role"] == "system") + cost[-1] + markers
    start = len(messages) - 1
    while start > 0 and (messages[start - 1]["role"] == "system" or used + cost[start - 1] + markers <= budget):
        start -= 1
        used += 0 if messages[start]["role"] == "system" else cost[start] + markers
    while True:
        start = _user_turn_from(messages, start)
        kept = [m for m in messages[:start] if m["role"] == "system"] + messages[start:]
        ids = prompt_ids(tokenizer, kept)
        if len(ids) <= budget:
            return ids, len(messages) - len(kept)
        if start >= len(messages) - 1:
            raise InputError("messages", f"the newest message and the system prompt take {len(ids)} tokens, more "
                             f"than the {budget} the context window leaves beside max_new_tokens; shorten them or "
                             "lower max_new_tokens")
        start += 1


def _user_turn_from(messages: list[dict[str, str]], start: int) -> int:
    """The first index from `start` on where the kept history can begin: not with an assistant turn."""
    while start < len(messages) - 1 and messages[start]["role"] != "user":
        start += 1
    return start


class _Halt(StoppingCriteria):
    """Ends generation at the next token once any event is set: the session's Stop, a stop string, a gone client."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        halted = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), halted, dtype=torch.bool, device=input_ids.device)


class _SeededSampler(LogitsProcessor):
    """Samples the next token with the request's own generator and leaves only it selectable for greedy search.

    transformers samples from torch's global generator, which every thread shares; this keeps a seed's reply
    the same whatever else runs at the same time.
    """

    def __init__(self, seed: int, temperature: float, top_k: int, top_p: float):
        self.seed = seed
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        choice = torch.multinomial(scores.float().softmax(-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(-1, choice, 0.0)


class _StopStrings:
    """Cuts the reply before the first stop string, holding back a tail that may still turn into one."""

    def __init__(self, stops: list[str] | None):
        self.stops = stops or []
        self.pending = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            text, self.pending = self.pending[:min(found)], ""
            return text
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        text, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return text


class _Text(TextStreamer):
    """transformers' streaming detokenizer (whole words, no broken UTF-8 sequences), collecting instead of printing."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_special_tokens=True)
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pieces.append(text)

    def feed(self, token: int | None) -> str:
        """The text `token` completes (None: the end of the reply, flush what is held back)."""
        self.put(torch.tensor([token])) if token is not None else self.end()
        text, self.pieces = "".join(self.pieces), []
        return text


class _TokenQueue(BaseStreamer):
    """`generate`'s streamer, passing on the new token ids (the first call carries the prompt)."""

    def __init__(self):
        self.ids: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            for token in value.reshape(-1).tolist():
                self.ids.put(token)
        self.prompt_seen = True

    def end(self) -> None:
        self.ids.put(None)


@dataclass
class _Tokens:
    """The new token ids of one reply as they come, then its counts."""

    ids: Iterator[int]
    prompt_tokens: int
    completion_tokens: Callable[[], int]
    finish_reason: Callable[[], str | None]  # the model's own: "stop", "length", "cancelled" (None: not known)


@dataclass(eq=False)
class TransformersChat:
    """A local causal LM and its tokenizer.

    Requests decode together in one `BatchEngine` (continuous batching, studio/backends/batching.py) once the cache
    has bound the model's workspace (its KV cache comes from the memory budget). Each request runs `generate` on its
    own where the engine cannot serve: inside a ZeroGPU call (the model moves to the GPU for that call only) and for
    models it does not support (sliding-window or linear attention layers)."""

    model: torch.nn.Module
    tokenizer: object
    context_length: int
    engine: BatchEngine | None = None

    def bind_workspace(self, workspace: Workspace) -> None:
        try:
            self.engine = BatchEngine(self.model, self._eos(), max_context=self.context_length,
                                      max_batch=workspace.max_sequences, reserve=workspace.reserve,
                                      release=workspace.release, max_wait_s=workspace.max_wait_s)
        except ValueError:  # an architecture the engine does not support: one request at a time
            self.engine = None

    def serving(self) -> tuple[int, int]:
        """(sequences in the batch, requests waiting for a slot or KV memory)."""
        stats = self.engine.stats() if self.engine is not None else None
        return (stats.running, stats.waiting) if stats else (0, 0)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def stream(self, conversation: list[dict[str, str]], req: ChatRequest, seed: int,
               cancel: threading.Event | None) -> Iterator[ChatEvent]:
        ids, dropped = fit_history(self.tokenizer, conversation, self.context_length - req.max_new_tokens)
        batched = self.engine is not None and devices.call_device() is None
        tokens = (self._batched if batched else self._alone)(ids, req, seed, cancel)
        text, stops = _Text(self.tokenizer), _StopStrings(req.stop)
        with closing(tokens.ids):
            for token in chain(tokens.ids, [None]):
                piece = stops.feed(text.feed(token))
                if piece:
                    yield ChatEvent(piece)
                if stops.hit:
                    break
        if stops.pending:
            yield ChatEvent(stops.pending)
        finish = ("cancelled" if cancel is not None and cancel.is_set() else "stop" if stops.hit
                  else tokens.finish_reason() or "stop")
        yield ChatEvent("", done=True, usage={"prompt_tokens": tokens.prompt_tokens,
                                              "completion_tokens": tokens.completion_tokens()},
                        finish_reason=finish, dropped_turns=dropped)

    def _batched(self, ids: list[int], req: ChatRequest, seed: int, cancel: threading.Event | None) -> _Tokens:
        params = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                                top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=seed,
                                eos_token_ids=() if req.ignore_eos else None)
        try:
            sequence = self.engine.submit(ids, params, cancel=cancel)
        except EngineClosed:
            raise CacheBusy(f"{req.model} was unloaded while this request waited; try again") from None

        def stream() -> Iterator[int]:
            try:
                yield from sequence
            except EngineBusy as exc:
                raise CacheBusy(str(exc)) from None
            finally:  # the consumer stopped reading (a stop string, a client gone): free the slot now
                sequence.cancel()

        return _Tokens(stream(), len(ids), lambda: sequence.completion_tokens, lambda: sequence.finish_reason)

    def _alone(self, ids: list[int], req: ChatRequest, seed: int, cancel: threading.Event | None) -> _Tokens:
        input_ids = torch.tensor([ids], device=self.model.device)
        halt, streamer, count = threading.Event(), _TokenQueue(), [0]
        sampler = [_SeededSampler(seed, req.temperature, req.top_k, req.top_p)] if req.temperature > 0 else []
        outcome: dict = {}

        def generate() -> None:
            try:
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    streamer=streamer, generation_config=self._generation_config(req),
                                    logits_processor=sampler, stopping_criteria=[_Halt(cancel, halt)])
            except BaseException as exc:  # handed to the consumer, which re-raises it
                outcome["error"] = exc
                streamer.end()

        def stream() -> Iterator[int]:
            worker = threading.Thread(target=generate, name=f"chat-{req.model}", daemon=True)
            worker.start()
            try:
                while (token := streamer.ids.get()) is not None:
                    count[0] += 1
                    yield token
            finally:
                halt.set()  # no-op after a normal end; stops the model when the consumer stopped reading
                worker.join()
            if "error" in outcome:
                raise outcome["error"]

        def finish() -> str:
            return "length" if count[0] >= req.max_new_tokens else "stop"

        return _Tokens(stream(), len(ids), lambda: count[0], finish)

    def _eos(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return [eos] if isinstance(eos, int) else list(eos or [])

    def _generation_config(self, req: ChatRequest) -> GenerationConfig:
        """Only the model's special tokens come from its own generation config; sampling comes from the request."""
        base = self.model.generation_config
        eos = [] if req.ignore_eos else self._eos()
        pad = base.pad_token_id if base.pad_token_id is not None else self.tokenizer.pad_token_id
        if pad is None:
            pad = self._eos()[0]
        return GenerationConfig(max_new_tokens=req.max_new_tokens, do_sample=False, eos_token_id=eos or None,
                                pad_token_id=pad, bos_token_id=base.bos_token_id,
                                repetition_penalty=req.repetition_penalty)


# ---------------------------------------------------------------------------------------------- external models


def connect(spec: ModelSpec, path: Path | None, device: str, dtype: str) -> ProviderChat:
    """The cache's loader for an external chat model: a client, no weights."""
    return ProviderChat(*connect_client(spec))


@dataclass
class ProviderChat(ProviderClient):
    """A provider's chat model: the same events, the reply streamed by the provider's chat completions."""

    def stream(self, conversation: list[dict[str, str]], req: ChatRequest, seed: int,
               cancel: threading.Event | None) -> Iterator[ChatEvent]:
        extra = {"top_k": req.top_k, "repetition_penalty": req.repetition_penalty, "ignore_eos": req.ignore_eos or None}
        sent = {name: value for name, value in (("max_tokens", req.max_new_tokens), ("temperature", req.temperature),
                                                ("top_p", req.top_p)) if value is not None}
        usage, finish, pieces = {}, "stop", 0
        with calling(self), self.client.chat.completions.create(
                model=self.model, messages=conversation, stream=True, stream_options={"include_usage": True},
                seed=seed, stop=req.stop or openai.omit, **sent,
                extra_body={k: v for k, v in extra.items() if v is not None} if self.provider.extensions else None,
        ) as stream:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = {"prompt_tokens": chunk.usage.prompt_tokens,
                             "completion_tokens": chunk.usage.completion_tokens}
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        pieces += 1
                        yield ChatEvent(choice.delta.content)
                    if choice.finish_reason == "length":
                        finish = "length"
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"  # leaving the block closes the connection: the provider stops too
                    break
        usage = {"prompt_tokens": usage.get("prompt_tokens", 0),  # a server that sends no usage: count pieces
                 "completion_tokens": usage.get("completion_tokens", pieces)}
        yield ChatEvent("", done=True, usage=usage, finish_reason=finish)
