"""Many users on one chat model: continuous batching against one generation at a time, behind the real HTTP server.

The TinyLlama-1.1B architecture (its real config, random weights, bfloat16, built offline by bench/chat.py) is
served by two studios in this process, each on its own port and with its own model cache over the SAME weights:
one batches (`--max-batch 16`), one serves a generation at a time (`--max-batch 1 --concurrency 1`, the studio's
behaviour before batching). For 1, 4 and 16 concurrent clients, each asking `/v1/chat/completions` (streaming)
for the same number of new tokens (`ignore_eos`), the two are measured one after the other: aggregate tokens/s
(all completion tokens / the wall time from the first request to the last answer) and the p95 time to first token.
The budget holds the weights plus the KV cache of 16 sequences, and the batched studio's peak is reported against
it (the KV cache counted). Writes bench/results/chat_concurrency.json.

    nice python bench/chat_concurrency.py [--new-tokens 64] [--clients 1 4 16]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.chat import CONFIG, MODEL_ID, PROMPT, build_model, build_tokenizer  # noqa: E402
from studio.backends.chat import TransformersChat  # noqa: E402
from studio.cache import ModelCache  # noqa: E402
from studio.config import Settings  # noqa: E402
from studio.devices import module_bytes  # noqa: E402
from studio.registry import ModelSpec, Registry  # noqa: E402
from studio.runtime import Studio  # noqa: E402
from studio.server import launch  # noqa: E402
from studio.telemetry.requestlog import RequestLog  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "chat_concurrency.json"
TARGETS = {"speedup_16": ">= 5", "ttft_p95_s": "batched at 16 below serial at 16", "peak_over_budget": "<= 1.0"}
KV_BYTES_PER_TOKEN = 22 * 4 * 64 * 2 * 2  # layers x kv heads x head dim x (key, value) x bf16 bytes
PROMPT_TOKENS = 64  # a bound on the chat-templated prompt's length


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: torch.nn.Module, tokenizer, budget: int, max_batch: int) -> tuple[Studio, str]:
    """A studio on its own port whose cache 'loads' the shared weights."""
    port = free_port()
    spec = ModelSpec(id=MODEL_ID, modality="chat", label="TinyLlama-1.1B architecture (random weights)",
                     loader="studio.backends.chat:load_causal_lm", params=1_100_048_384,
                     options={"context_length": CONFIG["max_position_embeddings"], "max_new_tokens": 1024})
    registry = Registry("bench", [spec])
    settings = Settings(port=port, log_dir=Path(tempfile.mkdtemp(prefix="bench-concurrency-")), max_batch=max_batch,
                        concurrency=1)
    cache = ModelCache(registry, budget=budget, max_batch=max_batch, measure=module_bytes,
                       loader=lambda _spec, _device: TransformersChat(model, tokenizer, CONFIG["max_position_embeddings"]),
                       estimate=lambda _spec, _device: module_bytes(model))
    studio = Studio(settings, registry, cache, RequestLog(settings.log_dir))
    _demo, url = launch(studio, block=False)
    return studio, url.rstrip("/")


def ask(url: str, new_tokens: int) -> dict:
    """One streamed chat completion: its time to first token and completion tokens."""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first, "tokens": tokens, "end": time.perf_counter()}


def burst(url: str, clients: int, new_tokens: int) -> dict:
    """`clients` requests at once: aggregate tokens/s and the p95 time to first token."""
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(ask(url, new_tokens))) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = max(r["end"] for r in results) - start
    ttfts = sorted(r["ttft"] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return {"aggregate_tokens_per_s": round(sum(r["tokens"] for r in results) / seconds, 2),
            "ttft_p95_s": round(p95, 2), "ttft_median_s": round(statistics.median(ttfts), 2),
            "seconds": round(seconds, 1), "tokens": sum(r["tokens"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    tokenizer, model = build_tokenizer(), build_model()
    weights = module_bytes(model)
    kv = 16 * (PROMPT_TOKENS + args.new_tokens) * KV_BYTES_PER_TOKEN
    budget = weights + kv
    print(f"weights {weights / 2**30:.2f} GiB, KV cache for 16 sequences {kv / 2**20:.0f} MiB; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    batched, batched_url = serve(model, tokenizer, budget, 16)
    _serial, serial_url = serve(model, tokenizer, budget, 1)
    ask(batched_url, 4)  # warm both paths up
    ask(serial_url, 4)
    modes: dict[str, dict] = {"serial": {}, "batched": {}}
    for clients in args.clients:
        for mode, url in (("serial", serial_url), ("batched", batched_url)):
            modes[mode][str(clients)] = burst(url, clients, args.new_tokens)
            print(f"{clients:>3} clients, {mode:>7}: {modes[mode][str(clients)]}", flush=True)
    top = str(max(args.clients))
    snap = batched.cache.snapshot()
    result = {
        "aggregate_tokens_per_s": {mode: {n: r["aggregate_tokens_per_s"] for n, r in runs.items()}
                                   for mode, runs in modes.items()},
        "ttft_p95_s": {mode: {n: r["ttft_p95_s"] for n, r in runs.items()} for mode, runs in modes.items()},
        f"speedup_{top}": round(modes["batched"][top]["aggregate_tokens_per_s"]
                               / modes["serial"][top]["aggregate_tokens_per_s"], 2),
        "peak_over_budget": round(snap.peak_bytes / snap.budget_bytes, 3),
        "targets": TARGETS,
        "details": {"new_tokens": args.new_tokens, "runs": modes, "budget_bytes": budget, "weights_bytes": weights,
                    "peak_bytes": snap.peak_bytes, "torch_threads": torch.get_num_threads(),
                    "model": "TinyLlama-1.1B architecture, random weights, bfloat16, CPU"},
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
