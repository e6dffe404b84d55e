"""The batch engine: concurrent streams that are each complete and in order, replies that do not depend on batch
mates (greedy and seeded), cancel within a step, KV memory reserved before admission and released at the end,
errors that reach only their own sequences, and a close that leaves no thread behind."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from studio.backends.batching import BatchEngine, EngineBusy, EngineClosed, EngineError, SamplingParams
from studio.registry import ModelSpec
from studio.tiny.text import build_llama, build_qwen2

CONTEXT = 256
QUESTIONS = ["Hello! How can I help you today?", "Tell me about the sea", "What is a language model?",
             "Write a story about a robot", "weather", "Check the facts before you use them in your work, please.",
             "music, science, history or cooking", "The quick brown fox"]


def load_tiny(folder, builder) -> tuple:
    """A tiny chat model in float32: (model, tokenizer, prompts of different lengths)."""
    builder(folder, ModelSpec(id="tiny", modality="chat", label="tiny", loader="x", params=1,
                              options={"context_length": CONTEXT}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]) for q in QUESTIONS]
    return model, tokenizer, prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("tiny-llama"), build_llama)


@pytest.fixture
def make_engine(tiny):
    engines = []

    def make(**kwargs) -> BatchEngine:
        model, tokenizer, _ = tiny
        engines.append(BatchEngine(model, [tokenizer.eos_token_id], max_context=CONTEXT, **kwargs))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def read_all(seqs) -> list[list[int]]:
    """Each sequence read to its end on its own thread, as concurrent clients would."""
    out: list[list[int] | BaseException] = [[] for _ in seqs]

    def read(i):
        try:
            out[i] = list(seqs[i])
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(seqs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


MIXED = [SamplingParams(max_new_tokens=24),
         SamplingParams(max_new_tokens=16, temperature=0.8, seed=1),
         SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=2, eos_token_ids=()),
         SamplingParams(max_new_tokens=20, repetition_penalty=1.3),
         SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, repetition_penalty=1.1, seed=3),
         SamplingParams(max_new_tokens=40, eos_token_ids=()),
         SamplingParams(max_new_tokens=8, temperature=1.5, top_k=5, top_p=0.5, seed=4),
         SamplingParams(max_new_tokens=28, temperature=0.0, top_k=3, seed=5)]


def test_concurrent_requests_each_get_their_own_complete_stream(tiny, make_engine):
    _, _, prompts = tiny
    engine = make_engine(max_batch=8)
    alone = [list(engine.submit(p, params)) for p, params in zip(prompts, MIXED)]
    seqs = [engine.submit(p, params) for p, params in zip(prompts, MIXED)]
    batched = read_all(seqs)

    assert batched == alone  # greedy, penalised and seeded replies alike: batch mates change nothing
    for seq, tokens, params in zip(seqs, batched, MIXED):
        assert seq.completion_tokens == len(tokens) and seq.prompt_tokens > 0
        if seq.finish_reason == "length":
            assert len(tokens) == params.max_new_tokens
        else:
            assert seq.finish_reason == "stop" and tokens[-1] in engine.eos and len(tokens) <= params.max_new_tokens
    assert engine.stats().kv_bytes == 0


def test_greedy_matches_generate_and_stays_greedy_beside_sampled(tiny, make_engine):
    model, _, prompts = tiny
    engine = make_engine()
    greedy = SamplingParams(max_new_tokens=20)
    noisy = SamplingParams(max_new_tokens=20, temperature=1.2, seed=9)
    seqs = [engine.submit(p, greedy if i % 2 == 0 else noisy) for i, p in enumerate(prompts)]
    replies = read_all(seqs)
    for prompt, tokens in list(zip(prompts, replies))[::2]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
        assert tokens == out[0, len(prompt):].tolist()

    penalised = list(engine.submit(prompts[0], SamplingParams(max_new_tokens=20, repetition_penalty=1.5)))
    out = model.generate(torch.tensor([prompts[0]]), max_new_tokens=20, do_sample=False, repetition_penalty=1.5)
    assert penalised == out[0, len(prompts[0]):].tolist()


def test_greedy_matches_generate_on_qwen2_too(tmp_path):
    model, tokenizer, prompts = load_tiny(tmp_path, build_qwen2)
    engine = BatchEngine(model, [tokenizer.eos_token_id], max_context=CONTEXT)
    try:
        replies = read_all([engine.submit(p, SamplingParams(max_new_tokens=16)) for p in prompts])
    finally:
        engine.close()
    for prompt, tokens in zip(prompts, replies):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
        assert tokens == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("settings", [{"temperature": 0.8}, {"temperature": 1.3, "top_k": 20, "top_p": 0.9},
                                      {"temperature": 0.6, "top_p": 0.5, "repetition_penalty": 1.2}])
def test_a_seeded_reply_is_the_one_generate_samples_with_that_seed(tiny, make_engine, settings):
    model, _, prompts = tiny
    mine = list(make_engine().submit(prompts[2], SamplingParams(max_new_tokens=24, seed=77, **settings)))
    torch.manual_seed(77)
    out = model.generate(torch.tensor([prompts[2]]), max_new_tokens=24, do_sample=True,
                         **{"top_k": 0, "top_p": 1.0, **settings})
    assert mine == out[0, len(prompts[2]):].tolist()


def test_the_narrowest_filters_sample_the_top_token(tiny, make_engine):
    _, _, prompts = tiny
    engine = make_engine()
    greedy = list(engine.submit(prompts[3], SamplingParams(max_new_tokens=16)))
    for narrow in (SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1, seed=7),
                   SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=7)):
        assert list(engine.submit(prompts[3], narrow)) == greedy


def test_a_seed_gives_the_same_reply_alone_and_in_any_batch(tiny, make_engine):
    _, _, prompts = tiny
    engine = make_engine()
    params = SamplingParams(max_new_tokens=32, temperature=1.0, top_p=0.95, top_k=50, seed=42, eos_token_ids=())
    alone = list(engine.submit(prompts[0], params))
    crowd = [engine.submit(p, SamplingParams(max_new_tokens=32, temperature=1.0, seed=i)) for i, p in
             enumerate(prompts[1:])]
    mine = engine.submit(prompts[0], params)
    assert read_all([mine, *crowd])[0] == alone
    assert list(engine.submit(prompts[0], replace(params, seed=43))) != alone


def test_cancel_ends_only_its_own_sequence_within_a_step_and_frees_its_memory(tiny, make_engine):
    _, _, prompts = tiny
    released: list[tuple[int, int]] = []  # (bytes, sequences still running)
    target: list = []

    def observe(seqs, _logits):
        if target and target[0].completion_tokens == 3:
            target[0].cancel()

    engine = make_engine(observe=observe, release=lambda n: released.append((n, engine.stats().running)))
    params = SamplingParams(max_new_tokens=60, eos_token_ids=())
    seqs = [engine.submit(p, params) for p in prompts[:3]]
    target.append(seqs[1])
    replies = read_all(seqs)

    assert seqs[1].finish_reason == "cancelled" and len(replies[1]) == 3  # cancelled at the very next step
    assert [s.finish_reason for s in (seqs[0], seqs[2])] == ["length", "length"]
    assert [len(r) for r in (replies[0], replies[2])] == [60, 60]
    assert released[0] == (seqs[1].kv_bytes, 2)  # freed at once, while the others still ran
    assert engine.stats().kv_bytes == 0


def test_cancel_before_admission_never_runs_and_the_callers_event_works_alike(tiny, make_engine):
    _, _, prompts = tiny
    engine = make_engine(reserve=lambda n: False)
    seq = engine.submit(prompts[0], SamplingParams(max_new_tokens=8))
    seq.cancel()
    assert list(seq) == [] and seq.finish_reason == "cancelled"

    stop = threading.Event()
    seq = make_engine().submit(prompts[0], SamplingParams(max_new_tokens=100, eos_token_ids=()), cancel=stop)
    tokens = []
    for token in seq:
        tokens.append(token)
        if len(tokens) == 2:
            stop.set()  # the Stop button: the engine sees it by itself at its next step
    assert seq.finish_reason == "cancelled" and len(tokens) < 100


def test_a_refused_reservation_waits_then_runs_after_a_release(tiny, make_engine):
    _, _, prompts = tiny
    lock = threading.Lock()
    budget = {"free": 0, "peak_used": 0}
    log: list[str] = []
    seen_waiting: list[int] = []

    def reserve(n: int) -> bool:
        with lock:
            if n > budget["free"]:
                return False
            budget["free"] -= n
            budget["peak_used"] = max(budget["peak_used"], capacity - budget["free"])
            log.append("reserve")
            return True

    def release(n: int) -> None:
        with lock:
            budget["free"] += n
            log.append("release")

    engine = make_engine(reserve=reserve, release=release, observe=lambda *_: seen_waiting.append(
        engine.stats().waiting))
    params = SamplingParams(max_new_tokens=20, eos_token_ids=())
    capacity = engine.kv_bytes(max(len(p) for p in prompts[:2]), params.max_new_tokens)  # room for one, not two
    budget["free"] = capacity
    first, second = engine.submit(prompts[0], params), engine.submit(prompts[1], params)
    replies = read_all([first, second])

    assert [len(r) for r in replies] == [20, 20]
    assert log == ["reserve", "release", "reserve", "release"]  # the second only once the first gave memory back
    assert 1 in seen_waiting and budget["peak_used"] <= capacity
    assert second.wait_s > first.wait_s


def test_max_batch_bounds_the_running_sequences_in_fifo_order(tiny, make_engine):
    _, _, prompts = tiny
    sizes, started = [], []

    def observe(seqs, _logits):
        sizes.append(len(seqs))
        started.extend(s for s in seqs if s not in started)

    engine = make_engine(max_batch=2, observe=observe)
    seqs = [engine.submit(p, SamplingParams(max_new_tokens=6, eos_token_ids=())) for p in prompts[:5]]
    assert [len(r) for r in read_all(seqs)] == [6] * 5
    assert max(sizes) == 2 and started == seqs


def test_waiting_too_long_fails_with_busy(tiny, make_engine):
    _, _, prompts = tiny
    engine = make_engine(reserve=lambda n: False, max_wait_s=0.2)
    with pytest.raises(EngineBusy):
        list(engine.submit(prompts[0], SamplingParams(max_new_tokens=4)))


def test_prompt_and_reply_must_fit_the_context(tiny, make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="context window"):
        engine.submit([1] * (CONTEXT - 10), SamplingParams(max_new_tokens=11))


def test_an_error_in_the_model_fails_its_sequences_and_the_engine_goes_on(tiny, make_engine, monkeypatch):
    model, _, prompts = tiny
    broken = threading.Event()
    real = model.forward

    def flaky(*args, **kwargs):
        if broken.is_set():
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    def trip_once(seqs, _logits):
        if seqs[0].completion_tokens == 2 and not tripped.is_set():
            tripped.set()
            broken.set()

    tripped = threading.Event()
    monkeypatch.setattr(model, "forward", flaky)
    engine = make_engine(observe=trip_once)
    seqs = [engine.submit(p, SamplingParams(max_new_tokens=10, eos_token_ids=())) for p in prompts[:2]]
    outcomes = read_all(seqs)
    assert all(isinstance(o, EngineError) and "boom" in str(o) and isinstance(o.__cause__, RuntimeError)
               for o in outcomes)
    assert outcomes[0] is not outcomes[1] and [s.completion_tokens for s in seqs] == [3, 3]
    assert engine.stats().kv_bytes == 0 and engine.stats().alive

    broken.clear()
    assert len(list(engine.submit(prompts[0], SamplingParams(max_new_tokens=5, eos_token_ids=())))) == 5


def test_close_ends_everything_and_leaves_no_thread(tiny, make_engine):
    _, _, prompts = tiny
    others = {t for t in threading.enumerate() if t.name == "batch-engine"}  # engines of other tests' studios
    released: list[int] = []
    granted = threading.Event()

    def reserve(n: int) -> bool:
        if granted.is_set():
            return False  # the second request waits
        granted.set()
        return True

    def close_after_two(seqs, _logits):  # from inside the loop, so the running sequence is surely mid-reply
        if running.completion_tokens == 2:
            engine.close()

    engine = make_engine(reserve=reserve, release=released.append, observe=close_after_two)
    running = engine.submit(prompts[0], SamplingParams(max_new_tokens=100, eos_token_ids=()))
    waiting = engine.submit(prompts[1], SamplingParams(max_new_tokens=4))
    tokens = []
    with pytest.raises(EngineClosed):
        tokens.extend(running)
    engine.close()  # and from outside: waits for the loop to end

    assert not {t for t in threading.enumerate() if t.name == "batch-engine"} - others
    assert len(tokens) == 3
    with pytest.raises(EngineClosed):
        list(waiting)
    assert released == [running.kv_bytes] and not engine.stats().alive
    with pytest.raises(EngineClosed):
        engine.submit(prompts[0], SamplingParams(max_new_tokens=4))


def test_long_prompts_prefill_in_chunks_between_decode_steps_with_the_same_reply(tiny, make_engine, monkeypatch):
    model, _, prompts = tiny
    widths: list[int] = []
    engine = make_engine(prefill_tokens=8)  # every prompt here is longer: prefilled 8 tokens a step
    greedy = SamplingParams(max_new_tokens=12, eos_token_ids=())
    reference = [list(make_engine().submit(p, greedy)) for p in prompts[:4]]
    real = model.forward

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    replies = read_all([engine.submit(p, greedy) for p in prompts[:4]])
    assert replies == reference
    assert max(widths) == 8 and 1 in widths[:len(widths) // 2]  # decode steps ran while prompts still prefilled
