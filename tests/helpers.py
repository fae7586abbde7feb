"""Small helpers shared by the model tests (import as ``from helpers import ...``)."""

import torch


def randomize_(model, seed=0):
    """Give every parameter (zero-initialised ones included) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model
