"""int8 weight-only quantization against bfloat16, on the full-size TinyLlama-1.1B architecture on this CPU.

The model is built from TinyLlama-1.1B-Chat-v1.0's real config with random weights in bfloat16 (bench/chat.py's
model and 32k tokenizer, no download); the int8 model is a copy of it quantized by the studio's own code
(`studio.backends.quantization.apply(model, "int8", "cpu")`), so both hold the same weights. Both decode the same
chat-templated prompt greedily for the same number of new tokens, interleaved (bf16, int8, int8, bf16, ...), on a
worker thread as the studio does; medians of the per-pair ratios. Every forward pass is timed, so the prompt's pass
(prefill: the first token) and the decoding steps after it are reported apart. Decoding reads every weight once per
token and is what int8 speeds up: `tokens_per_s_ratio` compares each run's median decoding step. The prompt's pass
multiplies many rows at once, where int8 dequantizes its weights and is slower (`prefill_ms_ratio`, and the
end-to-end ratio that includes it). Sizes are what the studio's cache counts (`devices.module_bytes`), and the size
estimate made from the tensor shapes before loading (`studio.quantization.estimated_bytes`) is checked against it.
Logit agreement: cosine similarity of the two models' next-token logits on the prompt. Random weights give nearly tied
logits, so the two greedy continuations part after a few tokens (`identical_leading_tokens`); the cosine is the
measure.
Writes bench/results/quantization.json.

On a shared CPU, two threads per matmul spend most of a decoding step waiting for each other (a 2048 x 5632
matmul took 3 ms on one thread and 18 ms on two while other jobs ran), which hides what int8 saves: `--threads 1`
measures the bandwidth each variant needs, free of that, and `tokens_per_cpu_s_ratio` (decoding per second of CPU
time) is then what other jobs disturb least.

    nice python bench/quantization.py [--repeats 5] [--new-tokens 32] [--threads N]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/quantization.py`: import from the repository root, not from bench/ (whose scripts could
# shadow standard modules).
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.chat import PROMPT, build_model, build_tokenizer  # noqa: E402
from studio.backends import quantization  # noqa: E402
from studio.devices import module_bytes  # noqa: E402
from studio.quantization import estimated_bytes  # noqa: E402

TARGETS = {"tokens_per_s_ratio": ">= 1.5", "bytes_ratio": "<= 0.6", "logits_cosine": ">= 0.99"}
RESULTS = Path(__file__).parent / "results" / "quantization.json"


def now() -> tuple[float, float]:
    """Wall clock and this process's CPU time."""
    return time.perf_counter(), time.process_time()


class StepClock:
    """Start and end of every forward pass: the first is the prompt's (prefill), the rest decode one token each."""

    def __init__(self, model: torch.nn.Module):
        self.spans: list[list[tuple[float, float]]] = []
        model.register_forward_pre_hook(lambda *_: self.spans.append([now()]))
        model.register_forward_hook(lambda *_: self.spans[-1].append(now()))


def decode(model: torch.nn.Module, clock: StepClock, inputs: dict, new_tokens: int) -> dict:
    """Greedy generation on a worker thread (where the studio generates); its timings and tokens."""
    out = {}
    clock.spans = []
    worker = threading.Thread(target=lambda: out.update(sequences=model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)))
    start = time.perf_counter()
    worker.start()
    worker.join()
    seconds = time.perf_counter() - start
    (prefill_start, prefill_end), steps = clock.spans[0], clock.spans[1:]
    return {"seconds": seconds, "prefill": prefill_end[0] - prefill_start[0],
            # the median step: a step that other jobs held up more than the rest does not count
            "decode_tokens_per_s": 1 / statistics.median(end[0] - start[0] for start, end in steps),
            "decode_tokens_per_cpu_s": 1 / statistics.median(end[1] - start[1] for start, end in steps),
            "tokens_per_s": new_tokens / seconds, "tokens": out["sequences"][0, inputs["input_ids"].shape[1]:]}


def next_token_logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits[0, -1].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    tokenizer, bf16 = build_tokenizer(), build_model()
    int8 = quantization.apply(copy.deepcopy(bf16), "int8", "cpu")
    print(f"built TinyLlama-1.1B architecture in bfloat16 and int8 in {time.perf_counter() - start:.1f} s; "
          f"torch threads: {torch.get_num_threads()}", flush=True)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    models = {"bfloat16": bf16, "int8": int8}
    clocks = {name: StepClock(model) for name, model in models.items()}

    sizes = {name: module_bytes(model) for name, model in models.items()}
    tensors = [(name, list(t.shape), "BF16") for name, t in bf16.state_dict().items()]
    estimate = estimated_bytes(tensors, "int8", "bfloat16")
    logits = {name: next_token_logits(model, inputs) for name, model in models.items()}
    cosine = torch.nn.functional.cosine_similarity(logits["bfloat16"], logits["int8"], dim=0).item()

    warm = {name: decode(model, clocks[name], inputs, args.new_tokens) for name, model in models.items()}
    pairs = []
    for i in range(args.repeats):
        order = list(models) if i % 2 == 0 else list(reversed(models))  # alternate: drift hits both alike
        run = {name: decode(models[name], clocks[name], inputs, args.new_tokens) for name in order}
        pairs.append(run)
        print(f"repeat {i + 1}/{args.repeats}: " + "; ".join(
            f"{name} {r['decode_tokens_per_s']:.2f} tok/s decoding, prompt {r['prefill'] * 1000:.0f} ms"
            for name, r in run.items()), flush=True)

    def median(key: str, name: str) -> float:
        return statistics.median(pair[name][key] for pair in pairs)

    def ratio(key: str) -> float:  # median over the pairs of int8 / bf16
        return round(statistics.median(pair["int8"][key] / pair["bfloat16"][key] for pair in pairs), 4)

    same = (warm["int8"]["tokens"] == warm["bfloat16"]["tokens"]).tolist() + [False]
    results = {
        "model": "TinyLlama-1.1B-Chat-v1.0 architecture, random weights",
        "quantization": "int8 weight-only, one scale per output row (studio.backends.quantization.Int8Linear)",
        "device": "cpu", "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "prompt_tokens": inputs["input_ids"].shape[1], "new_tokens": args.new_tokens, "decoding": "greedy",
        "repeats": args.repeats,
        "tokens_per_s": {name: round(median("decode_tokens_per_s", name), 3) for name in models},
        "tokens_per_s_ratio": ratio("decode_tokens_per_s"),
        # decoding per second of this process's CPU time: what other jobs on the machine disturb least (with one
        # thread; with more, it counts the threads' waiting for each other too)
        "tokens_per_cpu_s": {name: round(median("decode_tokens_per_cpu_s", name), 3) for name in models},
        "tokens_per_cpu_s_ratio": ratio("decode_tokens_per_cpu_s"),
        "end_to_end_tokens_per_s": {name: round(median("tokens_per_s", name), 3) for name in models},
        "end_to_end_tokens_per_s_ratio": ratio("tokens_per_s"),
        "prefill_ms": {name: round(median("prefill", name) * 1000, 1) for name in models},
        "prefill_ms_ratio": ratio("prefill"),
        "bytes": sizes, "bytes_ratio": round(sizes["int8"] / sizes["bfloat16"], 4),
        "estimated_int8_bytes": estimate, "estimate_minus_measured_bytes": estimate - sizes["int8"],
        "logits_cosine": round(cosine, 5),
        "same_next_token": bool(logits["bfloat16"].argmax() == logits["int8"].argmax()),
        "identical_leading_tokens": same.index(False),
        "seconds": round(time.perf_counter() - start, 1), "targets": TARGETS,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    shown = ("tokens_per_s", "tokens_per_s_ratio", "tokens_per_cpu_s_ratio", "end_to_end_tokens_per_s_ratio",
             "prefill_ms", "prefill_ms_ratio", "bytes", "bytes_ratio", "estimate_minus_measured_bytes",
             "logits_cosine", "identical_leading_tokens")
    print(json.dumps({k: results[k] for k in shown}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
