"""Trainable stages. `STAGES` maps config.stage to the module:class implementing it (imported lazily)."""

from __future__ import annotations

import importlib

STAGES = {
    "clip": "dalle2_jax.stages.clip:ClipStage",
    "prior": "dalle2_jax.stages.prior:PriorStage",
    "decoder": "dalle2_jax.stages.decoder:DecoderStage",
    "upsampler": "dalle2_jax.stages.upsampler:UpsamplerStage",
}


def get_stage_class(name: str):
    """The Stage class registered as `name` (config.stage)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {sorted(STAGES)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)
