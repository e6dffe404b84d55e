"""Replay one mixed request trace under the three serving strategies of the model cache.

Four Llama-architecture chat models of different sizes (random weights, written to disk once and loaded with
`from_pretrained` on every cache miss, exactly as the studio loads models) receive a Zipf-like trace. The
`lru` and `swap` runs get a budget smaller than the models' total; `preload` gets one where everything fits.
Each request is one decoding step (a forward pass over a short prompt), so the run shows what the strategies cost
rather than the models' speed; with longer generations the compute, the same under every strategy, dominates.
The strategies run side by side: every request of the trace goes to each strategy's cache in turn (rotating the
order), so a noisy machine slows them alike.

    python bench/serving_strategies.py            # writes bench/results/serving_strategies.json
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("STUDIO_TINY_DIR", str(Path(tempfile.gettempdir()) / "studio-bench-models"))
sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, so `studio` imports

import torch  # noqa: E402

from studio.cache import ModelCache  # noqa: E402
from studio.registry import ModelSpec, Registry  # noqa: E402

MB = 2**20
# (id, hidden size, layers): about 70, 140, 260 and 460 MiB of float32 weights
MODELS = [("chat-xs", 512, 4), ("chat-s", 768, 4), ("chat-m", 1024, 5), ("chat-l", 1280, 6)]
REQUESTS = 300
ZIPF_S = 1.1


def build_model(folder: Path, spec: ModelSpec) -> None:
    """Called by the studio's weights module on first use, like a tiny-profile builder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = spec.options["hidden"], spec.options["layers"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)


def registry() -> Registry:
    specs = []
    for model_id, hidden, layers in MODELS:
        params = 8192 * hidden * 2 + layers * (4 * hidden * hidden + 3 * hidden * hidden * 2)
        specs.append(ModelSpec(id=model_id, modality="chat", label=model_id, params=params,
                               build="__main__:build_model", loader="__main__:load_model",
                               options={"hidden": hidden, "layers": layers}))
    return Registry("bench", specs)


def load_model(spec: ModelSpec, path: Path, device: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def trace(ids: list[str]) -> list[str]:
    """Zipf-like popularity: the k-th model is requested with weight 1 / k**s; a fixed seed for every run."""
    rng = random.Random(42)
    weights = [1 / (k + 1) ** ZIPF_S for k in range(len(ids))]
    order = ids[:]
    rng.shuffle(order)  # popularity does not follow size
    return rng.choices(order, weights=weights, k=REQUESTS)


def replay(reg: Registry, setups: dict[str, tuple[str, int]], requests: list[str]) -> dict[str, dict]:
    """Run the trace through one cache per setup (name -> (strategy, budget)), interleaved request by request."""
    caches = {name: ModelCache(reg, budget=budget, strategy=strategy) for name, (strategy, budget) in setups.items()}
    totals = dict.fromkeys(setups, 0.0)
    latencies: dict[str, list[float]] = {name: [] for name in setups}
    for name, (strategy, _budget) in setups.items():
        if strategy == "preload":
            t0 = time.perf_counter()
            caches[name].preload(spec.id for spec in reg)
            totals[name] += time.perf_counter() - t0
    prompt = torch.tensor([[1, 2, 3, 4]])
    names = list(setups)
    for i, model_id in enumerate(requests):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            with caches[name].use(model_id) as lease, torch.inference_mode():
                lease.model(prompt)
            del lease
            latencies[name].append(time.perf_counter() - t0)
    runs = {}
    for name, (strategy, budget) in setups.items():
        snap = caches[name].snapshot()
        caches[name].clear()
        times = sorted(latencies[name])
        runs[name] = {
            "strategy": strategy, "budget_bytes": budget, "total_s": round(totals[name] + sum(times), 2),
            "p50_ms": round(statistics.median(times) * 1000, 1),
            "p95_ms": round(times[int(0.95 * (len(times) - 1))] * 1000, 1),
            "loads": snap.loads, "evictions": snap.evictions, "peak_bytes": snap.peak_bytes,
            "peak_over_budget": round(snap.peak_bytes / budget, 3),
        }
    return runs


def hit_overhead_p99_ms(reg: Registry, iterations: int = 20_000) -> float:
    """The cache's own cost on a hit: entering and leaving `use` for a resident model."""
    cache = ModelCache(reg, budget=4 * 2**30)
    model_id = MODELS[0][0]
    cache.preload([model_id])
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        with cache.use(model_id):
            pass
        times.append(time.perf_counter() - t0)
    cache.clear()
    times.sort()
    return round(times[int(0.99 * (len(times) - 1))] * 1000, 4)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    reg = registry()
    ModelCache(reg, budget=8 * 2**30).preload(spec.id for spec in reg)  # build the models on disk once
    sizes = {spec.id: spec.params * 4 for spec in reg}
    total = sum(sizes.values())
    small_budget = int(total * 0.75)  # the total does not fit: something must be evicted
    requests = trace(list(sizes))
    print(f"models: {', '.join(f'{k} {v / MB:.0f} MiB' for k, v in sizes.items())}; total {total / MB:.0f} MiB; "
          f"budget {small_budget / MB:.0f} MiB (lru, swap), {2 * total / MB:.0f} MiB (preload); {REQUESTS} requests")
    runs = replay(reg, {"swap": ("swap", small_budget), "lru": ("lru", small_budget),
                        "preload": ("preload", 2 * total), "lru_fits": ("lru", 2 * total)}, requests)
    for run in runs.values():
        print(f"{run['strategy']:>8} budget {run['budget_bytes'] / MB:6.0f} MiB: total {run['total_s']:6.1f} s, "
              f"p50 {run['p50_ms']:7.1f} ms, p95 {run['p95_ms']:7.1f} ms, loads {run['loads']:3d}, "
              f"evictions {run['evictions']:3d}, peak {run['peak_bytes'] / MB:6.0f} MiB "
              f"({run['peak_over_budget']:.2f} of budget)")
    results = {
        "lru_over_swap": round(runs["lru"]["total_s"] / runs["swap"]["total_s"], 3),
        "lru_over_preload": round(runs["lru_fits"]["total_s"] / runs["preload"]["total_s"], 3),
        "peak_over_budget": max(run["peak_over_budget"] for run in runs.values()),
        "hit_overhead_p99_ms": hit_overhead_p99_ms(reg),
        "requests": REQUESTS,
        "runs": runs,
    }
    print(f"lru/swap total time: {results['lru_over_swap']} (target <= 0.5); lru/preload when everything fits: "
          f"{results['lru_over_preload']} (target <= 1.05); peak/budget: {results['peak_over_budget']} (target <= 1.0); "
          f"hit overhead p99: {results['hit_overhead_p99_ms']} ms (target < 1)")
    out = Path(__file__).parent / "results" / "serving_strategies.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
