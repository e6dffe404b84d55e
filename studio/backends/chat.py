"""Chat models: causal language models from transformers, used with their own chat template.

One service layer serves the Chat tab, `POST /generate/text` and the later OpenAI-compatible and MCP entry points:
`stream_chat` runs `model.generate` in a thread and streams its text through a `TextIteratorStreamer`. A stopping
criterion checked at every token ends the generation on the server as soon as the caller's `cancel` event is set
(the session's Stop button), a stop string appears, or the consumer goes away, so a stopped request frees the model
within a token or two. Sampling draws from a generator owned by the request, so a seed reproduces a reply even while
other requests sample at the same time.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria, TextIteratorStreamer
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from studio import providers
from studio.registry import ModelSpec
from studio.runtime import Studio

ROLES = ("system", "user", "assistant")
MAX_SEED = 2**32 - 1
MAX_STOP_STRINGS = 4
# Used where a registry entry does not name its own defaults (`ModelSpec.options`).
DEFAULTS = {"default_max_new_tokens": 256, "max_new_tokens": 1024, "temperature": 0.7, "top_p": 0.95, "top_k": 50,
            "repetition_penalty": 1.1}


@dataclass
class ChatModel:
    model: torch.nn.Module
    tokenizer: object
    context_length: int


def load_causal_lm(spec: ModelSpec, path: Path, device: str, dtype: str) -> ChatModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    context = spec.options.get("context_length") or getattr(model.config, "max_position_embeddings", 2048)
    return ChatModel(model, tokenizer, int(context))


@dataclass
class ChatRequest:
    """One chat turn: the conversation so far (ending with the user's message) and how to sample the reply.

    Sampling fields left as None take the model's defaults from its registry entry. temperature 0 is greedy;
    top_k 0 turns top-k off; seed None draws a random seed, reported back so the reply can be reproduced.
    """

    messages: list[dict[str, str]]
    model: str
    system: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None


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


@dataclass
class ChatResult:
    text: str
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = "stop"
    seed: int = 0
    dropped_turns: int = 0
    tokens_per_s: float = 0.0


def option(spec: ModelSpec, name: str):
    """A chat model's default or cap, from its registry entry or the studio-wide fallback."""
    return spec.options.get(name, DEFAULTS[name])


def with_defaults(studio: Studio, req: ChatRequest) -> ChatRequest:
    """Fill the sampling fields the caller left empty with the model's defaults."""
    spec = studio.registry.get(req.model)
    missing = {name: option(spec, name) for name in ("temperature", "top_p", "top_k", "repetition_penalty")
               if getattr(req, name) is None}
    if req.max_new_tokens is None:
        missing["max_new_tokens"] = option(spec, "default_max_new_tokens")
    return replace(req, **missing)


def validate_chat(studio: Studio, req: ChatRequest) -> None:
    """Raise ValueError("field: message") for the first bad field; an unknown model raises UnknownModelError."""
    spec = studio.registry.get(req.model)
    if spec.modality != "chat":
        raise ValueError(f"model: {req.model!r} is a {spec.modality} model, not a chat model")
    if not isinstance(req.messages, list) or not req.messages:
        raise ValueError("messages: must be a non-empty list of {role, content}")
    for i, message in enumerate(req.messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role: must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}].content: must be text")
    if req.messages[-1]["role"] != "user" or not req.messages[-1]["content"].strip():
        raise ValueError("messages: the last message must be a non-empty user message (the prompt)")
    if req.system is not None and not isinstance(req.system, str):
        raise ValueError("system: must be text")
    cap = option(spec, "max_new_tokens")
    if req.max_new_tokens is not None and not 1 <= req.max_new_tokens <= cap:
        raise ValueError(f"max_new_tokens: must be between 1 and {cap} for {req.model}")
    if req.temperature is not None and not req.temperature >= 0:
        raise ValueError("temperature: must be >= 0 (0 = greedy)")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise ValueError("top_p: must be in (0, 1]")
    if req.top_k is not None and req.top_k < 0:
        raise ValueError("top_k: must be >= 0 (0 = off)")
    if req.repetition_penalty is not None and not req.repetition_penalty > 0:
        raise ValueError("repetition_penalty: must be > 0 (1 = off)")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise ValueError(f"seed: must be between 0 and {MAX_SEED}")
    stops = req.stop or []
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings")


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The model's own chat template, ending with the assistant's turn prompt."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def fit_history(tokenizer, messages: list[dict[str, str]], budget: int) -> tuple[list[int], int]:
    """Prompt ids that fit `budget` tokens, dropping the oldest turns first; returns (ids, messages dropped).

    System messages and the newest message always stay, and the kept history starts with a user turn (some
    templates insist on it). Fails only when those alone do not fit.
    """
    kept = list(messages)
    dropped = 0
    while len(ids := prompt_ids(tokenizer, kept)) > budget:
        oldest = next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)
        if oldest is None:
            raise ValueError(
                f"messages: the newest message and the system prompt take {len(ids)} tokens, more than the "
                f"{budget} the context window leaves beside max_new_tokens; shorten them or lower max_new_tokens")
        del kept[oldest]
        dropped += 1
        while oldest < len(kept) - 1 and kept[oldest]["role"] == "assistant":  # resume with a user turn
            del kept[oldest]
            dropped += 1
    return ids, dropped


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


def _generation_config(chat: ChatModel, req: ChatRequest) -> GenerationConfig:
    """Only the model's special tokens come from its own generation config; sampling comes from the request."""
    base = chat.model.generation_config
    eos = base.eos_token_id if base.eos_token_id is not None else chat.tokenizer.eos_token_id
    pad = base.pad_token_id if base.pad_token_id is not None else chat.tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(max_new_tokens=req.max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                            bos_token_id=base.bos_token_id, repetition_penalty=req.repetition_penalty)


def stream_chat(studio: Studio, req: ChatRequest, *, client: str, endpoint: str, session: str | None = None,
                cancel: threading.Event | None = None) -> Iterator[ChatEvent]:
    """Stream the reply piece by piece, then one final event with usage, finish reason, seed and speed.

    Raises ValueError("field: message") for bad input before anything is generated.
    """
    validate_chat(studio, req)
    req = with_defaults(studio, req)
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
    if studio.registry.get(req.model).external:  # answered by an OpenAI-compatible provider
        yield from providers.stream_chat(studio, req, seed, client=client, endpoint=endpoint, session=session,
                                         cancel=cancel)
        return
    conversation = ([{"role": "system", "content": req.system}] if req.system else []) + [
        {"role": m["role"], "content": m["content"]} for m in req.messages]
    with studio.generation(modality="chat", model=req.model, client=client, endpoint=endpoint,
                           session=session) as (lease, rec):
        chat: ChatModel = lease.model
        ids, dropped = fit_history(chat.tokenizer, conversation, chat.context_length - req.max_new_tokens)
        rec.set(prompt=req.messages[-1]["content"], prompt_tokens=len(ids), seed=seed)
        input_ids = torch.tensor([ids], device=chat.model.device)
        halt = threading.Event()
        streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampler = [_SeededSampler(seed, req.temperature, req.top_k, req.top_p)] if req.temperature > 0 else []
        outcome: dict = {}

        def generate() -> None:
            try:
                outcome["sequences"] = chat.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                    generation_config=_generation_config(chat, req), logits_processor=sampler,
                    stopping_criteria=[_Halt(cancel, halt)])
            except BaseException as exc:  # handed to the consumer, which re-raises it
                outcome["error"] = exc
                streamer.end()

        stops = _StopStrings(req.stop)
        started = time.perf_counter()
        worker = threading.Thread(target=generate, name=f"chat-{req.model}", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                text = stops.feed(piece)
                if text:
                    rec.first_output()
                    yield ChatEvent(text)
                if stops.hit:
                    halt.set()
                    break
            if stops.pending:
                yield ChatEvent(stops.pending)
        finally:
            halt.set()  # no-op after a normal end; stops the model when the consumer stopped reading
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        seconds = time.perf_counter() - started
        completion = int(outcome["sequences"].shape[1]) - len(ids)
        cancelled = cancel is not None and cancel.is_set()
        rec.set(completion_tokens=completion, stopped=cancelled)
    # The final event comes after the request is logged and the model released, so a caller that stops reading
    # at it still counts as a finished request.
    finish = ("cancelled" if cancelled else "stop" if stops.hit
              else "length" if completion >= req.max_new_tokens else "stop")
    yield ChatEvent("", done=True, usage={"prompt_tokens": len(ids), "completion_tokens": completion},
                    finish_reason=finish, seed=seed, dropped_turns=dropped,
                    tokens_per_s=round(completion / seconds, 2) if seconds > 0 else 0.0)


def complete_chat(studio: Studio, req: ChatRequest, *, client: str, endpoint: str, session: str | None = None,
                  cancel: threading.Event | None = None) -> ChatResult:
    """The whole reply at once (the same path as streaming)."""
    pieces = []
    for event in stream_chat(studio, req, client=client, endpoint=endpoint, session=session, cancel=cancel):
        pieces.append(event.text)
        if event.done:
            return ChatResult("".join(pieces), event.usage, event.finish_reason, event.seed, event.dropped_turns,
                              event.tokens_per_s)
    raise RuntimeError("the chat stream ended without its final event")
