"""Mixed load on a small budget: 16 clients, four modalities, LoRA adapters, evictions all the time (issue 20.6).

A live tiny studio (the real server: UI, client API and routes on one port) with `--memory-budget 20MB` and a
`--lora-dir` holding one adapter for tiny-sd. 16 client threads send, for `--seconds`, a round-robin mix over
REST: chat (two models), images (five models, two of them SD 1.5 with the adapter), speech and 3D. The models
together take about 24 MiB, so the budget holds all but one image model, and loads and evictions go on all the
time. (Bark and Piper are left out: their estimates, 172 and 61 MiB, are over the whole budget.)

What it prints (and writes to bench/results/load.json):
- requests, 5xx answers, other non-2xx answers, failed loads (the cache's counter), evictions;
- request-log rows against requests (every request must leave exactly one row) and pins left after the run;
- the process's RSS at the start (after warm-up), at the end, and its slope in MiB per minute: a least-squares
  line through samples taken every 2 s after the warm-up (the first `--warmup` seconds, or a fifth of the run).
  The clients run in the same process, so the RSS is the studio's plus a little for 16 HTTP clients.

    nice python bench/load.py [--seconds 180] [--clients 16] [--warmup S] [--out load.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path[0] = str(Path(__file__).resolve().parents[1])

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from studio.config import parse_settings  # noqa: E402
from studio.runtime import create_studio  # noqa: E402
from studio.server import launch  # noqa: E402
from studio.tiny.image import random_lora  # noqa: E402

ADAPTER = "load-style"
MIX = [  # (path, body): the round robin every client walks, each from its own offset
    ("/generate/text", {"prompt": "Hello there", "model": "tiny-llama", "max_new_tokens": 8}),
    ("/generate/image", {"prompt": "a fox", "model": "tiny-sd", "steps": 2, "adapters": {ADAPTER: 0.8}}),
    ("/generate/speech", {"text": "Hello there.", "model": "tiny-vits"}),
    ("/generate/image", {"prompt": "a fox", "model": "tiny-sd-turbo", "steps": 1}),
    ("/generate/3d", {"prompt": "a chair", "model": "tiny-shap-e", "steps": 2}),
    ("/generate/text", {"prompt": "Hello there", "model": "tiny-qwen2", "max_new_tokens": 8}),
    ("/generate/image", {"prompt": "a fox", "model": "tiny-sdxl", "steps": 1}),
    ("/generate/image", {"prompt": "a fox", "model": "tiny-sd3", "steps": 1}),
    ("/generate/image", {"prompt": "a cat", "model": "tiny-sd15-file", "steps": 2, "adapters": {ADAPTER: 0.5}}),
]


def slope_mib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS (bytes) over time (s), in MiB per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return cov / var * 60 / 2**20 if var else 0.0


def build_adapter(folder: Path, studio) -> None:
    with studio.cache.use("tiny-sd") as lease:
        random_lora(folder / f"{ADAPTER}.safetensors", lease.model.pipe.unet, lease.model.pipe.text_encoder, seed=1)
    studio.cache.unload("tiny-sd")


def client(url: str, offset: int, until: float, tally: dict, lock: threading.Lock) -> None:
    with httpx.Client(base_url=url, timeout=300) as http:
        for path, body in itertools.islice(itertools.cycle(MIX), offset, None):
            if time.monotonic() >= until:
                return
            try:
                status = http.post(path, json=body).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with lock:
                tally["requests"] += 1
                tally["status"][str(status)] = tally["status"].get(str(status), 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--budget", default="20MB")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before RSS sampling counts")
    parser.add_argument("--out", default="load.json", help="file name under bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="studio-load-"))
    (root / "loras").mkdir()
    port = 20000 + os.getpid() % 20000
    settings = parse_settings(["--profile", "tiny", "--port", str(port), "--memory-budget", args.budget,
                               "--lora-dir", str(root / "loras"), "--log-dir", str(root / "logs"),
                               "--models", str(root / "models.yaml"), "--models-dir", str(root / "models")], env={})
    studio = create_studio(settings)
    build_adapter(root / "loras", studio)
    rows: list[dict] = []
    studio.log.add_listener(rows.append)
    demo, url = launch(studio, block=False)
    process = psutil.Process()
    tally: dict = {"requests": 0, "status": {}}
    lock = threading.Lock()
    start = time.monotonic()
    until = start + args.seconds
    warmup = args.warmup if args.warmup is not None else args.seconds / 5
    threads = [threading.Thread(target=client, args=(url.rstrip("/"), i, until, tally, lock))
               for i in range(args.clients)]
    for thread in threads:
        thread.start()
    samples: list[tuple[float, int]] = []
    while any(thread.is_alive() for thread in threads):
        now = time.monotonic()
        if now - start >= warmup:
            samples.append((now - start, process.memory_info().rss))
        time.sleep(2)
    for thread in threads:
        thread.join()
    time.sleep(1)  # the last rows are written after the answers
    snap = studio.cache.snapshot()
    demo.close()
    fives = sum(n for code, n in tally["status"].items() if code.startswith("5"))
    other = sum(n for code, n in tally["status"].items() if not code.startswith(("2", "5")))
    result = {
        "seconds": args.seconds, "clients": args.clients, "budget": args.budget,
        "requests": tally["requests"], "status": tally["status"], "5xx": fives, "other_non_2xx": other,
        "failed_loads": snap.load_failures, "loads": snap.loads, "evictions": snap.evictions,
        "peak_bytes": snap.peak_bytes, "budget_bytes": snap.budget_bytes,
        "rows": len(rows), "rows_equal_requests": len(rows) == tally["requests"],
        "row_status": {s: sum(1 for r in rows if r["status"] == s) for s in {r["status"] for r in rows}},
        "pins_left": sum(m.pins for m in snap.models),
        "resident_mib": {m.id: round(m.bytes / 2**20, 2) for m in snap.models},
        "rss_start_mib": round(samples[0][1] / 2**20, 1) if samples else None,
        "rss_end_mib": round(samples[-1][1] / 2**20, 1) if samples else None,
        "rss_peak_mib": round(max(r for _, r in samples) / 2**20, 1) if samples else None,
        "rss_slope_mib_per_min": round(slope_mib_per_min(samples), 2),
        "rss_samples": len(samples), "warmup_seconds": warmup,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads 1",
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
