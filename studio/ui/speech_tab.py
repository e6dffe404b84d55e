"""The Speech tab: text, model, voice and seed in; an audio player, a WAV download, duration and speed out.

Stop sets the session's cancel event; `synthesize` checks it between pieces, so the request ends after the piece
being spoken and the clip made so far is shown (Gradio's `cancels=` would drop that partial result).
"""

from __future__ import annotations

import tempfile

import gradio as gr
from gradio.data_classes import FileData

from studio.backends.speech import MAX_TEXT_CHARS, SpeechRequest, SpeechResult, default_model, synthesize, wav_bytes
from studio.runtime import Studio
from studio.spaces import gpu, speech_seconds
from studio.ui.controls import StopFlags, parse_seed, seed_box, shown_to_user

BARK_CUES = ("**Bark cues:** write `[laughs]`, `[laughter]`, `[sighs]`, `[gasps]`, `[clears throat]` or `[music]` in "
             "the text; `...` or `—` for hesitation, `♪` around sung lyrics, CAPITALS for emphasis. Bark speaks about "
             "13 s per call, so long text is spoken sentence by sentence.")
SEED_INFO = "Empty: random. The same seed repeats a Bark or VITS clip; Piper's noise is fixed inside its ONNX graph."


def _voice_choices(studio: Studio, model_id: str | None) -> dict:
    """The voice picker's settings for a model: hidden when it has none, fixed when it has one."""
    options = studio.registry.get(model_id).options if model_id else {}
    voices = list(options.get("voices", []))
    value = options.get("default_voice") or (voices[0] if voices else None)
    return {"choices": voices, "value": value, "visible": bool(voices), "interactive": len(voices) > 1}


def _note(studio: Studio, model_id: str | None) -> str:
    return BARK_CUES if model_id and studio.registry.get(model_id).options.get("cues") else ""


def _wav_file(result: SpeechResult) -> str:
    with tempfile.NamedTemporaryFile(prefix="speech-", suffix=".wav", delete=False) as fh:
        fh.write(wav_bytes(result))
        return fh.name


def _summary(result: SpeechResult) -> str:
    speed = "faster" if result.rtf < 1 else "slower"
    text = (f"**{result.seconds:.2f} s** of audio at {result.sample_rate} Hz · real-time factor **{result.rtf:.2f}** "
            f"({speed} than real time) · {result.pieces} piece{'s' if result.pieces != 1 else ''}")
    if result.seed is not None:
        text += f" · seed {result.seed}"
    if result.stopped:
        text += f" · **stopped** after {result.pieces} of {result.total_pieces} pieces"
    return text


def build(studio: Studio) -> None:
    models = studio.models("speech")
    first = default_model(studio)
    flags = StopFlags()
    with gr.Row():
        with gr.Column(scale=3):
            text = gr.Textbox(label="Text", elem_id="speech-text", lines=6, max_length=MAX_TEXT_CHARS,
                              placeholder="Hello! This studio speaks with Bark, MMS-TTS and Piper.",
                              info=f"Up to {MAX_TEXT_CHARS:,} characters; long text is spoken sentence by sentence.")
            with gr.Row():
                model = gr.Dropdown(models, value=first, label="Model", elem_id="speech-model")
                voice = gr.Dropdown(label="Voice", elem_id="speech-voice", **_voice_choices(studio, first))
                seed = seed_box(SEED_INFO, elem_id="speech-seed")
            note = gr.Markdown(_note(studio, first))
            with gr.Row():
                speak = gr.Button("Speak", variant="primary", elem_id="speech-speak")
                stop = gr.Button("Stop", variant="stop", elem_id="speech-stop")
        with gr.Column(scale=2):
            audio = gr.Audio(label="Speech", type="filepath", format="wav", interactive=False, buttons=["download"])
            wav = gr.File(label="WAV download", interactive=False)
            stats = gr.Markdown(elem_id="speech-stats")

    def on_model(model_id: str | None):
        return gr.update(**_voice_choices(studio, model_id)), _note(studio, model_id)

    @gpu(lambda text_value, *_, **__: speech_seconds(text_value or ""))
    def run(text_value: str, model_id: str | None, voice_name: str | None, seed_text: str | None,
            request: gr.Request, progress=gr.Progress()):
        req = SpeechRequest(text=text_value or "", model=model_id or "", voice=voice_name or None,
                            seed=parse_seed(seed_text))
        session = request.session_hash or ""
        with flags.running(session) as cancel, shown_to_user():
            result = synthesize(studio, req, client="ui", endpoint="speech_tab", session=session, cancel=cancel,
                                progress=lambda fraction, desc: progress(fraction, desc=desc))
        if not result.pieces:
            return None, None, "Stopped before the first piece was spoken."
        path = _wav_file(result)
        return path, path, _summary(result)

    def stop_speaking(request: gr.Request) -> None:
        if not flags.stop(request.session_hash or ""):
            gr.Info("Nothing is being spoken.")

    @gpu(lambda text, *_, **__: speech_seconds(text or ""))
    def generate_speech(text: str, model: str = first or "", voice: str | None = None,
                        seed: int | None = None) -> FileData:
        """Speak text with one of the studio's speech models and return a 16-bit mono WAV file.

        Args:
            text: what to say, 1 to 2,000 characters; long text is spoken sentence by sentence and joined.
            model: the speech model id: {models}.
            voice: one of the model's voices (Bark: v2/en_speaker_0 to 9 and other languages); empty for its default.
            seed: 0 to 4294967295 to repeat a clip (Bark and VITS sample; Piper ignores it); empty for random.
        """
        req = SpeechRequest(text=text, model=model, voice=voice or None, seed=seed)
        with shown_to_user():
            result = synthesize(studio, req, client="api", endpoint="gradio:generate_speech")
        return FileData(path=_wav_file(result), mime_type="audio/wav")

    generate_speech.__doc__ = generate_speech.__doc__.format(models=", ".join(models) or "none")

    model.change(on_model, model, [voice, note], api_visibility="private")
    # The studio's per-model slots queue generations, so Gradio itself does not limit these events.
    speak.click(run, [text, model, voice, seed], [audio, wav, stats], api_visibility="private",
                concurrency_limit=None)
    stop.click(stop_speaking, None, None, queue=False, api_visibility="private")
    gr.api(generate_speech, api_name="generate_speech", concurrency_limit=None)
