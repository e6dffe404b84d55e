"""Does a reply depend on its batch mates? Greedy and seeded requests decoded alone and inside mixed batches.

The tiny Llama (random weights) in float32 and in bfloat16. Every greedy request runs once alone in the batch engine
and once among all the others at the same time (greedy and sampled, prompts of different lengths, joining and
leaving a running batch of up to 16); end-of-sequence is ignored so every reply has its full length. Reported:
- `max_logit_diff`: the largest difference between a request's scores in the batch and alone, over the steps where
  both had the same tokens so far (after a reply diverges its inputs differ, so later steps say nothing of noise);
- `token_agreement`: identical tokens at identical positions, batched against alone, over all greedy replies;
- for every reply that differs, the gap between the two best scores alone at the first differing token: a flip
  between near-tied tokens is noise when that gap is within `max_logit_diff`;
- `seeded_identical`: seeded sampled replies that are the same alone and batched;
- `alone_matches_generate`: greedy replies alone against `model.generate` (the per-request path).
Writes bench/results/batch_correctness.json.

    nice python bench/batch_correctness.py [--requests 200] [--new-tokens 24]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # import from the repository root

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from studio.backends.batching import BatchEngine, SamplingParams, Sequence  # noqa: E402
from studio.registry import ModelSpec  # noqa: E402
from studio.tiny.text import CORPUS, build_llama  # noqa: E402

CONTEXT = 512
RESULTS = Path(__file__).parent / "results" / "batch_correctness.json"
TARGETS = {"token_agreement": ">= 0.99", "differing_first_gap_within_noise": "all"}


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    """Chat prompts of 10 to about 150 tokens: random runs of the tiny corpus's words."""
    rng = random.Random(0)
    words = " ".join(CORPUS[:8]).split()
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 60)))
        out.append(list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      return_dict=True)["input_ids"]))
    return out


class Recorder:
    """Keeps every step's scores of the sequences it is told to watch (the engine's `observe` hook)."""

    def __init__(self):
        self.watched: dict[Sequence, list[torch.Tensor]] = {}

    def __call__(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits):
            if seq in self.watched:
                self.watched[seq].append(row.clone())

    def watch(self, seq: Sequence) -> Sequence:
        self.watched[seq] = []
        return seq


def run_alone(engine: BatchEngine, recorder: Recorder, prompt: list[int], params: SamplingParams):
    seq = recorder.watch(engine.submit(prompt, params))
    return list(seq), recorder.watched.pop(seq)


def compare(model, prompts: list[list[int]], new_tokens: int, sampled_every: int) -> dict:
    eos = [model.config.eos_token_id]
    recorder = Recorder()
    engine = BatchEngine(model, eos, max_context=CONTEXT, max_batch=16, observe=recorder)
    greedy = SamplingParams(max_new_tokens=new_tokens, eos_token_ids=())
    sampled = {i: SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=0.95, seed=i, eos_token_ids=())
               for i in range(0, len(prompts), sampled_every)}
    try:
        start = time.perf_counter()
        alone = [run_alone(engine, recorder, p, greedy) for p in prompts]
        seeded_alone = {i: list(engine.submit(prompts[i], params)) for i, params in sampled.items()}
        alone_seconds = time.perf_counter() - start

        # Everyone at once, in a shuffled order: sampled requests sit between greedy ones, and with at most 16
        # running, requests join and leave the batch all through the run.
        start = time.perf_counter()
        jobs = [("greedy", i, greedy) for i in range(len(prompts))] + [("seeded", i, p) for i, p in sampled.items()]
        random.Random(1).shuffle(jobs)
        seqs = {(kind, i): recorder.watch(engine.submit(prompts[i], params)) for kind, i, params in jobs}
        replies = {key: list(seq) for key, seq in seqs.items()}
        batched_seconds = time.perf_counter() - start
    finally:
        engine.close()

    max_diff, same_tokens, total_tokens, differing = 0.0, 0, 0, []
    for i, (tokens_alone, logits_alone) in enumerate(alone):
        tokens = replies[("greedy", i)]
        logits = recorder.watched[seqs[("greedy", i)]]
        first = next((k for k, (a, b) in enumerate(zip(tokens_alone, tokens)) if a != b), None)
        steps = len(tokens) if first is None else first + 1  # identical inputs up to and including `first`
        for a, b in zip(logits_alone[:steps], logits[:steps]):
            max_diff = max(max_diff, float((a - b).abs().max()))
        same_tokens += sum(a == b for a, b in zip(tokens_alone, tokens))
        total_tokens += len(tokens_alone)
        if first is not None:
            top2 = logits_alone[first].topk(2).values
            differing.append({"request": i, "first_differing_token": first,
                              "top2_gap_alone": float(top2[0] - top2[1])})
    for case in differing:
        case["gap_within_noise"] = case["top2_gap_alone"] <= max_diff
    checked = list(range(0, len(prompts), max(1, len(prompts) // 20)))
    matches = 0
    for i in checked:  # generate stops at end-of-sequence: compare up to it
        out = model.generate(torch.tensor([prompts[i]]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=eos[0], pad_token_id=eos[0])
        tokens = alone[i][0]
        if eos[0] in tokens:
            tokens = tokens[:tokens.index(eos[0]) + 1]
        matches += out[0, len(prompts[i]):].tolist() == tokens
    return {
        "greedy_requests": len(prompts), "seeded_requests": len(sampled),
        "max_logit_diff": max_diff,
        "token_agreement": round(same_tokens / total_tokens, 5),
        "identical_replies": round(1 - len(differing) / len(prompts), 5),
        "differing_replies": differing,
        "differing_first_gap_within_noise": all(c["gap_within_noise"] for c in differing),
        "seeded_identical": round(sum(seeded_alone[i] == replies[("seeded", i)] for i in sampled) / len(sampled), 5),
        "alone_matches_generate": f"{matches}/{len(checked)}",
        "seconds": {"alone": round(alone_seconds, 1), "batched": round(batched_seconds, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--sampled-every", type=int, default=4, help="a seeded sampled request for every N prompts")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="batch-correctness-"))
    build_llama(folder, ModelSpec(id="tiny-llama", modality="chat", label="tiny", loader="x", params=1,
                                  options={"context_length": CONTEXT}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = make_prompts(tokenizer, args.requests)
    results = {"model": "tiny Llama (studio.tiny.text.build_llama), random weights", "device": "cpu",
               "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
               "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts))}}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        results[name] = compare(model, prompts, args.new_tokens, args.sampled_every)
        summary = {k: v for k, v in results[name].items() if k != "differing_replies"}
        print(name, json.dumps(summary), flush=True)
    results["targets"] = TARGETS
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
