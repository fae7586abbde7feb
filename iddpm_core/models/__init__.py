"""Denoisers: the Improved-DDPM U-Net and the continuous U-Net, built from one ModelConfig."""

from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig


def build_model(config: ModelConfig) -> nn.Module:
    """Build the denoiser that ``config.kind`` names ("unet" or "cunet")."""
    config.validate()
    if config.kind == "unet":
        from .unet import UNetModel

        return UNetModel(config)
    from .cunet import ContinuousUNet

    return ContinuousUNet(config)


__all__ = ["ModelConfig", "build_model"]
