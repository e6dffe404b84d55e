"""Continuous batching for chat models: one decode loop per loaded causal LM, shared by every request to it.

Decoding one token reads all the weights once whatever the batch size, so sixteen sequences stepping together cost
little more per step than one. `BatchEngine` owns a model and a background thread; `submit` queues a prompt and
returns a `Sequence` that streams the new token ids. Each step prefills the newcomers' prompts (together, in one
forward of bounded size; a long prompt in chunks over several steps), then decodes one token for every other running
sequence (one forward). Finished, cancelled and failed sequences leave between steps, so a newcomer waits at most a
step for its prefill, never for the others to finish.

Why our own loop and not transformers' `init_continuous_batching` (5.24): both stream, cancel within a step and let
newcomers join a running batch, but that engine decides greedy-or-sampled for the whole manager and samples every
request from one shared generator (a greedy request cannot sit beside sampled ones, a seed does not reproduce a
reply), drops the repetition penalty, and allocates its paged KV pool once, up front, from the device's free memory
(60% of the free RAM on a CPU) instead of reserving it per request from the studio's budget. Nor is it faster here:
TinyLlama-1.1B architecture, bf16, 64 new tokens per request, this 2-core CPU, aggregate tokens/s at 1 / 4 / 16
concurrent requests: one-at-a-time `generate` 3.4 / 3.9 / 3.0, this engine 3.4 / 13.5 / 36.1, transformers' engine
3.3 / 10.0 / 19.2 (`bench/batch_engine.py`; one run on a shared machine, two earlier ones put this engine 1.1-1.2x
ahead of transformers' at 16).

Sampling: each request keeps its own settings and its own generator. Greedy rows take the top score; sampled rows
apply transformers' filters (repetition penalty, temperature, top-k, top-p) with their own values and draw as
`torch.multinomial` does, from their own generator: a seeded reply is the one `model.generate` samples after
`torch.manual_seed(seed)` (and the one the chat service's per-request sampler gives), whatever else is in the batch.

KV memory: every sequence owns one tensor sized for its prompt plus max_new_tokens, reserved through the injected
`reserve` callback before it is admitted and released the moment it ends. Reserving the whole reply up front (not
growing in blocks) means a running sequence never runs out of memory halfway and never needs preempting: admission
is the only place a request waits, and what the budget shows is what the sequences hold. Attention reads the
sequences' tensors through a right-padded view built per layer and step (a 4D mask, each token at its own
position), so a reply does not depend on its batch mates beyond numerical noise (`bench/batch_correctness.py`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


class EngineError(RuntimeError):
    """A sequence could not be completed; the message is meant for the user."""


class EngineClosed(EngineError):
    pass


class EngineBusy(EngineError):
    """Waited longer than the engine's `max_wait_s` for a batch slot or KV memory."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy; top_k 0 and repetition_penalty 1 are off.

    eos_token_ids None uses the model's own end-of-sequence ids; an empty tuple never stops before max_new_tokens.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_bytes: int  # reserved for the sequences now running
    max_batch: int
    alive: bool  # False once closed or broken: submit raises


@dataclass(frozen=True)
class _End:
    reason: str | None
    error: BaseException | None = None


class Sequence:
    """One request in the engine: iterate it for new token ids (end-of-sequence included), then read the totals.

    Iteration blocks until the next token, ends when the sequence does, and raises the engine's error if the sequence
    failed. `cancel` ends it within one step, from any thread.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, eos: frozenset[int], kv_bytes: int,
                 stop: threading.Event | None):
        self.prompt_tokens = len(prompt)
        self.params = params
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # set before the stream ends: "stop" | "length" | "cancelled"
        self.wait_s = 0.0  # queued before its prefill started
        self.kv_bytes = kv_bytes
        self._prompt = prompt
        self._eos = eos
        self._queue: queue.SimpleQueue[int | _End] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._stop = stop  # the caller's own event (a session's Stop button), honoured like cancel()
        self._submitted = time.monotonic()
        self._kv: torch.Tensor | None = None  # [layers, capacity, 2, kv heads, head dim] while running
        self._ids: torch.Tensor | None = None  # prompt + reply so far, for the repetition penalty
        self._kv_len = 0  # tokens whose keys and values are stored; the last reply token is not yet
        self._generator: torch.Generator | None = None
        self._ended = False

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._queue.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set() or (self._stop is not None and self._stop.is_set())


def _failure(exc: Exception) -> EngineError:
    """One error per sequence (each consumer raises its own), caused by what failed."""
    error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _right_pad(rows: list[torch.Tensor], width: int, filler: torch.Tensor | None) -> torch.Tensor:
    """Rows of different lengths as one [rows, width, ...] tensor, in one `torch.cat`: the tail of each row comes
    from `filler` (None: the row's own first element repeated).

    One op, where a copy per row would be one parallel op per row, and on a busy CPU every parallel op waits for
    its threads to be scheduled.
    """
    pieces = []
    for row in rows:
        pad = width - len(row)
        pieces += [row, row[:1].expand(pad, *row.shape[1:]) if filler is None else filler[:pad]]
    return torch.cat(pieces).view(len(rows), width, *rows[0].shape[1:])


class _BatchKV:
    """Duck-types the `cache` argument of a transformers forward: stores each step's new keys and values in the
    sequences' own tensors and hands attention a right-padded batch of them (zeros past each row's end, masked)."""

    def __init__(self, seqs: list[Sequence], new: list[int], key_len: int, zeros: torch.Tensor):
        self.seqs = seqs
        self.new = new  # tokens each row adds in this forward (rows are padded to the longest)
        self.key_len = key_len  # keys every row attends over, padded
        self.zeros = zeros
        self.fresh = all(s._kv_len == 0 for s in seqs)  # a prefill: the new keys are all there is

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args, **kwargs):
        pairs = torch.stack((keys, values), dim=2).transpose(1, 3)  # [batch, tokens, 2, kv heads, head dim]
        for row, (seq, n) in enumerate(zip(self.seqs, self.new)):
            seq._kv[layer, seq._kv_len:seq._kv_len + n] = pairs[row, :n]
        if self.fresh:
            return keys, values
        padded = _right_pad([s._kv[layer, :s._kv_len + n] for s, n in zip(self.seqs, self.new)], self.key_len,
                            self.zeros)
        return padded[:, :, 0].transpose(1, 2), padded[:, :, 1].transpose(1, 2)


class BatchEngine:
    """Serves one causal LM (sdpa or eager attention, full-attention layers) to many concurrent requests from one
    background decode loop.

    `reserve(nbytes) -> bool` is asked before a sequence is admitted (False: it keeps waiting, first in line, and is
    asked again at the next step or every `poll_s`); `release(nbytes)` is called when it ends. `max_context` bounds
    prompt plus max_new_tokens; `max_batch` bounds the running sequences, later ones wait in FIFO order; `max_wait_s`
    ends a request that waited longer with EngineBusy. A step prefills at most `prefill_tokens` (padded) prompt
    tokens, which bounds both the activations a burst of arrivals needs and how long the running sequences wait for
    a newcomer's prefill. `observe(seqs, scores)` sees every step's float32 scores before sampling (diagnostics).
    """

    def __init__(self, model: torch.nn.Module, eos_token_ids: list[int] | tuple[int, ...], *, max_context: int,
                 max_batch: int = 16, reserve: Callable[[int], bool] = lambda nbytes: True,
                 release: Callable[[int], None] = lambda nbytes: None, max_wait_s: float | None = None,
                 prefill_tokens: int = 2048, poll_s: float = 0.05,
                 observe: Callable[[list[Sequence], torch.Tensor], None] | None = None):
        config = model.config
        if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
            raise ValueError("the batch engine supports full-attention models only (no sliding or linear layers)")
        if config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"the batch engine needs sdpa or eager attention, not {config._attn_implementation}")
        self.model = model
        self.eos = frozenset(eos_token_ids)
        self.max_context = max_context
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.prefill_tokens = prefill_tokens
        self.poll_s = poll_s
        self._reserve, self._release, self._observe = reserve, release, observe
        self._layers = config.num_hidden_layers
        self._kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._device, self._dtype = model.device, model.dtype
        self._zeros = torch.zeros(0, 2, self._kv_heads, self._head_dim, dtype=self._dtype, device=self._device)
        self.bytes_per_token = self._layers * self._kv_heads * self._head_dim * 2 * self._dtype.itemsize
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._closing = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def kv_bytes(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The KV memory a request reserves: its prompt plus its whole reply."""
        return (prompt_tokens + max_new_tokens) * self.bytes_per_token

    def submit(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None) -> Sequence:
        """Queue a prompt; the sequence joins the running batch at the next step that has room and KV memory.

        `cancel`, once set, ends the sequence like `Sequence.cancel` (without the caller watching it). Raises
        ValueError when the prompt plus max_new_tokens exceed the model's context, EngineClosed when the engine is
        closed or broken.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids: must not be empty")
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens: must be at least 1")
        if len(prompt_ids) + params.max_new_tokens > self.max_context:
            raise ValueError(f"prompt_ids: {len(prompt_ids)} prompt tokens plus max_new_tokens "
                             f"{params.max_new_tokens} exceed the context window of {self.max_context}")
        eos = self.eos if params.eos_token_ids is None else frozenset(params.eos_token_ids)
        seq = Sequence(list(prompt_ids), params, eos, self.kv_bytes(len(prompt_ids), params.max_new_tokens), cancel)
        with self._cond:
            if self._closing or self._failure is not None:
                raise EngineClosed(self._closed_message())
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(len(self._running), len(self._waiting), sum(s.kv_bytes for s in self._running),
                               self.max_batch, not self._closing and self._failure is None)

    def close(self) -> None:
        """Stop the loop; sequences still queued or running end with EngineClosed and their KV memory is released."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    # ------------------------------------------------------------------ the loop

    def _closed_message(self) -> str:
        if self._failure is not None:
            return f"the batch engine stopped after an internal error: {self._failure}"
        return "the batch engine is closed (the model was unloaded)"

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._step():
                    pass
        except BaseException as exc:  # a fault in the loop itself: every sequence learns of it, submit refuses
            with self._cond:
                self._failure = exc
        finally:
            error = EngineClosed(self._closed_message())
            with self._cond:
                self._closing = True
                seqs = list(self._waiting) + self._running
                self._waiting.clear()
            for seq in seqs:
                self._end(seq, None, error)

    def _step(self) -> bool:
        """One round: drop what ended, admit newcomers, prefill (a chunk of) their prompts, decode everyone else.

        False once closing.
        """
        with self._cond:
            while not (self._closing or self._waiting or self._running):
                self._cond.wait()
            if self._closing:
                return False
        self._sweep()
        admitted = self._admit()
        group, chunks = self._prefill_chunk()
        if group:
            self._forward(group, chunks)
        with self._cond:  # the newcomers whose prompt is done too: their prefill gave them their first token
            decoding = [s for s in self._running if s._kv_len >= s.prompt_tokens]
        if decoding:
            self._forward(decoding, [1] * len(decoding))
        elif not admitted and not group:  # everyone waits for KV memory or a slot: ask again shortly
            with self._cond:
                self._cond.wait(self.poll_s)
        return True

    def _sweep(self) -> None:
        """End cancelled sequences and those that waited too long, before the next forward."""
        now = time.monotonic()
        with self._cond:
            waiting = list(self._waiting)
        for seq in waiting:
            if seq.cancelled:
                self._end(seq, "cancelled")
            elif self.max_wait_s is not None and now - seq._submitted > self.max_wait_s:
                self._end(seq, None, EngineBusy(
                    f"waited {self.max_wait_s:.0f} s for a batch slot or KV memory; the model is busy, try again"))
        for seq in list(self._running):
            if seq.cancelled:
                self._end(seq, "cancelled")

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences into the batch, oldest first, while there is a slot and KV memory for them."""
        admitted = []
        while True:
            with self._cond:
                if not self._waiting or len(self._running) >= self.max_batch:
                    return admitted
                seq = self._waiting[0]  # only this thread removes from the left, so it stays first
            try:
                granted = self._reserve(seq.kv_bytes)
            except Exception as exc:  # the budget refuses outright (e.g. more than all of it): this request fails
                self._end(seq, None, _failure(exc))
                continue
            if not granted:
                return admitted
            with self._cond:
                self._waiting.popleft()
                self._running.append(seq)
            seq.wait_s = time.monotonic() - seq._submitted
            try:
                capacity = seq.prompt_tokens + seq.params.max_new_tokens
                seq._kv = torch.empty(self._layers, capacity, 2, self._kv_heads, self._head_dim, dtype=self._dtype,
                                      device=self._device)
                seq._ids = torch.tensor(seq._prompt + [0] * seq.params.max_new_tokens, device=self._device)
                seq._generator = torch.Generator(device=self._device).manual_seed(seq.params.seed)
            except Exception as exc:  # e.g. out of device memory: this request fails, the others go on
                self._end(seq, None, _failure(exc))
                continue
            admitted.append(seq)

    def _prefill_chunk(self) -> tuple[list[Sequence], list[int]]:
        """The prompts (or the next chunks of long ones) to prefill in this step, oldest first, within
        `prefill_tokens` padded tokens: a burst of newcomers prefills in one forward, and a long prompt never stalls
        the running sequences for more than one such forward."""
        with self._cond:
            prefilling = [s for s in self._running if s._kv_len < s.prompt_tokens]
        group: list[Sequence] = []
        chunks: list[int] = []
        for seq in prefilling:
            chunk = min(seq.prompt_tokens - seq._kv_len, self.prefill_tokens)
            if group and (len(group) + 1) * max(chunk, *chunks) > self.prefill_tokens:
                break
            group.append(seq)
            chunks.append(chunk)
        return group, chunks

    def _forward(self, seqs: list[Sequence], new: list[int]) -> None:
        """Run one forward that adds `new[i]` tokens to sequence i (a prompt chunk, or the last reply token) and
        hand out the next token to every sequence whose prompt is done."""
        try:
            logits = self._logits(seqs, new)
            due = [i for i, s in enumerate(seqs) if s._kv_len == s.prompt_tokens + s.completion_tokens]
            ready, scores = [seqs[i] for i in due], logits[due]
            if self._observe is not None:
                self._observe(ready, scores)
            tokens = self._sample(ready, scores) if ready else []
        except Exception as exc:  # the model failed on this batch: these sequences fail, the engine goes on
            for seq in seqs:
                self._end(seq, None, _failure(exc))
            return
        for seq, token in zip(ready, tokens):
            if seq.cancelled:
                self._end(seq, "cancelled")
            elif token < 0:
                self._end(seq, None, EngineError("the model's scores for this request are not numbers (NaN)"))
            else:
                self._emit(seq, token)

    def _logits(self, seqs: list[Sequence], new: list[int]) -> torch.Tensor:
        """Feed each sequence its next `new` tokens; the float32 scores after each one's last, [len(seqs), vocab]."""
        device = self._device
        starts = torch.tensor([s._kv_len for s in seqs], device=device)
        width = max(new)
        filler = torch.zeros(width, dtype=torch.long, device=device)
        input_ids = _right_pad([s._ids[s._kv_len:s._kv_len + n] for s, n in zip(seqs, new)], width, filler)
        offsets = torch.arange(width, device=device)
        positions = starts[:, None] + offsets  # padding rows run on past their end, harmlessly
        # Row b's query i sees keys up to its own position, clamped to its last real token for padding queries.
        last_key = starts[:, None] + torch.minimum(offsets, torch.tensor(new, device=device)[:, None] - 1)
        key_len = max(s._kv_len + n for s, n in zip(seqs, new))
        if len(self._zeros) < key_len:  # the padding of the attention view grows with the longest sequence
            self._zeros = self._zeros.new_zeros(max(key_len, 2 * len(self._zeros)), *self._zeros.shape[1:])
        cache = _BatchKV(seqs, new, key_len, self._zeros)
        keys = torch.arange(key_len, device=device)
        allowed = keys[None, None, :] <= last_key[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=self._dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(self._dtype).min)
        keep = width - min(new) + 1  # the positions whose scores some row needs: each row's last real token
        logits = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask[:, None], cache=cache,
                            use_cache=True, logits_to_keep=keep).logits
        for seq, n in zip(seqs, new):
            seq._kv_len += n
        if keep == 1:  # every row ends at the last position (decode steps): no gather
            return logits[:, 0].float()
        picks = torch.tensor(new, device=device) - 1 - (width - keep)
        return logits[torch.arange(len(seqs), device=device), picks].float()

    def _sample(self, seqs: list[Sequence], scores: torch.Tensor) -> list[int]:
        """Each row's next token under its own settings, in a few ops for the whole batch; -1 where the scores are
        not numbers.

        The filters are transformers' (repetition penalty, then for sampled rows temperature, top-k, top-p), applied
        row by row with each row's own values. A sampled row then draws as `torch.multinomial` does for one sample,
        argmax(p / q) with q ~ Exp(1) from the row's own generator: a seed gives the reply `model.generate` gives
        after `torch.manual_seed` with that seed, whatever else is in the batch, and the batch's numerical noise can
        only change a draw whose two best candidates finish within that noise of each other (rare: their gap is
        of the order of the scores themselves, not of 1/vocabulary as with one uniform draw over the cumulative
        distribution).
        """
        params = [s.params for s in seqs]
        device, vocab = scores.device, scores.shape[-1]
        if any(p.repetition_penalty != 1 for p in params):
            penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
            width = max(s._kv_len for s in seqs)
            # pad each row with its own first id, which is already counted once
            ids = _right_pad([s._ids[:s._kv_len] for s in seqs], width, None)
            seen = scores.gather(1, ids)
            scores = scores.scatter(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))
        tokens = scores.argmax(-1)
        sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        if sampled:
            rows = torch.tensor(sampled, device=device)
            picked = [params[i] for i in sampled]
            warped = scores[rows] / torch.tensor([p.temperature for p in picked], device=device)[:, None]
            top_k = [min(p.top_k, vocab) for p in picked]
            if any(top_k):
                k = torch.tensor(top_k, device=device)[:, None]
                kth = warped.topk(max(top_k)).values.gather(1, (k - 1).clamp(min=0))
                warped = warped.masked_fill((warped < kth) & (k > 0), float("-inf"))
            if any(p.top_p < 1 for p in picked):
                top_p = torch.tensor([p.top_p for p in picked], device=device)[:, None]
                ordered, order = warped.sort(-1)
                remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
                remove[:, -1] = False  # the most likely token always stays
                warped = warped.masked_fill(remove.scatter(1, order, remove), float("-inf"))
            races = torch.stack([torch.empty(vocab, device=device).exponential_(generator=seqs[i]._generator)
                                 for i in sampled])
            tokens[rows] = (warped.softmax(-1) / races).argmax(-1)
        tokens[scores.isnan().any(-1)] = -1
        return tokens.tolist()

    def _emit(self, seq: Sequence, token: int) -> None:
        seq._ids[seq._kv_len] = token
        seq.completion_tokens += 1
        seq._queue.put(token)
        if token in seq._eos:
            self._end(seq, "stop")
        elif seq.completion_tokens >= seq.params.max_new_tokens:
            self._end(seq, "length")

    def _end(self, seq: Sequence, reason: str | None, error: BaseException | None = None) -> None:
        """Take the sequence out of the engine, free its KV memory and close its stream (loop thread only)."""
        if seq._ended:
            return
        seq._ended = True
        with self._cond:
            held = seq in self._running
            if held:
                self._running.remove(seq)
            elif seq in self._waiting:
                self._waiting.remove(seq)
        seq._kv = seq._ids = seq._generator = None
        if held:
            self._release(seq.kv_bytes)
        seq.finish_reason = reason
        seq._queue.put(_End(reason, error))
