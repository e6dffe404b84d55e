"""Reliability under load and hostile input (issue 20): each test reproduces a failure a load or fuzz run found."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from conftest import call, tiny_studio
from studio.backends.image import ImageRequest, generate_images
from studio.tiny.image import random_lora

RACE_SECONDS = 30


def test_adapter_loads_and_model_loads_never_interleave(tmp_path):
    """peft swaps a torch function process-wide while it loads an adapter; a model loading on another thread
    meanwhile failed ('_is_hf_initialized', 'Cannot copy out of meta tensor') and could leave the process unable to
    load anything. One thread reloads an adapter (its file keeps changing, so it is deleted and loaded again),
    the other loads and unloads models, for 30 s: no error, and a load afterwards works."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    studio = tiny_studio(tmp_path / "logs", "--lora-dir", str(tmp_path / "loras"))
    with studio.cache.use("tiny-sd") as lease:
        random_lora(tmp_path / "loras" / "a.safetensors", lease.model.pipe.unet, lease.model.pipe.text_encoder, seed=1)
    errors: list[str] = []
    until = time.monotonic() + RACE_SECONDS
    rounds = {"adapter": 0, "model": 0}

    def reload_adapter() -> None:
        while time.monotonic() < until:
            rounds["adapter"] += 1
            os.utime(tmp_path / "loras" / "a.safetensors", ns=(rounds["adapter"] * 10**9,) * 2)
            try:
                generate_images(studio, ImageRequest(prompt="x", model="tiny-sd", steps=1, adapters={"a": 1.0}), call())
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                errors.append(f"adapter: {exc!r}")

    def load_models() -> None:
        while time.monotonic() < until:
            model = ("tiny-llama", "tiny-vits", "tiny-qwen2")[rounds["model"] % 3]
            rounds["model"] += 1
            try:
                studio.cache.unload(model)
                with studio.cache.use(model):
                    pass
            except Exception as exc:  # noqa: BLE001
                errors.append(f"model: {exc!r}")

    try:
        workers = [threading.Thread(target=reload_adapter), threading.Thread(target=load_models)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == [] and min(rounds.values()) > 3, (rounds, errors[:3])
        with studio.cache.use("tiny-bark") as lease:  # a model not loaded before: the process still loads
            assert not lease.hit
    finally:
        torch.set_num_threads(threads)
