"""Padding of network inputs to a multiple of the network's total stride, done once for every network.

Padding is added at the high end of each axis, so voxel indices of the original grid are unchanged and a voxel
displacement computed on the padded grid is cropped back without any correction.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


def padded_shape(shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    """Smallest shape ≥ `shape` whose sizes are multiples of `multiple`."""
    return tuple(-(-s // multiple) * multiple for s in shape)


def pad_to_multiple(x: Tensor, multiple: int, mode: str = "replicate") -> Tensor:
    """Pad [B, C, I, J, K] at the high end of each spatial axis to a multiple of `multiple`."""
    target = padded_shape(x.shape[2:], multiple)
    pad = []
    for size, new in zip(reversed(x.shape[2:]), reversed(target)):
        pad += [0, new - size]
    if not any(pad):
        return x
    return F.pad(x, pad, mode=mode)


def crop_to_shape(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Undo `pad_to_multiple`: keep the first `shape` voxels of each spatial axis."""
    return x[:, :, : shape[0], : shape[1], : shape[2]]
