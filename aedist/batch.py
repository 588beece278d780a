"""The one batch path: a loaded uint8 batch -> what the model reads and what it must reconstruct.

Training and every evaluation pass go through :func:`prepare_batch`, so scaling, corruption,
normalization and memory format are decided in one place:

    batch = prepare_batch(images, cfg.corruption, generator, normalize=cfg.data.normalize)
    loss = compute_loss(model(batch.inputs), batch.targets, cfg.loss)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from aedist.data.corruption import corrupt
from aedist.errors import UserError


@dataclass
class Batch:
    """One prepared batch; ``pixel_*`` are in [0, 1], ``inputs``/``targets`` in model space.
    Corruptions that grow the batch (``copies``) make every field ``[k*B, ...]``."""

    clean: Tensor  # the loaded images as floats [B, C, H, W]
    pixel_inputs: Tensor  # corrupted images
    pixel_targets: Tensor  # what the model must reconstruct (the clean image, repeated if grown)
    inputs: Tensor
    targets: Tensor
    params: dict[str, Any]  # the corruption draws (angles, permutations, ...)


def to_model(x: Tensor, normalize: bool) -> Tensor:
    """Pixels in [0, 1] -> what the model reads and reconstructs ((x - 0.5) / 0.5 when normalizing)."""
    return (x - 0.5) / 0.5 if normalize else x


def to_pixels(x: Tensor, normalize: bool) -> Tensor:
    """Model space -> pixels in [0, 1] (the inverse of :func:`to_model`)."""
    return x * 0.5 + 0.5 if normalize else x


def prepare_batch(images: Tensor, spec: list[Any], generator: torch.Generator | None, *, normalize: bool = False,
                  channels_last: bool = False, keep: Tensor | None = None) -> Batch:
    """uint8 (or float in [0, 1]) images [B, C, H, W] -> a :class:`Batch`, corrupted by ``spec``
    with draws from ``generator`` (an empty spec skips the corruption module entirely); rows where
    ``keep`` (bool [B]) is set go in clean (data.repeat_clean: the originals of an expanded dataset)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    pixel_in, pixel_tgt, params = corrupt(x, spec, generator) if spec else (x, x, {})
    if keep is not None and spec:
        if pixel_in.shape != x.shape:
            raise UserError("data.repeat_clean works with corruptions that keep one input per image; not with copies")
        pixel_in = torch.where(rearrange(keep, "b -> b 1 1 1"), x, pixel_in)
    inputs = to_model(pixel_in, normalize)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return Batch(x, pixel_in, pixel_tgt, inputs, to_model(pixel_tgt, normalize), params)
