"""Chat: streaming on the model's own template, a Stop that ends the model's work, history that fits the context,
separate sessions, seeds and stop strings, and the same service behind the Chat tab, POST /generate/text and the
Gradio client endpoint."""

from __future__ import annotations

import json
import re
import threading
import time

import gradio as gr
import pytest

from conftest import call, collect_rows
from studio.backends.chat import ChatRequest, complete_chat, fit_history, stream_chat, validate
from studio.contract import InputError, UnknownModelError
from studio.ui import chat_tab

MODEL = "tiny-llama"  # context 256, cap 128 new tokens


def ask(text: str, model: str = MODEL, **fields) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], model=model, **fields)


def events_of(studio, req: ChatRequest, **fields) -> list:
    return list(stream_chat(studio, req, call(**fields)))


def reply(studio, req: ChatRequest, **fields):
    return complete_chat(studio, req, call(**fields))


GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_stream_is_plain_generate_on_the_models_chat_template(studio, model):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    events = events_of(studio, ChatRequest(messages=conversation[1:], model=model, system="Be brief.",
                                           max_new_tokens=32, **GREEDY))
    pieces, final = [e.text for e in events[:-1]], events[-1]
    assert final.done and not any(e.done for e in events[:-1])
    assert len(pieces) >= 3 and all(pieces)

    with studio.cache.use(model) as lease:  # the same model, called directly on its own chat template
        tokenizer, lm = lease.model.tokenizer, lease.model.model
        inputs = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        out = lm.generate(**inputs, max_new_tokens=32, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert "".join(pieces) == tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
    assert prompt_len > len(tokenizer("Be brief.Tell me a story")["input_ids"])  # the template adds its markers
    assert final.usage == {"prompt_tokens": prompt_len, "completion_tokens": out.shape[1] - prompt_len}
    assert final.finish_reason in ("stop", "length") and final.tokens_per_s > 0 and final.dropped_turns == 0


def test_seed_is_reported_and_reproduces_the_reply(studio):
    first = reply(studio, ask("Hi there", temperature=1.0, max_new_tokens=24))
    again = reply(studio, ask("Hi there", temperature=1.0, max_new_tokens=24, seed=first.seed))
    other = reply(studio, ask("Hi there", temperature=1.0, max_new_tokens=24, seed=(first.seed + 1) % 2**32))
    assert isinstance(first.seed, int) and again.seed == first.seed
    assert again.text == first.text and other.text != first.text


def test_stop_string_ends_the_reply_before_it(studio):
    full = reply(studio, ask("Hello", max_new_tokens=40, **GREEDY))
    stop = full.text[10:13]
    cut = reply(studio, ask("Hello", max_new_tokens=40, stop=[stop], **GREEDY))
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.usage["completion_tokens"] < full.usage["completion_tokens"]


def _slow_model(studio, monkeypatch, seconds: float = 0.02) -> None:
    """Make each forward pass of the tiny model take a while, like a real model, so timing is not a race."""
    with studio.cache.use(MODEL) as lease:
        lm = lease.model.model
        forward = lm.forward

        def slow(*args, **kwargs):
            time.sleep(seconds)
            return forward(*args, **kwargs)

        monkeypatch.setattr(lm, "forward", slow)


def test_stop_ends_generation_early_while_another_session_continues(make_studio, monkeypatch):
    studio = make_studio("--concurrency", "2")
    _slow_model(studio, monkeypatch)
    a, b = ask("Tell me about the sea", max_new_tokens=64, **GREEDY), ask("What is music?", max_new_tokens=48, **GREEDY)
    full_a, solo_b = reply(studio, a), reply(studio, b)
    cancel_a, cancel_b = threading.Event(), threading.Event()
    results: dict[str, list] = {}

    def session_a():
        events = []
        for event in stream_chat(studio, a, call("ui", session="a", cancel=cancel_a)):
            events.append(event)
            cancel_a.set()  # the user presses Stop as soon as the reply starts
        results["a"] = events

    def session_b():
        results["b"] = list(stream_chat(studio, b, call("ui", session="b", cancel=cancel_b)))

    threads = [threading.Thread(target=session_b), threading.Thread(target=session_a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stopped, other = results["a"][-1], results["b"][-1]
    assert stopped.finish_reason == "cancelled"
    assert stopped.usage["completion_tokens"] <= 6 < full_a.usage["completion_tokens"]  # a token or two after Stop
    assert full_a.text.startswith("".join(e.text for e in results["a"]))
    assert other.finish_reason != "cancelled" and not cancel_b.is_set()
    assert "".join(e.text for e in results["b"]) == solo_b.text and other.usage == solo_b.usage


def test_a_consumer_that_goes_away_stops_the_model_and_releases_it(studio, monkeypatch):
    _slow_model(studio, monkeypatch)  # 128 tokens would take over 2.5 s
    events = stream_chat(studio, ask("Hello", max_new_tokens=128, **GREEDY), call())
    next(events)
    start = time.monotonic()
    events.close()  # what a disconnected HTTP client or a closed Gradio stream does
    assert time.monotonic() - start < 1.0
    assert not any(t.name.startswith("chat-") and t.is_alive() for t in threading.enumerate())
    assert [m.pins for m in studio.cache.snapshot().models] == [0]


def test_concurrent_sessions_get_their_own_replies(make_studio):
    studio = make_studio("--concurrency", "2")
    requests = {"a": ask("Tell me about the sea", temperature=1.0, seed=1, max_new_tokens=32),
                "b": ask("What is music?", temperature=1.0, seed=2, max_new_tokens=32)}
    solo = {name: reply(studio, req).text for name, req in requests.items()}  # one at a time
    together: dict[str, str] = {}
    spans: dict[str, tuple[float, float]] = {}

    def session(name: str):
        start = time.monotonic()
        together[name] = complete_chat(studio, requests[name], call("ui", session=name)).text
        spans[name] = (start, time.monotonic())

    threads = [threading.Thread(target=session, args=(name,)) for name in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1]  # they really ran at the same time
    assert together == solo and solo["a"] != solo["b"]  # sampling with a request's own seed is not disturbed


def _long_history(turns: int) -> list[dict[str, str]]:
    history = []
    for i in range(turns):
        history += [{"role": "user", "content": f"Question {i}: tell me about the weather and the sea."},
                    {"role": "assistant", "content": f"Answer {i}: the quick brown fox jumps over the lazy dog."}]
    return history + [{"role": "user", "content": "NEWEST: what about music?"}]


def test_long_history_drops_oldest_turns_keeping_system_and_newest(studio):
    history = _long_history(20)
    final = events_of(studio, ChatRequest(messages=history, model=MODEL, system="SYSTEM: be brief",
                                          max_new_tokens=64, **GREEDY))[-1]
    assert final.done and final.dropped_turns > 0
    assert final.usage["prompt_tokens"] <= 256 - 64

    with studio.cache.use(MODEL) as lease:
        tokenizer = lease.model.tokenizer
        ids, dropped = fit_history(tokenizer, [{"role": "system", "content": "SYSTEM: be brief"}] + history, 192)
        prompt = tokenizer.decode(ids)
    assert dropped == final.dropped_turns and len(ids) == final.usage["prompt_tokens"]
    assert prompt.startswith("<|system|>\nSYSTEM: be brief</s>\n<|user|>\n")  # system, then a user turn
    assert "NEWEST: what about music?" in prompt and "Question 0:" not in prompt
    kept = prompt.count("Question ")
    assert f"Question {20 - kept}:" in prompt  # the newest turns are the ones kept

    with pytest.raises(InputError, match="^messages: "):  # only the newest message itself can be too long
        reply(studio, ask("word " * 400, max_new_tokens=64))


@pytest.mark.parametrize("fields, field", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"temperature": 1e-300}, "temperature"),  # passed once, then broke sampling (inf logits)
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),  # a lone surrogate
    ({"system": "\ud800"}, "system"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 129}, "max_new_tokens"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"model": "tiny-sd"}, "model"),
])
def test_validate_names_the_bad_field(studio, fields, field):
    req = ask("hello")
    for name, value in fields.items():
        setattr(req, name, value)
    with pytest.raises(InputError, match=f"^{re.escape(field)}: ") as raised:
        validate(studio, req)
    assert raised.value.field == field


def test_unknown_model_is_not_found(studio):
    with pytest.raises(UnknownModelError):
        validate(studio, ask("hello", model="nope"))


def _sse(text: str) -> list:
    chunks = [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]
    assert chunks[-1] == "[DONE]"
    return [json.loads(chunk) for chunk in chunks[:-1]]


def test_generate_text_json_and_stream_agree(http):
    body = {"prompt": "Tell me a story", "model": MODEL, "max_new_tokens": 24, "temperature": 0}
    answer = http.post("/generate/text", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["model"] == MODEL and isinstance(data["seed"], int) and data["text"]
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"] > 0

    streamed = http.post("/generate/text", json={**body, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = _sse(streamed.text)
    assert len(events) >= 3 and all(not e["done"] for e in events[:-1]) and events[-1]["done"]
    assert "".join(e["text"] for e in events) == data["text"]
    assert events[-1]["usage"] == data["usage"] and events[-1]["finish_reason"] == data["finish_reason"]

    chat = http.post("/generate/text", json={"messages": [{"role": "user", "content": "Tell me a story"}],
                                             "model": MODEL, "max_new_tokens": 24, "temperature": 0})
    assert chat.json()["text"] == data["text"]  # `prompt` is the one-message conversation


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({}, 422, "prompt"),
    ({"prompt": "hi", "model": "nope"}, 404, "model"),
    ({"prompt": "hi", "model": "tiny-sd"}, 422, "model"),
    ({"prompt": "hi", "temperature": -0.5}, 422, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 422, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, 422, "top_p"),
    ({"prompt": "hi", "max_new_tokens": 129}, 422, "max_new_tokens"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 422, "messages"),
    ({"prompt": "word " * 400, "stream": True}, 422, "messages"),  # too long: still an HTTP error, not a stream
])
def test_generate_text_rejects_bad_input(http, body, status, field):
    answer = http.post("/generate/text", json=body)
    assert answer.status_code == status, answer.text
    assert field in json.dumps(answer.json()["detail"])


def test_generate_text_rejects_a_body_that_is_not_json(http):
    answer = http.post("/generate/text", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code in (400, 422) and "JSON" in json.dumps(answer.json()["detail"])


def test_generate_text_obeys_api_keys(make_studio):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.server import app_kwargs

    with TestClient(FastAPI(**app_kwargs(make_studio("--api-key", "k-1")))) as client:
        body = {"prompt": "hi", "model": MODEL, "max_new_tokens": 4}
        assert client.post("/generate/text", json=body).status_code == 401
        assert client.post("/generate/text", json=body, headers={"Authorization": "Bearer k-1"}).status_code == 200


def test_chat_tab_streams_and_reports_tokens_seed_and_dropped_turns(studio):
    chat = chat_tab.runner(studio)
    rows = collect_rows(studio)
    # A fixed seed: with a random one the random-weight model may emit only partial UTF-8 bytes, which the
    # streamer holds back until the end, so the reply would arrive in one piece.
    sampling = (MODEL, "Be brief.", 24, 0.7, 0.95, 50, 1.1, "5")
    turns = list(chat_tab.send_message(chat, "Hello there", [], *sampling, session="s1"))
    assert turns[0] == ([{"role": "user", "content": "Hello there"}], "", "Generating…")  # shown at once
    assert all(box == gr.update() for _, box, _ in turns[1:])  # cleared once: the next message may be typed meanwhile
    outputs = [(h, status) for h, _, status in turns[1:]]
    assert "Loading" in outputs[0][1]  # first use shows the model loading
    replies = [h[-1]["content"] for h, _ in outputs[1:]]
    assert len(set(replies)) >= 3 and all(later.startswith(r) for r, later in zip(replies, replies[1:]))
    history, status = outputs[-1]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[-1]["content"]
    assert "tokens/s" in status and "seed `5`" in status
    assert status.endswith(f"request `{rows[-1]['request_id']}`")  # the id a user can quote is the log row's

    assert chat_tab.retry(history) == history[:1]
    assert chat_tab.undo(history) == ([], "Hello there")
    nothing = list(chat_tab.send_message(chat, "  ", history, *sampling, session="s1"))
    assert len(nothing) == 1 and all(update == gr.update() for update in nothing[0])  # an empty box sends nothing
    # A failed turn: the history as it was, the message back in the box, the reason in the status line.
    *_, failed = chat_tab.send_message(chat, "Again", history, MODEL, "", 8, 0, 1, 0, 1, "abc", session="s1")
    assert failed == (history, "Again", "⚠️ seed: 'abc' is not a whole number; leave it empty for a random seed")

    long = _long_history(20)
    *_, (_, status) = chat_tab.respond(chat, long, MODEL, "", 64, 0, 1, 0, 1, 7, session="s2")
    assert "left out" in status and "seed `7`" in status


def test_chat_tab_stop_ends_only_that_sessions_reply(make_studio, monkeypatch):
    studio = make_studio("--concurrency", "2")
    _slow_model(studio, monkeypatch)
    chat = chat_tab.runner(studio)
    hi = [{"role": "user", "content": "Tell me about the sea"}]
    results: dict[str, list] = {}

    def session(name: str) -> None:
        outputs = []
        for history, status in chat_tab.respond(chat, hi, MODEL, "", 64, 0, 1, 0, 1, "1", session=name):
            outputs.append((history, status))
            if name == "mine" and status == "Generating…" and len(outputs) == 3:
                assert chat.stop("mine")  # Stop pressed while the reply streams
        results[name] = outputs

    threads = [threading.Thread(target=session, args=(name,)) for name in ("mine", "theirs")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    mine, theirs = results["mine"][-1], results["theirs"][-1]
    assert "stopped" in mine[1] and "stopped" not in theirs[1]
    assert len(mine[0][-1]["content"]) < len(theirs[0][-1]["content"])  # same greedy reply, cut short
    assert theirs[0][-1]["content"].startswith(mine[0][-1]["content"])
    assert not chat.stop("mine"), "nothing runs for the session any more"


def test_gradio_client_text_endpoint(live_server):
    from gradio_client import Client

    _studio, url = live_server
    client = Client(url, verbose=False)
    first = client.predict("Hello", model=MODEL, temperature=0.0, max_new_tokens=12, api_name="/generate_text")
    again = client.predict("Hello", model=MODEL, temperature=0.0, max_new_tokens=12, api_name="/generate_text")
    assert isinstance(first, str) and first and first == again
