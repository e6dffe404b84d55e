"""The Speech tab's "Text to speech": text, model, voice and seed in; an audio player (with its download), the
duration and the speed out.

Stop sets the session's cancel event; `synthesize` checks it between pieces, so the request ends after the piece
being spoken and the clip made so far is shown (Gradio's `cancels=` would drop that partial result).
"""

from __future__ import annotations


import gradio as gr
from gradio.data_classes import FileData

from studio.backends.speech import MAX_TEXT_CHARS, SpeechOptions, SpeechRequest, SpeechResult, synthesize, wav_bytes
from studio.runtime import Studio
from studio.ui.controls import output_folder
from studio.ui.controls import Runner, model_picker, new_request_id, parse_seed, seed_box, traced, wire_generation

BARK_CUES = ("**Bark cues:** write `[laughs]`, `[laughter]`, `[sighs]`, `[gasps]`, `[clears throat]` or `[music]` in "
             "the text; `...` or `—` for hesitation, `♪` around sung lyrics, CAPITALS for emphasis. Bark speaks about "
             "13 s per call, so long text is spoken sentence by sentence.")
SEED_INFO = "Empty: random. The same seed repeats the clip."
# The character counter under the text, counted in the browser (no request per key). The box has no maxlength:
# pasted text is never cut silently; text over the limit is refused with a message when spoken.
COUNTER_JS = (f"(text) => {{ const n = [...(text || '')].length; return n > {MAX_TEXT_CHARS} ? "
              f"`**${{n.toLocaleString('en')}} / {MAX_TEXT_CHARS:,} characters**: ${{(n - {MAX_TEXT_CHARS})"
              f".toLocaleString('en')}} over the limit; shorten the text` : `${{n.toLocaleString('en')}} / "
              f"{MAX_TEXT_CHARS:,} characters`; }}")


def model_controls(studio: Studio, model_id: str | None) -> tuple[dict, dict, str]:
    """The voice picker (hidden when the model has one voice), the seed box (hidden when the model takes no seed)
    and the note on cues, for a model."""
    opts = SpeechOptions.of(studio.registry.get(model_id)) if model_id else SpeechOptions()
    voices = list(opts.voices or ())
    voice = gr.update(choices=voices, value=opts.default_voice or (voices[0] if voices else None),
                      visible=bool(voices), interactive=len(voices) > 1)
    return voice, gr.update(visible=bool(opts.seeded)), BARK_CUES if opts.cues else ""


def _wav_file(result: SpeechResult) -> str:
    path = output_folder("speech") / "speech.wav"
    path.write_bytes(wav_bytes(result))
    return str(path)


def summary(result: SpeechResult) -> str:
    speed = "faster" if result.rtf < 1 else "slower"
    text = (f"**{result.seconds:.2f} s** of audio at {result.sample_rate} Hz · real-time factor **{result.rtf:.2f}** "
            f"({speed} than real time) · {result.pieces} piece{'s' if result.pieces != 1 else ''}")
    if result.seed is not None:
        text += f" · seed {result.seed}"
    if result.stopped:
        text += f" · **stopped** after {result.pieces} of {result.total_pieces} pieces"
    return text


def runner(studio: Studio) -> Runner[SpeechRequest, SpeechResult]:
    return Runner(studio, "text-to-speech", synthesize)


def speak(speech: Runner, text: str, model: str | None, voice: str | None, seed: str | None, *, session: str,
          progress=None) -> tuple[str | None, str]:
    """Speak the text: (WAV path or None, status)."""
    req = SpeechRequest(text=text or "", model=model, voice=voice or None, seed=parse_seed(seed))
    request_id = new_request_id()
    result = speech.run(req, session, progress, request_id=request_id)
    if not result.pieces:
        return None, traced("Stopped before the first piece was spoken.", request_id)
    return _wav_file(result), traced(summary(result), request_id)


def build(studio: Studio) -> None:
    models = studio.models("text-to-speech")
    if not models:
        gr.Markdown("This profile has no text-to-speech model.")
        return
    speech = runner(studio)
    voice_u, seed_u, note_text = model_controls(studio, models[0])
    with gr.Row():
        with gr.Column(scale=3):
            text = gr.Textbox(label="Text", elem_id="speech-text", lines=6,
                              placeholder="Hello! This studio speaks with Bark, MMS-TTS and Piper.",
                              info=f"Up to {MAX_TEXT_CHARS:,} characters; long text is spoken sentence by sentence.")
            counter = gr.Markdown(f"0 / {MAX_TEXT_CHARS:,} characters", elem_id="speech-counter")
            with gr.Row():
                model = model_picker(studio, "text-to-speech", elem_id="speech-model")
                voice = gr.Dropdown(label="Voice", elem_id="speech-voice",
                                    **{k: voice_u[k] for k in ("choices", "value", "visible", "interactive")})
                seed = seed_box(SEED_INFO, elem_id="speech-seed", visible=seed_u["visible"])
            note = gr.Markdown(note_text)
            with gr.Row():
                go = gr.Button("Speak", variant="primary", elem_id="speech-speak")
                stop = gr.Button("Stop", variant="stop", elem_id="speech-stop", interactive=False)
        with gr.Column(scale=2):
            audio = gr.Audio(label="Speech", type="filepath", format="wav", interactive=False, buttons=["download"])
            stats = gr.Markdown(elem_id="speech-stats")

    def run(text_value: str, model_id: str | None, voice_name: str | None, seed_text: str | None,
            request: gr.Request, progress=gr.Progress()):
        return speak(speech, text_value, model_id, voice_name, seed_text, session=request.session_hash or "",
                     progress=progress)

    def stop_speaking(request: gr.Request) -> None:
        if not speech.stop(request.session_hash or ""):
            gr.Info("Nothing is being spoken.")

    def generate_speech(text: str, model: str = models[0], voice: str | None = None,
                        seed: int | None = None) -> FileData:
        """Speak text with one of the studio's speech models and return a 16-bit mono WAV file.

        Args:
            text: what to say, 1 to 2,000 characters; long text is spoken sentence by sentence and joined.
            model: the speech model id: {models}.
            voice: one of the model's voices (Bark: v2/en_speaker_0 to 9 and other languages); empty for its default.
            seed: 0 to 4294967295 to repeat a clip (Bark and VITS sample; Piper ignores it); empty for random.
        """
        req = SpeechRequest(text=text, model=model, voice=voice or None, seed=seed)
        return FileData(path=_wav_file(speech.run(req, entry="generate_speech")), mime_type="audio/wav")

    generate_speech.__doc__ = generate_speech.__doc__.format(models=", ".join(models))

    model.change(lambda model_id: model_controls(studio, model_id), model, [voice, seed, note],
                 api_visibility="private")
    # The studio's per-model slots queue generations, so Gradio itself does not limit these events.
    wire_generation([go.click], run, [text, model, voice, seed], [audio, stats], status=stats, go=go, stop=stop,
                    concurrency_limit=None)
    text.change(None, text, counter, js=COUNTER_JS, api_visibility="private")
    stop.click(stop_speaking, None, None, queue=False, api_visibility="private")
    gr.api(generate_speech, api_name="generate_speech", concurrency_limit=None)
