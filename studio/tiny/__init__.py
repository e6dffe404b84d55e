"""Builders of the tiny profile: the real architectures with tiny configs and random weights.

Each builder writes a folder that the matching `studio.backends` loader reads with `from_pretrained`, exactly as
it reads a real checkpoint. Weights are seeded, so every machine builds the same model. Workarounds that only a
random-weight model needs live here, each with a comment, never in the backends.
"""

import torch

SEED = 1234


def seeded() -> torch.Generator:
    """Seed torch's global generator (model constructors use it) and return a generator for extra tensors."""
    torch.manual_seed(SEED)
    return torch.Generator().manual_seed(SEED)
