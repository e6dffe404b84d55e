"""The Chat tab's "Voice chat": press Record and speak, press Stop recording, and the rest happens by itself: the
studio transcribes, the chat model's answer streams into the conversation, and the answer is spoken with the
chosen voice sentence by sentence, starting before the text is finished. Stop ends everything: the model that is
running, the turn, and the playback.

The turn itself is `studio.backends.voice_chat.voice_chat` (the three services in a row); this module is layout
and glue. Each spoken sentence reaches the page as the new value of a hidden audio component, and a few lines of
JavaScript queue the sentences on one player, so they play back to back as they come. (Gradio's own streamed audio
output would need ffmpeg and ffprobe on the server and adds an AAC/HLS encoding step to every sentence.)
"""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr
import numpy as np

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
PLAYER = '<audio id="voice-player" controls preload="auto"></audio>'
# Queue a new sentence (the hidden component's new value) on the player; the next one starts when one ends.
PLAY = """(clip) => {
    const player = document.getElementById("voice-player");
    const queue = (window.studioVoiceQueue ??= []);
    if (clip && clip.url) queue.push(clip.url);
    if (!player.dataset.queued) {
        player.dataset.queued = "yes";
        player.addEventListener("ended", () => {
            if (queue.length) { player.src = queue.shift(); player.play(); }
        });
    }
    if ((player.paused || player.ended) && queue.length && !(player.currentTime > 0 && !player.ended)) {
        player.src = queue.shift();
        player.play();
    }
    return [];
}"""
SILENCE = """() => {
    (window.studioVoiceQueue ??= []).length = 0;
    const player = document.getElementById("voice-player");
    if (player) { player.pause(); player.removeAttribute("src"); player.load(); }
    return [];
}"""

Clip = tuple[int, np.ndarray]  # one spoken sentence: (sample rate, 16-bit samples)
Update = tuple[History, str, Clip | None]  # the conversation, the status line, the next sentence to play


def pcm16(audio: np.ndarray, sample_rate: int) -> Clip:
    """16-bit samples as they are: Gradio would scale float audio to its peak, each sentence to another level."""
    return sample_rate, (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


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
    req = VoiceChatRequest(heard=to_request(turns.studio, recording, hearer, language, None),
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
            clip = pcm16(event.audio, event.sample_rate)
            yield [*history, {"role": "assistant", "content": reply}], "Speaking…", clip
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
                with gr.Column():
                    gr.Markdown("**Answer**")
                    gr.HTML(PLAYER)
            sentence = gr.Audio(visible="hidden", format="wav", elem_id="voice-sentence")
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
        # The recorder is cleared at once, so that Record is there for the next turn.
        for conversation, line, clip in talk(turns, recording, history, hearer_id, language_code, talker_id,
                                             system_prompt, new_tokens, seed_text, voice_id, voice_name,
                                             session=request.session_hash or "", progress=progress):
            yield conversation, line, gr.skip() if clip is None else clip, None

    def stop_everything(request: gr.Request) -> None:
        turns.stop(request.session_hash or "")

    hearer.change(lambda model_id: language_choices(studio, model_id), hearer, language, api_visibility="private")
    voice_model.change(lambda model_id: model_controls(studio, model_id)[0], voice_model, voice,
                       api_visibility="private")
    settings = [hearer, language, talker, system, max_new_tokens, seed, voice_model, voice]
    mic.stop_recording(run, [mic, chatbot, *settings], [chatbot, status, sentence, mic], api_visibility="private",
                       concurrency_limit=None)
    sentence.change(None, sentence, None, js=PLAY, api_visibility="private")
    stop.click(stop_everything, None, None, js=SILENCE, queue=False, api_visibility="private")
    clear.click(lambda: ([], ""), None, [chatbot, status], js=SILENCE, queue=False, api_visibility="private")
