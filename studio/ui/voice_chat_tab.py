"""The Chat tab's "Voice chat": press Record and speak, press Stop recording, and the rest happens by itself: the
studio transcribes, the chat model's answer streams into the conversation, and the answer is spoken with the
chosen voice sentence by sentence, starting before the text is finished. Stop ends everything: the model that is
running, the turn, and the playback.

The turn itself is `studio.backends.voice_chat.voice_chat` (the three services in a row); this module is layout
and glue. The answer plays through Gradio's streamed audio output, one WAV chunk per spoken sentence.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import numpy as np
import soundfile

from studio.backends.chat import ChatOptions, ChatRequest
from studio.backends.speech import SpeechRequest
from studio.backends.voice_chat import (Finished, Heard, Loading, Replying, Spoken, VoiceChatRequest, gpu_seconds,
                                        voice_chat)
from studio.runtime import Studio
from studio.ui.chat_tab import History, plain
from studio.ui.controls import Runner, parse_seed, seed_box
from studio.ui.speech_tab import model_controls
from studio.ui.transcription_tab import language_choices, to_request

SYSTEM = ("You are a helpful assistant in a spoken conversation. Answer briefly, in plain sentences that read well "
          "aloud.")
HOW = ("🎙️ Press **Record**, speak, and press **Stop** on the recorder: the studio hears you, answers in the "
       "conversation and speaks the answer as it is written. **Stop everything** ends the answer and its playback.")
ROLES = {"speech-to-text": "speech to text", "chat": "chat", "text-to-speech": "voice"}

Update = tuple[History, str, bytes | None]  # the conversation, the status line, the next chunk of spoken answer


def ffmpeg_on_path() -> None:
    """Gradio encodes streamed audio with an `ffmpeg` it finds on PATH. Without a system one, the binary inside
    the imageio-ffmpeg wheel (a requirement already, for video) is linked into a private folder put on PATH."""
    if shutil.which("ffmpeg"):
        return
    import imageio_ffmpeg

    folder = Path(tempfile.gettempdir()) / f"studio-ffmpeg-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    link = folder / "ffmpeg"
    if not link.exists():
        link.symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """One sentence as a 16-bit WAV chunk, the format Gradio's audio stream reads without a decoder process."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def summary(event: Finished) -> str:
    """The status line of a finished turn: how long each step made the user wait."""
    split = event.timings.split()
    if split["end_of_speech_to_first_sound_s"] is None:
        return "Stopped." if event.stopped else "Answered without speech."
    line = (f"**{split['end_of_speech_to_first_sound_s']:.1f} s** from the end of your speech to the first sound: "
            f"heard in {split['transcription_s']:.1f} s, first token {split['first_token_s']:.1f} s later, first "
            f"sentence spoken {split['first_spoken_sentence_s']:.1f} s after that · {event.sentences} sentence"
            f"{'s' if event.sentences != 1 else ''}")
    if event.reply is not None:
        line += f" · {event.reply.usage['completion_tokens']} tokens · {event.reply.model}"
    return line + (" · **stopped**" if event.stopped else "")


def runner(studio: Studio) -> Runner[VoiceChatRequest, Iterator[Any]]:
    return Runner(studio, "voice-chat", voice_chat, gpu_seconds=gpu_seconds)


def talk(turns: Runner, recording: str | None, history: History, hearer: str, language: str | None, talker: str,
         system: str, max_new_tokens: float, seed: str | None, voice_model: str, voice: str | None, *,
         session: str, progress: Any = None) -> Iterator[Update]:
    """One spoken turn: the conversation, the status and each spoken sentence's audio as they come."""
    history = plain(history)
    req = VoiceChatRequest(heard=to_request(recording, hearer, language, None),
                           chat=ChatRequest(messages=history, model=talker, system=system or None,
                                            max_new_tokens=int(max_new_tokens), seed=parse_seed(seed)),
                           speech=SpeechRequest(text="", model=voice_model, voice=voice or None))
    yield history, "Listening to your recording…", None
    reply = ""
    for event in turns.stream(req, session, progress):
        if isinstance(event, Loading):
            yield history, f"⏳ Loading **{event.model}** ({ROLES[event.modality]}; first use)…", None
        elif isinstance(event, Heard):
            if event.text:
                history = [*history, {"role": "user", "content": event.text}]
            yield history, "Answering…" if event.text else "No speech heard: try again, a little louder.", None
        elif isinstance(event, Replying):
            reply += event.text
            yield [*history, {"role": "assistant", "content": reply}], "Answering…", None
        elif isinstance(event, Spoken):
            chunk = wav(event.audio, event.sample_rate)
            yield [*history, {"role": "assistant", "content": reply}], "Speaking…", chunk
        elif isinstance(event, Finished):
            done = [*history, {"role": "assistant", "content": reply}] if reply else history
            yield done, summary(event), None


def build(studio: Studio) -> None:
    hearers, chats, voices = studio.models("speech-to-text"), studio.models("chat"), studio.models("text-to-speech")
    missing = [role for role, models in (("speech-to-text", hearers), ("chat", chats), ("text-to-speech", voices))
               if not models]
    if missing:
        gr.Markdown(f"Voice chat needs a model of each kind; this profile has no {' and no '.join(missing)} model.")
        return
    ffmpeg_on_path()
    turns = runner(studio)
    languages = language_choices(studio, hearers[0])
    voice_u, _seed, _note = model_controls(studio, voices[0])
    opts = ChatOptions.of(studio.registry.get(chats[0]))

    gr.Markdown(HOW)
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", height=380, elem_id="voice-history")
            with gr.Row():
                mic = gr.Audio(sources=["microphone"], type="filepath", label="Talk", elem_id="voice-mic")
                answer = gr.Audio(label="Answer", streaming=True, autoplay=True, interactive=False,
                                  elem_id="voice-answer")
            with gr.Row():
                stop = gr.Button("Stop everything", variant="stop", elem_id="voice-stop")
                clear = gr.Button("Clear", elem_id="voice-clear")
            status = gr.Markdown(elem_id="voice-status")
        with gr.Column(scale=1):
            hearer = gr.Dropdown(hearers, value=hearers[0], label="Speech to text", elem_id="voice-hearer")
            language = gr.Dropdown(label="Language", elem_id="voice-language",
                                   **{k: languages[k] for k in ("choices", "value", "interactive")})
            talker = gr.Dropdown(chats, value=chats[0], label="Chat model", elem_id="voice-chat-model")
            system = gr.Textbox(SYSTEM, label="System prompt", lines=3)
            max_new_tokens = gr.Slider(1, opts.max_new_tokens, opts.default_max_new_tokens, step=1,
                                       label="Max new tokens")
            seed = seed_box("Empty: random. The same seed and words give the same reply.", elem_id="voice-seed")
            voice_model = gr.Dropdown(voices, value=voices[0], label="Voice model", elem_id="voice-model")
            voice = gr.Dropdown(label="Voice", elem_id="voice-voice",
                                **{k: voice_u[k] for k in ("choices", "value", "visible", "interactive")})

    def run(recording: str | None, history: History, hearer_id: str, language_code: str | None, talker_id: str,
            system_prompt: str, new_tokens: float, seed_text: str | None, voice_id: str, voice_name: str | None,
            request: gr.Request, progress=gr.Progress()):
        # The recorder is cleared at once, so that Record is there for the next turn. The audio stream opens with
        # the first sentence: opened empty, the player's playlist has no segments and it retries.
        for conversation, line, chunk in talk(turns, recording, history, hearer_id, language_code, talker_id,
                                              system_prompt, new_tokens, seed_text, voice_id, voice_name,
                                              session=request.session_hash or "", progress=progress):
            yield conversation, line, gr.skip() if chunk is None else chunk, None

    def stop_everything(request: gr.Request) -> None:
        turns.stop(request.session_hash or "")
        return None  # the answer's player: silence

    hearer.change(lambda model_id: language_choices(studio, model_id), hearer, language, api_visibility="private")
    voice_model.change(lambda model_id: model_controls(studio, model_id)[0], voice_model, voice,
                       api_visibility="private")
    settings = [hearer, language, talker, system, max_new_tokens, seed, voice_model, voice]
    mic.stop_recording(run, [mic, chatbot, *settings], [chatbot, status, answer, mic], api_visibility="private",
                       concurrency_limit=None)
    stop.click(stop_everything, None, answer, queue=False, api_visibility="private")
    clear.click(lambda: ([], "", None), None, [chatbot, status, answer], queue=False, api_visibility="private")
