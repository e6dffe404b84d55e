"""The Chat tab: a streaming multi-turn chat with a real Stop, retry / undo / clear, and per-reply statistics.

The tab is thin: `respond` turns the Chatbot history into a `ChatRequest` and relays `stream_chat`. Stop sets
the session's event, which the model's stopping criterion checks at every token; other sessions have their own
events. Gradio's queue (one concurrency group for all chat events) shows waiting users their position.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import gradio as gr

from studio.backends.chat import ChatRequest, complete_chat, option, stream_chat, validate_chat
from studio.runtime import Studio
from studio.spaces import chat_seconds, gpu
from studio.ui.controls import parse_seed, seed_box, shown_to_user

NOTICE = ("⚠️ **Answers may be wrong or made up.** Language models can hallucinate facts, names, numbers and "
          "sources; check anything that matters.")
DEFAULT_SYSTEM = "You are a helpful assistant."
UI_ENDPOINT = "ui:chat"
API_ENDPOINT = "gradio:chat"

History = list[dict[str, Any]]


class Sessions:
    """One Stop event per browser session and generation, so Stop ends that session's reply and no other."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}

    def arm(self, session: str) -> None:
        """A new message was sent: a fresh event, so an earlier Stop does not stop it."""
        self._events[session] = threading.Event()

    def event(self, session: str) -> threading.Event:
        return self._events.setdefault(session, threading.Event())

    def stop(self, session: str) -> None:
        if session in self._events:
            self._events[session].set()

    def done(self, session: str, event: threading.Event) -> None:
        if self._events.get(session) is event:
            del self._events[session]


def text_of(content: Any) -> str:
    """Chatbot content (a string, or Gradio's list of parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def plain(history: History | None) -> History:
    """The conversation as [{role, content: str}], the shape the chat service and the Chatbot both take."""
    return [{"role": m["role"], "content": text_of(m["content"])} for m in history or []
            if m.get("role") in ("user", "assistant")]


def add_message(message: str, history: History) -> tuple[str, History]:
    if not message or not message.strip():
        raise gr.Error("Type a message first.")
    return "", plain(history) + [{"role": "user", "content": message}]


def retry(history: History) -> History:
    """Drop the last reply so that the last message is answered again."""
    history = plain(history)
    while history and history[-1]["role"] == "assistant":
        history.pop()
    if not history:
        raise gr.Error("Nothing to retry yet.")
    return history


def undo(history: History) -> tuple[History, str]:
    """Remove the last exchange and put its message back into the text box."""
    history = plain(history)
    while history and history[-1]["role"] == "assistant":
        history.pop()
    if not history:
        return [], ""
    return history[:-1], history[-1]["content"]


def summary(event, model: str) -> str:
    """The status line under a finished reply."""
    parts = [f"**{event.usage['completion_tokens']} tokens** · {event.tokens_per_s:.1f} tokens/s",
             f"prompt {event.usage['prompt_tokens']} tokens", f"seed `{event.seed}`", model]
    if event.finish_reason == "cancelled":
        parts.append("stopped")
    elif event.finish_reason == "length":
        parts.append("reached max new tokens")
    line = " · ".join(parts)
    if event.dropped_turns:
        line += (f"\n\n⚠️ The conversation no longer fits {model}'s context window: its {event.dropped_turns} "
                 "oldest message(s) were left out of this reply (the system prompt was kept).")
    return line


def _resident(studio: Studio, model: str) -> bool:
    return any(m.id == model and m.state == "resident" for m in studio.cache.snapshot().models)


def respond(studio: Studio, history: History, model: str, system: str, max_new_tokens: float, temperature: float,
            top_p: float, top_k: float, repetition_penalty: float, seed: str | int | None, *, session: str | None,
            cancel: threading.Event, progress: Callable[[float, str], Any] | None = None,
            ) -> Iterator[tuple[History, str]]:
    """Answer the last user message of `history`, yielding (history, status) as the reply grows.

    `progress` (a gr.Progress) shows the model's loading on its first use."""
    history = plain(history)
    req = ChatRequest(messages=history, model=model, system=system or None, max_new_tokens=int(max_new_tokens),
                      temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                      repetition_penalty=float(repetition_penalty), seed=parse_seed(seed))
    with shown_to_user():
        validate_chat(studio, req)
    if cancel.is_set():  # Stop was pressed while the message waited in the queue
        yield history, "Stopped before the reply started."
        return
    if not _resident(studio, model):
        yield history, f"⏳ Loading **{model}** (first use; it may be downloaded first)…"
        if progress is not None:
            progress(0.0, f"Loading {model}…")
    reply = ""
    with shown_to_user():
        for event in stream_chat(studio, req, client="ui", endpoint=UI_ENDPOINT, session=session, cancel=cancel):
            # A new message dict each time: Gradio streams the difference to the previous value.
            if event.done:
                yield history + [{"role": "assistant", "content": reply}], summary(event, model)
            elif event.text:
                reply += event.text
                yield history + [{"role": "assistant", "content": reply}], "Generating…"


def build(studio: Studio) -> None:
    models = studio.models("chat")
    if not models:
        gr.Markdown("No chat model is registered in this profile.")
        return
    spec = studio.registry.get(models[0])
    sessions = Sessions()

    gr.Markdown(NOTICE, elem_id="chat-notice")
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat-history")
            with gr.Row():
                message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                     elem_id="chat-input")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
            with gr.Row():
                retry_btn = gr.Button("Retry", size="sm", elem_id="chat-retry")
                undo_btn = gr.Button("Undo", size="sm", elem_id="chat-undo")
                clear_btn = gr.Button("Clear", size="sm", elem_id="chat-clear")
            status = gr.Markdown(elem_id="chat-status")
        with gr.Column(scale=1):
            model = gr.Dropdown(models, value=models[0], label="Model")
            system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=3)
            max_new_tokens = gr.Slider(1, option(spec, "max_new_tokens"), option(spec, "default_max_new_tokens"),
                                       step=1, label="Max new tokens")
            temperature = gr.Slider(0, 2, option(spec, "temperature"), step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.01, 1, option(spec, "top_p"), step=0.01, label="Top-p")
            top_k = gr.Slider(0, 200, option(spec, "top_k"), step=1, label="Top-k (0 = off)")
            repetition_penalty = gr.Slider(1, 2, option(spec, "repetition_penalty"), step=0.01,
                                           label="Repetition penalty (1 = off)")
            seed = seed_box()
    params = [model, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]

    def model_defaults(model_id: str):
        chosen = studio.registry.get(model_id)
        cap = option(chosen, "max_new_tokens")
        return (gr.update(maximum=cap, value=option(chosen, "default_max_new_tokens")),
                *(option(chosen, name) for name in ("temperature", "top_p", "top_k", "repetition_penalty")))

    def send_message(text: str, history: History, request: gr.Request):
        sessions.arm(request.session_hash)
        return add_message(text, history)

    def retry_last(history: History, request: gr.Request):
        sessions.arm(request.session_hash)
        return retry(history)

    @gpu(lambda history, model_id, system_prompt, new_tokens, *_, **__: chat_seconds(int(new_tokens)))
    def run(history: History, model_id: str, system_prompt: str, new_tokens: float, temp: float, p: float, k: float,
            penalty: float, seed_value: str, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        cancel = sessions.event(request.session_hash)
        try:
            yield from respond(studio, history, model_id, system_prompt, new_tokens, temp, p, k, penalty, seed_value,
                               session=request.session_hash, cancel=cancel, progress=progress)
        finally:
            sessions.done(request.session_hash, cancel)

    def stop_reply(request: gr.Request):
        sessions.stop(request.session_hash)

    generation = {"fn": run, "inputs": [chatbot, *params], "outputs": [chatbot, status], "api_visibility": "private",
                  "concurrency_id": "chat", "concurrency_limit": studio.settings.concurrency}
    gr.on([message.submit, send.click], send_message, [message, chatbot], [message, chatbot], queue=False,
          api_visibility="private").success(**generation)
    retry_btn.click(retry_last, chatbot, chatbot, queue=False, api_visibility="private").success(**generation)
    undo_btn.click(undo, chatbot, [chatbot, message], queue=False, api_visibility="private")
    clear_btn.click(lambda: ([], "", ""), None, [chatbot, message, status], queue=False, api_visibility="private")
    chatbot.clear(lambda: "", None, status, queue=False, api_visibility="private")  # the Chatbot's own trash icon
    stop.click(stop_reply, None, None, queue=False, api_visibility="private")
    model.change(model_defaults, model, [max_new_tokens, temperature, top_p, top_k, repetition_penalty],
                 queue=False, api_visibility="private")

    def reply_seconds(message: str, model: str = models[0], system: str = "", history: list | None = None,
                      max_new_tokens: int | None = None, *_, **__) -> int:
        """GPU time for `chat`: the reply length asked for, else the model's default."""
        if not max_new_tokens and model in studio.registry:
            max_new_tokens = option(studio.registry.get(model), "default_max_new_tokens")
        return chat_seconds(max_new_tokens or 1)  # an unknown model fails at once

    @gpu(reply_seconds)
    def chat(message: str, model: str = models[0], system: str = DEFAULT_SYSTEM, history: list[dict] | None = None,
             max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, repetition_penalty: float | None = None, seed: int | None = None) -> str:
        """Chat with a local language model and get its whole reply. Answers may be wrong or made up.

        Args:
            message: The user's new message.
            model: A chat model id of this studio (see the Models tab); default: the first chat model.
            system: The system prompt; empty for none.
            history: Earlier turns, oldest first, as [{"role": "user" | "assistant", "content": "..."}].
            max_new_tokens: Most tokens in the reply (at most the model's cap); default: the model's default.
            temperature: Sampling temperature, 0 for greedy; default: the model's default.
            top_p: Nucleus sampling, in (0, 1]; default: the model's default.
            top_k: Sample among the k most likely tokens, 0 for all; default: the model's default.
            repetition_penalty: Above 1 discourages repeating text, 1 for none; default: the model's default.
            seed: Random seed for a reproducible reply; default: random.
        """
        req = ChatRequest(messages=plain(history) + [{"role": "user", "content": message}], model=model,
                          system=system or None, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)
        with shown_to_user():
            return complete_chat(studio, req, client="api", endpoint=API_ENDPOINT).text

    gr.api(chat, api_name="chat", concurrency_id="chat", concurrency_limit=studio.settings.concurrency)
