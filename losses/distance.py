"""Signed distance maps of binary masks, for the boundary loss (seed 001).

The Euclidean distance transform runs in SciPy for CPU tensors and in CuPy (exact EDT, same API)
for CUDA tensors when CuPy is installed, so a map built on the GPU never leaves it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from losses.mask_ops import as_mask_4d


def _cupy_edt():
    try:
        from cupyx.scipy.ndimage import distance_transform_edt as cupy_edt
    except ImportError:
        return None
    return cupy_edt


def _distance_to_zeros(nonzero: torch.Tensor) -> torch.Tensor:
    """Distance from every pixel of ``nonzero: [H, W] bool`` to the nearest False pixel.

    Requires at least one False pixel (SciPy returns distances to a phantom pixel otherwise).
    Returns ``[H, W]`` float32 on the input's device.
    """
    if nonzero.is_cuda:
        cupy_edt = _cupy_edt()
        if cupy_edt is not None:
            import cupy

            dist = cupy_edt(cupy.from_dlpack(nonzero.to(torch.uint8).contiguous()))
            return torch.from_dlpack(dist.astype(cupy.float32))
    dist = distance_transform_edt(nonzero.cpu().numpy())
    return torch.from_numpy(dist.astype(np.float32)).to(nonzero.device)


def signed_distance_map_from_mask(
    mask_bin: torch.Tensor, *, normalize: bool = False
) -> torch.Tensor:
    """Signed Euclidean distance to the mask contour (Kervadec et al.'s convention).

    Args:
        mask_bin: ``[B, 1, H, W]`` (or ``[B, H, W]``, ``[H, W]``), bool or 0/1 float; values
            above 0.5 are the object.
        normalize: divide each sample's map by its largest absolute value, so maps of different
            resolutions have comparable scale.

    Returns:
        ``[B, 1, H, W]`` float32 on the input's device, without gradient. Outside the object:
        the distance to the nearest object pixel (>= 1); inside: ``-(d - 1)`` where ``d`` is the
        distance to the nearest background pixel, so the inner contour is 0 and the interior is
        negative. Degenerate masks have no contour: an empty mask maps to ``+hypot(H, W)``
        everywhere and a full one to ``-hypot(H, W)`` (farther than any two pixels are apart), so
        the boundary loss still penalises mass predicted outside and rewards mass inside.
    """
    inside = as_mask_4d(mask_bin, "mask_bin").detach() > 0.5
    height, width = inside.shape[-2:]
    far = math.hypot(height, width)
    maps = []
    for sample in inside[:, 0]:
        if bool(sample.all()):
            phi = torch.full(sample.shape, -far, device=sample.device)
        elif not bool(sample.any()):
            phi = torch.full(sample.shape, far, device=sample.device)
        else:
            outside_dist = _distance_to_zeros(~sample)
            inside_dist = _distance_to_zeros(sample)
            phi = torch.where(sample, 1.0 - inside_dist, outside_dist)
        if normalize:
            phi = phi / phi.abs().max()
        maps.append(phi)
    return torch.stack(maps)[:, None]
