"""Aggregate decoding speed with 1, 4 and 16 concurrent requests: the batch engine against one-at-a-time `generate`
(today's `--concurrency 1`) and transformers' own continuous batching, side by side in one run.

The TinyLlama-1.1B architecture with random weights in bfloat16 (bench/chat.py builds it); every request asks for
the same number of new tokens with end-of-sequence ignored, greedy, from prompts of different lengths. All requests
of a round arrive at once; time to first token counts from then, so one-at-a-time requests include their wait in
line. Rounds rotate the order of the variants, so a busy shared CPU slows them alike; medians over rounds.
Writes bench/results/batch_engine.json.

    nice python bench/batch_engine.py [--clients 1,4,16] [--new-tokens 64] [--rounds 1] [--variants ...] [--out ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # import from the repository root

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from transformers.generation import ContinuousBatchingConfig  # noqa: E402

from bench.chat import CONFIG, build_model, build_tokenizer  # noqa: E402
from studio.backends.batching import BatchEngine, SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "batch_engine.json"
TOPICS = ["the sea", "a mountain village", "trains at night", "a small robot", "the first snow", "an old library",
          "a city garden", "the northern lights", "a lost key", "summer rain", "a lighthouse keeper", "the desert",
          "a jazz band", "a chess game", "the moon landing", "a bakery at dawn"]


def prompts(tokenizer, n: int) -> list[list[int]]:
    """Chat prompts of different lengths, as different users would send."""
    out = []
    for i in range(n):
        text = f"Write a short poem about {TOPICS[i % len(TOPICS)]}." + " Make it rhyme." * (i % 4)
        out.append(list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      return_dict=True)["input_ids"]))
    return out


class _FirstToken:
    """A streamer for `generate` that notes when the first new token arrives (the prompt comes first)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, _ids) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_serial(model, batch: list[list[int]], new_tokens: int) -> dict:
    """One request at a time, in arrival order, as `--concurrency 1` serves them."""
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=CONFIG["eos_token_id"], pad_token_id=CONFIG["eos_token_id"])
    firsts, tokens = [], 0
    start = time.perf_counter()

    def work():
        nonlocal tokens
        for ids in batch:
            streamer = _FirstToken()
            out = model.generate(torch.tensor([ids]), generation_config=config, streamer=streamer)
            firsts.append(streamer.first - start)
            tokens += out.shape[1] - len(ids)

    worker = threading.Thread(target=work)  # a worker thread, like the studio's generation
    worker.start()
    worker.join()
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "ttft": firsts}


def run_engine(engine: BatchEngine, batch: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, eos_token_ids=())
    start = time.perf_counter()
    seqs = [engine.submit(ids, params) for ids in batch]
    firsts, counts = [], []

    def consume(seq):
        n = 0
        for _ in seq:
            if n == 0:
                firsts.append(time.perf_counter() - start)
            n += 1
        counts.append(n)

    readers = [threading.Thread(target=consume, args=(seq,)) for seq in seqs]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    return {"seconds": time.perf_counter() - start, "tokens": sum(counts), "ttft": firsts}


def run_transformers(manager, batch: list[list[int]], new_tokens: int) -> dict:
    """transformers' continuous batching: a started manager, streaming, one reader per request."""
    start = time.perf_counter()
    firsts, counts = [], []
    ids = [manager.add_request(prompt, max_new_tokens=new_tokens, streaming=True, eos_token_id=-1)
           for prompt in batch]
    done = 0
    seen: dict[str, int] = {}
    while done < len(ids):
        out = manager.get_result(timeout=1)
        if out is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped")
            continue
        if out.request_id not in seen and out.generated_tokens:
            firsts.append(time.perf_counter() - start)
        seen[out.request_id] = len(out.generated_tokens)
        if out.is_finished():
            done += 1
            counts.append(len(out.generated_tokens))
    return {"seconds": time.perf_counter() - start, "tokens": sum(counts), "ttft": firsts}


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", default="serial,engine,transformers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    variants = args.variants.split(",")

    start = time.perf_counter()
    tokenizer, model = build_tokenizer(), build_model()
    print(f"built TinyLlama-1.1B architecture (bfloat16) in {time.perf_counter() - start:.1f} s; "
          f"torch threads: {torch.get_num_threads()}", flush=True)
    engine = BatchEngine(model, [CONFIG["eos_token_id"]], max_context=CONFIG["max_position_embeddings"],
                         max_batch=max(clients))
    manager = None
    if "transformers" in variants:
        # Sized like the engine: a 256-token page per request is enough here (left alone, it would take 60% of the
        # free RAM for its KV pool), and prefills of up to 2,048 tokens per forward.
        manager = model.init_continuous_batching(
            generation_config=GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens,
                                               eos_token_id=CONFIG["eos_token_id"]),
            continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=max(clients),
                                                                num_blocks=2 * max(clients), max_batch_tokens=2048))
        manager.start()
    try:
        measure(args, clients, variants, tokenizer, model, engine, manager)
    finally:  # the manager's thread is not a daemon: a failed run would otherwise never exit
        if manager is not None:
            manager.stop(block=True)
        engine.close()


def measure(args, clients: list[int], variants: list[str], tokenizer, model, engine: BatchEngine, manager) -> None:
    runners = {"serial": lambda b: run_serial(model, b, args.new_tokens),
               "engine": lambda b: run_engine(engine, b, args.new_tokens),
               "transformers": lambda b: run_transformers(manager, b, args.new_tokens)}
    warm = prompts(tokenizer, 1)
    for name in variants:
        runners[name](warm)

    runs: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in clients} for name in variants}
    for r in range(args.rounds):
        for n in clients:
            batch = prompts(tokenizer, n)
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name in order:
                result = runners[name](batch)
                assert result["tokens"] == n * args.new_tokens, (name, result["tokens"])
                runs[name][n].append(result)
                print(f"round {r + 1} clients {n:2d} {name:12s} {result['tokens'] / result['seconds']:6.2f} tok/s, "
                      f"ttft p95 {p95(result['ttft']):6.1f} s", flush=True)

    def agg(name: str, n: int) -> float:
        return round(statistics.median(r["tokens"] / r["seconds"] for r in runs[name][n]), 3)

    results = {
        "model": "TinyLlama-1.1B-Chat-v1.0 architecture, random weights", "dtype": "bfloat16", "device": "cpu",
        "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "rounds": args.rounds,
        "prompt_tokens": [len(p) for p in prompts(tokenizer, max(clients))],
        "aggregate_tokens_per_s": {name: {str(n): agg(name, n) for n in clients} for name in variants},
        "ttft_p95_s": {name: {str(n): round(statistics.median(p95(r["ttft"]) for r in runs[name][n]), 2)
                              for n in clients} for name in variants},
    }
    if "serial" in variants:
        results["speedup_over_serial"] = {
            name: {str(n): round(agg(name, n) / agg("serial", n), 2) for n in clients}
            for name in variants if name != "serial"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
