"""The Chat tab: a streaming multi-turn chat with a real Stop, retry / undo / clear, and per-reply statistics.

Layout in `build`, named handlers below it, the wiring at the end. `respond` turns the Chatbot history into a
`ChatRequest` and relays the chat service through the tab's Runner (studio.ui.controls): Stop sets the session's
cancel event, which the model's stopping criterion checks at every token; other sessions have their own.
"""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from studio.backends.chat import ChatEvent, ChatOptions, ChatRequest, complete_chat, stream_chat
from studio.runtime import Studio
from studio.ui.controls import Runner, model_picker, new_request_id, parse_seed, seed_box, traced, wire_generation

NOTICE = ("⚠️ **Answers may be wrong or made up.** Language models can hallucinate facts, names, numbers and "
          "sources; check anything that matters.")
DEFAULT_SYSTEM = "You are a helpful assistant."

History = list[dict[str, Any]]


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


def retry(history: History) -> History:
    """The conversation without its last reply, so that the last message is answered again (empty: nothing to
    retry)."""
    history = plain(history)
    while history and history[-1]["role"] == "assistant":
        history.pop()
    return history


def undo(history: History) -> tuple[History, str]:
    """Remove the last exchange and put its message back into the text box."""
    history = plain(history)
    while history and history[-1]["role"] == "assistant":
        history.pop()
    if not history:
        return [], ""
    return history[:-1], history[-1]["content"]


def summary(event: ChatEvent) -> str:
    """The status line under a finished reply."""
    parts = [f"**{event.usage['completion_tokens']} tokens** · {event.tokens_per_s:.1f} tokens/s",
             f"prompt {event.usage['prompt_tokens']} tokens", f"seed `{event.seed}`", event.model]
    if event.finish_reason == "cancelled":
        parts.append("stopped")
    elif event.finish_reason == "length":
        parts.append("reached max new tokens")
    line = " · ".join(parts)
    if event.dropped_turns:
        line += (f"\n\n⚠️ The conversation no longer fits {event.model}'s context window: its "
                 f"{event.dropped_turns} oldest message(s) were left out of this reply (the system prompt was kept).")
    return line


def runner(studio: Studio) -> Runner[ChatRequest, Iterator[ChatEvent]]:
    return Runner(studio, "chat", stream_chat)


def respond(chat: Runner, history: History, model: str, system: str, max_new_tokens: float, temperature: float,
            top_p: float, top_k: float, repetition_penalty: float, seed: str | int | None, *, session: str,
            progress: Any = None) -> Iterator[tuple[History, str]]:
    """Answer the last user message of `history`, yielding (history, status) as the reply grows; the finished
    reply's status line ends with its request id.

    `progress` (a gr.Progress) shows the model's loading on its first use."""
    history = plain(history)
    req = ChatRequest(messages=history, model=model, system=system or None, max_new_tokens=int(max_new_tokens),
                      temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                      repetition_penalty=float(repetition_penalty), seed=parse_seed(seed))
    if not chat.studio.cache.resident(model):
        yield history, f"⏳ Loading **{model}** (first use; it may be downloaded first)…"
    reply, request_id = "", new_request_id()
    for event in chat.stream(req, session, progress, request_id=request_id):
        # A new message dict each time: Gradio streams the difference to the previous value.
        if event.done:
            yield history + [{"role": "assistant", "content": reply}], traced(summary(event), request_id)
        elif event.text:
            reply += event.text
            yield history + [{"role": "assistant", "content": reply}], "Generating…"


def turn(chat: Runner, typed: Any, before: History, asked: History, *sampling: Any, session: str,
         progress: Any = None) -> Iterator[tuple[History, Any, str]]:
    """Answer the last message of `asked`, yielding (history, text box, status). A failed turn shows its message
    as a toast and in the status, puts `typed` back in the box and the history as it was `before`; the
    conversation is never covered by an error badge."""
    try:
        yield asked, "", "Generating…"
        for history, status in respond(chat, asked, *sampling, session=session, progress=progress):
            yield history, gr.update(), status  # the box is left alone: the next message may be typed meanwhile
    except gr.Error as exc:
        gr.Warning(exc.message)
        yield before, typed, f"⚠️ {exc.message}"


def send_message(chat: Runner, message: str, history: History, *sampling: Any, session: str,
                 progress: Any = None) -> Iterator[tuple[History, Any, str]]:
    """The box's message as a new turn; an empty box sends nothing and changes nothing."""
    if not (message or "").strip():
        yield gr.update(), gr.update(), gr.update()
        return
    before = plain(history)
    yield from turn(chat, message, before, before + [{"role": "user", "content": message}], *sampling,
                    session=session, progress=progress)


def retry_reply(chat: Runner, history: History, *sampling: Any, session: str,
                progress: Any = None) -> Iterator[tuple[History, Any, str]]:
    """The last message answered again."""
    asked = retry(history)
    if not asked:
        gr.Info("Nothing to retry yet.")
        yield gr.update(), gr.update(), gr.update()
        return
    yield from turn(chat, gr.update(), plain(history), asked, *sampling, session=session, progress=progress)


def model_defaults(studio: Studio, model_id: str) -> list:
    """The sliders set to a model's defaults and caps."""
    opts = ChatOptions.of(studio.registry.get(model_id))
    return [gr.update(maximum=opts.max_new_tokens, value=opts.default_max_new_tokens), opts.temperature, opts.top_p,
            opts.top_k, opts.repetition_penalty]


def build(studio: Studio) -> None:
    models = studio.models("chat")
    if not models:
        gr.Markdown("No chat model is registered in this profile.")
        return
    opts = ChatOptions.of(studio.registry.get(models[0]))
    chat = runner(studio)

    gr.Markdown(NOTICE, elem_id="chat-notice")
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat-history")
            with gr.Row():
                message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                     elem_id="chat-input")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop", interactive=False)
            with gr.Row():
                retry_btn = gr.Button("Retry", size="sm", elem_id="chat-retry")
                undo_btn = gr.Button("Undo", size="sm", elem_id="chat-undo")
                clear_btn = gr.Button("Clear", size="sm", elem_id="chat-clear")
            status = gr.Markdown(elem_id="chat-status")
        with gr.Column(scale=1):
            model = model_picker(studio, "chat", elem_id="chat-model")
            system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=3)
            max_new_tokens = gr.Slider(1, opts.max_new_tokens, opts.default_max_new_tokens, step=1,
                                       label="Max new tokens")
            temperature = gr.Slider(0, 2, opts.temperature, step=0.01, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.01, 1, opts.top_p, step=0.01, label="Top-p")
            top_k = gr.Slider(0, 200, opts.top_k, step=1, label="Top-k (0 = off)")
            repetition_penalty = gr.Slider(1, 2, opts.repetition_penalty, step=0.01,
                                           label="Repetition penalty (1 = off)")
            seed = seed_box()
    sampling = [model, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]

    def run(message_text: str, history: History, model_id: str, system_prompt: str, new_tokens: float, temp: float,
            p: float, k: float, penalty: float, seed_text: str, request: gr.Request,
            progress=gr.Progress(track_tqdm=True)):
        yield from send_message(chat, message_text, history, model_id, system_prompt, new_tokens, temp, p, k,
                                penalty, seed_text, session=request.session_hash or "", progress=progress)

    def run_again(history: History, model_id: str, system_prompt: str, new_tokens: float, temp: float, p: float,
                  k: float, penalty: float, seed_text: str, request: gr.Request,
                  progress=gr.Progress(track_tqdm=True)):
        yield from retry_reply(chat, history, model_id, system_prompt, new_tokens, temp, p, k, penalty, seed_text,
                               session=request.session_hash or "", progress=progress)

    def stop_reply(request: gr.Request) -> None:
        chat.stop(request.session_hash or "")

    def generate_text(message: str, model: str = models[0], system: str = DEFAULT_SYSTEM,
                      history: list[dict] | None = None, max_new_tokens: int | None = None,
                      temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                      repetition_penalty: float | None = None, seed: int | None = None) -> str:
        """Chat with a language model and get its whole reply. Answers may be wrong or made up.

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
        return whole.run(req, entry="generate_text").text

    whole = Runner(studio, "chat", complete_chat)
    # Replies decode together (continuous batching): up to --max-batch turns run at once.
    # Send and Retry share one running flag: neither starts a turn while the other's runs; Undo and Clear wait too.
    batching = {"status": None, "go": [send, retry_btn, undo_btn, clear_btn], "stop": stop, "running": gr.State(False),
                "concurrency_id": "chat", "concurrency_limit": studio.settings.max_batch}
    wire_generation([message.submit, send.click], run, [message, chatbot, *sampling], [chatbot, message, status],
                    **batching)
    wire_generation([retry_btn.click], run_again, [chatbot, *sampling], [chatbot, message, status], **batching)
    undo_btn.click(undo, chatbot, [chatbot, message], queue=False, api_visibility="private")
    clear_btn.click(lambda: ([], "", ""), None, [chatbot, message, status], queue=False, api_visibility="private")
    chatbot.clear(lambda: "", None, status, queue=False, api_visibility="private")  # the Chatbot's own trash icon
    stop.click(stop_reply, None, None, queue=False, api_visibility="private")
    model.change(lambda model_id: model_defaults(studio, model_id), model,
                 [max_new_tokens, temperature, top_p, top_k, repetition_penalty], queue=False,
                 api_visibility="private")
    gr.api(generate_text, api_name="generate_text", concurrency_id="chat",
           concurrency_limit=studio.settings.max_batch)
