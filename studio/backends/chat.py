"""Chat models: causal language models from transformers, used with their own chat template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from studio.registry import ModelSpec


@dataclass
class ChatModel:
    model: torch.nn.Module
    tokenizer: object
    context_length: int


def load_causal_lm(spec: ModelSpec, path: Path, device: str, dtype: str) -> ChatModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    context = spec.options.get("context_length") or getattr(model.config, "max_position_embeddings", 2048)
    return ChatModel(model, tokenizer, int(context))
