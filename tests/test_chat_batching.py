"""Continuous batching behind every door (issue 17): concurrent requests to one chat model decode together, each
gets its own complete stream, usage and log row; Stop and a gone client end only their own sequence; the KV cache
comes from the memory budget (a request that does not fit waits, never overshoots); a busy model is not evicted and
an idle one gives its KV memory back."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from gradio_client import Client

from conftest import call, collect_rows, free_port, serving, tiny_studio
from studio.backends.chat import ChatRequest, complete_chat, prompt_ids, stream_chat
from studio.ui import chat_tab

MODEL = "tiny-llama"
HELLO = [{"role": "user", "content": "Tell me about the sea"}]
STEP_SECONDS = 0.03  # each forward of the tiny model takes a while, like a real one: requests overlap for sure


def _slow(studio) -> None:
    with studio.cache.use(MODEL) as lease:
        lm = lease.model.model
        forward = lm.forward
        lm.forward = lambda *a, **k: (time.sleep(STEP_SECONDS), forward(*a, **k))[1]


def _watch(studio, stop: threading.Event, seen: list[tuple[int, int]]) -> None:
    """Record the model's (running, waiting) while requests run."""
    while not stop.is_set():
        seen += [(m.running, m.waiting) for m in studio.cache.snapshot().models if m.id == MODEL and m.running]
        time.sleep(0.01)


def _settles(studio, seconds: float = 30) -> bool:
    """The model's batch empties and its KV memory goes back (a cancelled sequence leaves at the engine's next
    step, not at once)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(m.running in (0, None) and m.workspace_bytes == 0 for m in studio.cache.snapshot().models):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    studio = tiny_studio(tmp_path_factory.mktemp("batching-logs"), "--port", str(free_port()), "--max-batch", "8")
    _slow(studio)
    with serving(studio) as (_demo, url):
        yield studio, url


# Each request: (door, settings). Greedy and seeded sampled replies, different lengths and stop strings.
REQUESTS = [
    ("rest", {"max_new_tokens": 24, "temperature": 0.0}),
    ("rest", {"max_new_tokens": 16, "temperature": 0.9, "top_k": 20, "seed": 3}),
    ("openai", {"max_new_tokens": 20, "temperature": 0.0, "repetition_penalty": 1.3}),
    ("openai", {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.8, "seed": 11}),
    ("gradio", {"max_new_tokens": 18, "temperature": 0.0}),
    ("ui", {"max_new_tokens": 22, "temperature": 0.7, "seed": 5}),
]


def _ask(door: str, settings: dict, url: str, studio) -> tuple[str, dict]:
    """One request through `door`: (reply text, usage); streamed where the door streams."""
    if door == "rest":
        body = {"messages": HELLO, "model": MODEL, "stream": True, **settings}
        with httpx.stream("POST", f"{url}/generate/text", json=body, timeout=120) as answer:
            events = [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {")]
        usage = events[-1]["usage"]
        return "".join(e["text"] for e in events), {k: usage[k] for k in ("prompt_tokens", "completion_tokens")}
    if door == "openai":
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        extra = {k: settings[k] for k in ("top_k", "repetition_penalty") if k in settings}
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True},
            max_tokens=settings["max_new_tokens"], temperature=settings["temperature"], top_p=settings.get("top_p"),
            seed=settings.get("seed"), extra_body=extra or None))
        usage = chunks[-1].usage
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    if door == "gradio":
        text = Client(url, verbose=False).predict(HELLO[0]["content"], MODEL, "", None, api_name="/generate_text",
                                                  **{k: v for k, v in settings.items()})
        return text, {}
    outputs = list(chat_tab.respond(chat_tab.runner(studio), HELLO, MODEL, "", settings["max_new_tokens"],
                                    settings["temperature"], 1.0, 0, 1.0, str(settings["seed"]), session="batch"))
    return outputs[-1][0][-1]["content"], {}


UI_SLIDERS = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}  # what `respond` is given below


def _alone(studio, settings: dict) -> tuple[str, dict]:
    result = complete_chat(studio, ChatRequest(HELLO, MODEL, **settings), call())
    return result.text, result.usage


def test_concurrent_requests_through_every_door_decode_together_and_get_their_own_replies(live):
    studio, url = live
    expected = [_alone(studio, {**settings, **(UI_SLIDERS if door == "ui" else {})}) for door, settings in REQUESTS]
    rows = collect_rows(studio)
    got: dict[int, tuple[str, dict]] = {}
    seen: list[tuple[int, int]] = []
    watching = threading.Event()
    watcher = threading.Thread(target=_watch, args=(studio, watching, seen))
    watcher.start()

    def one(index: int) -> None:
        got[index] = _ask(*REQUESTS[index], url, studio)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(REQUESTS))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    watching.set()
    watcher.join()

    assert max(running for running, _ in seen) >= 3, f"the requests did not share a batch: {seen}"
    for index, (door, settings) in enumerate(REQUESTS):
        text, usage = got[index]
        assert text and text == expected[index][0], (door, settings)  # its own reply, whatever else was batched
        assert not usage or usage == expected[index][1], (door, usage)
    ours = [r for r in rows if r["model"] == MODEL]
    assert len(ours) == len(REQUESTS) and all(r["status"] == "ok" and r["ttft_ms"] for r in ours)
    assert {r["client"] for r in ours} == {"rest", "openai", "gradio", "ui"}
    assert _settles(studio) and all(m.pins == 0 for m in studio.cache.snapshot().models)


def test_stop_and_a_gone_client_end_only_their_own_sequence(live):
    studio, _url = live
    greedy = {"max_new_tokens": 40, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    full = _alone(studio, greedy)[0]
    stop, results = threading.Event(), {}

    def stopped() -> None:
        events = []
        for event in stream_chat(studio, ChatRequest(HELLO, MODEL, **greedy), call("ui", cancel=stop)):
            events.append(event)
            if len(events) == 3:
                stop.set()  # Stop pressed mid-reply
        results["stopped"] = events

    def gone() -> None:
        events = stream_chat(studio, ChatRequest(HELLO, MODEL, **greedy), call())
        results["gone"] = [next(events), next(events)]
        events.close()  # the client disconnected

    def kept() -> None:
        results["kept"] = list(stream_chat(studio, ChatRequest(HELLO, MODEL, **greedy), call()))

    workers = [threading.Thread(target=f) for f in (kept, stopped, gone)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    final = results["stopped"][-1]
    assert final.finish_reason == "cancelled" and final.usage["completion_tokens"] < 40
    assert full.startswith("".join(e.text for e in results["stopped"]))
    assert len(results["gone"]) == 2
    assert "".join(e.text for e in results["kept"]) == full and results["kept"][-1].finish_reason != "cancelled"
    assert _settles(studio)


def test_the_kv_cache_comes_from_the_budget_and_a_request_that_does_not_fit_waits(tmp_path):
    """Room for the model and one sequence's KV cache, not two: the second request waits for the first to end,
    then runs; the budget is never exceeded and nothing fails."""
    hi = [{"role": "user", "content": "hi"}]
    probe = tiny_studio(tmp_path / "probe")
    with probe.cache.use(MODEL) as lease:
        per_sequence = lease.model.engine.kv_bytes(len(prompt_ids(lease.model.tokenizer, hi)), 48)
    model_bytes = next(m.bytes for m in probe.cache.snapshot().models)
    budget = model_bytes + per_sequence * 3 // 2
    studio = tiny_studio(tmp_path / "logs", "--memory-budget", str(budget), "--max-batch", "4")
    _slow(studio)
    replies, seen, watching = {}, [], threading.Event()
    watcher = threading.Thread(target=_watch, args=(studio, watching, seen))
    watcher.start()

    def ask(name: str) -> None:
        replies[name] = complete_chat(studio, ChatRequest(hi, MODEL, max_new_tokens=48, temperature=0.0), call())

    workers = [threading.Thread(target=ask, args=(name,)) for name in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    watching.set()
    watcher.join()
    snap = studio.cache.snapshot()
    assert replies["a"].text == replies["b"].text and replies["a"].usage["completion_tokens"] == 48
    assert snap.peak_bytes <= budget and snap.load_failures == 0
    assert max(running for running, _ in seen) == 1 and max(waiting for _, waiting in seen) == 1, \
        "one sequence ran while the other waited for KV memory"


def test_a_busy_model_is_not_evicted_and_an_idle_one_gives_its_kv_back(tmp_path):
    studio = tiny_studio(tmp_path / "logs")
    _slow(studio)
    with studio.cache.use(MODEL) as lease:
        engine = lease.model.engine
    events = stream_chat(studio, ChatRequest(HELLO, MODEL, max_new_tokens=64, temperature=0.0), call())
    next(events)
    status = next(m for m in studio.cache.snapshot().models if m.id == MODEL)
    assert status.running == 1 and status.workspace_bytes > 0
    assert not studio.cache.unload(MODEL), "a model with a running batch is pinned"
    events.close()
    assert _settles(studio)
    assert studio.cache.unload(MODEL)
    assert studio.cache.snapshot().used_bytes == 0
    assert not engine.stats().alive, "eviction closed the model's engine (its thread, its KV cache)"
