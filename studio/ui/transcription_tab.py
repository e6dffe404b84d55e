"""The Speech tab's "Speech to text": a recording from the microphone or an uploaded file, the model and the language
in; the text (with a copy button), its timed segments, TXT/SRT/VTT downloads and the speed out.

Long recordings are transcribed in chunks (30 s for Whisper) with a progress bar per chunk. Stop sets the session's
cancel event; the service checks it between chunks, so the text heard so far is shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from studio.backends.transcription import (TranscriptionOptions, TranscriptionRequest, TranscriptionResult,
                                           language_name, to_srt, to_text, to_vtt, transcribe)
from studio.runtime import Studio
from studio.ui.controls import output_folder
from studio.ui.controls import Runner, new_request_id, traced, wire_generation

AUTO = "auto"
FORMATS = {"txt": to_text, "srt": to_srt, "vtt": to_vtt}


def language_choices(studio: Studio, model_id: str | None) -> dict:
    """The language picker of a model: "Detect" first when it has several; locked when it hears only one."""
    opts = TranscriptionOptions.of(studio.registry.get(model_id)) if model_id else TranscriptionOptions()
    named = [(f"{language_name(code).title()} ({code})", code) for code in opts.languages or ()]
    if len(named) == 1:
        return gr.update(choices=named, value=named[0][1], interactive=False)
    return gr.update(choices=[("Detect", AUTO), *named], value=AUTO, interactive=True)


def runner(studio: Studio) -> Runner[TranscriptionRequest, TranscriptionResult]:
    return Runner(studio, "speech-to-text", transcribe)


def to_request(studio: Studio, path: str | None, model: str | None, language: str | None, prompt: str | None,
               temperature: float | None = None) -> TranscriptionRequest:
    """The typed request for a recording or upload on disk (no file: empty audio, which the service refuses). At
    most one byte past the upload limit is read: the service refuses that much, and more is not worth reading."""
    audio = b""
    if path:
        with open(path, "rb") as file:
            audio = file.read(studio.upload_limit + 1)
    return TranscriptionRequest(audio=audio, filename=Path(path).name if path else None, model=model,
                                language=None if language in (None, "", AUTO) else language, prompt=prompt or None,
                                temperature=temperature)


def stamp(seconds: float) -> str:
    """m:ss.s, the way a player shows a position."""
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)}:{seconds:04.1f}"


def downloads(result: TranscriptionResult, name: str) -> list[str]:
    """The transcript as TXT, SRT and VTT files named after the recording."""
    folder = output_folder("transcript")
    paths = []
    for suffix, write in FORMATS.items():
        path = folder / f"{name}.{suffix}"
        path.write_text(write(result.transcript.segments), encoding="utf-8")
        paths.append(str(path))
    return paths


def summary(result: TranscriptionResult, told: bool) -> str:
    t = result.transcript
    speed = "faster" if result.rtf < 1 else "slower"
    heard = language_name(t.language).title() if t.language else "unknown language"
    parts = [f"**{t.duration:.2f} s** of audio", f"{heard} ({'given' if told else 'detected'})",
             f"real-time factor **{result.rtf:.2f}** ({speed} than real time)",
             f"{len(t.segments)} segment{'s' if len(t.segments) != 1 else ''}", result.model]
    if t.total_chunks > 1:
        parts.insert(3, f"{t.chunks} of {t.total_chunks} chunks")
    if t.stopped:
        parts.append("**stopped**: the text heard so far")
    elif not t.text:
        parts.append("no speech heard (a silent or empty recording gives no text)")
    return " · ".join(parts)


def transcribe_recording(stt: Runner, path: str | None, model: str | None, language: str | None,
                         prompt: str | None, *, session: str,
                         progress: Any = None) -> tuple[str, list[list[str]], list[str], str]:
    """Transcribe the recording: (text, segment rows, download paths, status)."""
    req = to_request(stt.studio, path, model, language, prompt)
    request_id = new_request_id()
    result = stt.run(req, session, progress, request_id=request_id)
    rows = [[stamp(s.start), stamp(s.end), s.text] for s in result.transcript.segments]
    name = Path(path).stem if path else "transcript"
    return result.text, rows, downloads(result, name), traced(summary(result, req.language is not None), request_id)


def build(studio: Studio) -> None:
    models = studio.models("speech-to-text")
    if not models:
        gr.Markdown("This profile has no speech-to-text model.")
        return
    stt = runner(studio)
    languages = language_choices(studio, models[0])
    limits = (f"Up to {studio.settings.max_audio_seconds / 60:g} minutes and {studio.upload_limit / 1e6:g} MB: "
              "WAV, FLAC, OGG, MP3, M4A or WebM. Long recordings are transcribed in chunks; Stop keeps the text "
              "heard so far. A silent recording gives no text.")
    with gr.Row():
        with gr.Column(scale=2):
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio file or recording",
                             elem_id="stt-audio")
            with gr.Row():
                model = gr.Dropdown(models, value=models[0], label="Model", elem_id="stt-model")
                language = gr.Dropdown(label="Language", elem_id="stt-language",
                                       **{k: languages[k] for k in ("choices", "value", "interactive")})
            prompt = gr.Textbox(label="Prompt", max_lines=2, elem_id="stt-prompt",
                                placeholder="optional: names and spellings to expect (Whisper)")
            with gr.Row():
                go = gr.Button("Transcribe", variant="primary", elem_id="stt-transcribe")
                stop = gr.Button("Stop", variant="stop", elem_id="stt-stop", interactive=False)
            gr.Markdown(limits)
        with gr.Column(scale=3):
            text = gr.Textbox(label="Text", lines=6, buttons=["copy"], interactive=False, elem_id="stt-text")
            segments = gr.Dataframe(headers=["start", "end", "text"], label="Segments", interactive=False,
                                    wrap=True, elem_id="stt-segments")
            files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="stt-files")
            stats = gr.Markdown(elem_id="stt-stats")

    def run(path: str | None, model_id: str | None, language_code: str | None, prompt_text: str | None,
            request: gr.Request, progress=gr.Progress()):
        return transcribe_recording(stt, path, model_id, language_code, prompt_text,
                                    session=request.session_hash or "", progress=progress)

    def stop_transcribing(request: gr.Request) -> None:
        if not stt.stop(request.session_hash or ""):
            gr.Info("Nothing is being transcribed.")

    def generate_transcript(audio: FileData, model: str = models[0], language: str | None = None,
                            prompt: str | None = None, response_format: str = "text",
                            temperature: float | None = None) -> str:
        """Transcribe speech in an audio file to text, or to SubRip (SRT) or WebVTT subtitles with timestamps.

        Args:
            audio: the recording: a WAV, FLAC, OGG, MP3, M4A or WebM file (a URL or data URI through MCP).
            model: the speech-to-text model id: {models}.
            language: ISO 639-1 code of the speech (en, de, fr...); empty to detect it.
            prompt: names and spellings to expect, or the text before this recording (Whisper); may be empty.
            response_format: text (default), srt or vtt.
            temperature: 0 (default, greedy) to 1.
        """
        if response_format not in ("text", "srt", "vtt"):
            raise gr.Error(f"response_format: must be text, srt or vtt, not {response_format!r}", print_exception=False)
        path = audio.get("path") if isinstance(audio, dict) else None  # gr.api hands files over as FileData dicts
        req = to_request(studio, path, model, language, prompt, temperature)
        result = stt.run(req, entry="generate_transcript")
        return {"srt": to_srt, "vtt": to_vtt}.get(response_format, to_text)(result.transcript.segments)

    generate_transcript.__doc__ = generate_transcript.__doc__.format(models=", ".join(models))

    model.change(lambda model_id: language_choices(studio, model_id), model, language, api_visibility="private")
    wire_generation([go.click], run, [audio, model, language, prompt], [text, segments, files, stats], status=stats,
                    go=go, stop=stop, concurrency_limit=None)
    stop.click(stop_transcribing, None, None, queue=False, api_visibility="private")
    gr.api(generate_transcript, api_name="generate_transcript", concurrency_limit=None)
