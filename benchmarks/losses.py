"""Cost of each loss relative to a plain MSE on the same FLUX-size tensors, measured side by side.

Latents are ``[4, 16, 128, 128]`` (a batch of four 1024x1024 images), packed to ``[4, 4096, 64]``
for the sequence losses. Each row times forward + backward and divides by the plain MSE's time
measured in the same run. The distance transform is timed per mask at latent and pixel size.

    python benchmarks/losses.py [--device cuda] [--batch 4] [--latent 128]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from torch.utils.benchmark import Timer

from losses import (
    background_preservation_mse_latent,
    boundary_loss,
    dice_loss,
    geometry_starter_loss,
    info_nce_loss,
    loss_no_edit_identity,
    map_mask_to_latent,
    masked_flow_matching_loss,
    masked_mse_per_channel,
    masked_sam_loss,
    signed_distance_map_from_mask,
    soft_change_mask_from_latents,
    weighted_masked_mse_latent,
)


def seconds(fn, device: torch.device, min_run_time: float) -> float:
    """Median seconds per call of ``fn`` (synchronising CUDA through torch.utils.benchmark)."""
    fn()  # warm-up: allocator, kernels, lazy imports
    timer = Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def with_backward(loss_fn, leaf: torch.Tensor):
    def run():
        leaf.grad = None
        loss = loss_fn()
        loss.backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=128, help="latent height and width")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per row")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch, size = args.batch, args.latent
    torch.manual_seed(0)

    z_tgt = torch.randn(batch, 16, size, size, device=device)
    z_ctx = torch.randn(batch, 16, size, size, device=device)
    z_pred = torch.randn(batch, 16, size, size, device=device, requires_grad=True)
    pixel_mask = torch.zeros(batch, size * 8, size * 8, device=device)
    pixel_mask[:, size * 2 : size * 6, size * 3 : size * 5] = 1
    mask = torch.nn.functional.avg_pool2d(pixel_mask[:, None], 8)
    phi = signed_distance_map_from_mask(mask > 0.5, normalize=True)
    seq_mask = map_mask_to_latent(pixel_mask)

    def packed(z):
        return FluxPipeline._pack_latents(z, batch, 16, size, size)

    soft = torch.rand(batch, 1, size, size, device=device, requires_grad=True)
    # Packed copies as leaves, so the sequence rows time the loss and not diffusers' packing.
    pred_seq = packed(z_pred).detach().requires_grad_(True)
    tgt_seq, ctx_seq = packed(z_tgt), packed(z_ctx)
    rows = {
        "plain MSE (reference)": (lambda: F.mse_loss(z_pred, z_tgt), z_pred),
        "masked_flow_matching_loss": (
            lambda: masked_flow_matching_loss(pred_seq, tgt_seq, seq_mask),
            pred_seq,
        ),
        "weighted_masked_mse_latent": (
            lambda: weighted_masked_mse_latent(z_pred, z_tgt, mask),
            z_pred,
        ),
        "background_preservation_mse_latent": (
            lambda: background_preservation_mse_latent(z_pred, z_ctx, mask),
            z_pred,
        ),
        "soft_change_mask_from_latents": (
            lambda: soft_change_mask_from_latents(z_pred, z_ctx, mask_latent=mask)[0].mean(),
            z_pred,
        ),
        "dice_loss (on [B, 1, H, W])": (lambda: dice_loss(soft, mask), soft),
        "boundary_loss (on [B, 1, H, W])": (lambda: boundary_loss(soft, phi), soft),
        "geometry_starter_loss (SDM given)": (
            lambda: geometry_starter_loss(z_pred, z_tgt, z_ctx, mask, signed_distance_map=phi)[0],
            z_pred,
        ),
        "masked_mse_per_channel": (
            lambda: masked_mse_per_channel(z_pred, z_tgt, mask).mean(),
            z_pred,
        ),
        "masked_sam_loss": (lambda: masked_sam_loss(z_pred, z_tgt, mask), z_pred),
        "loss_no_edit_identity (tokens)": (
            lambda: loss_no_edit_identity(pred_seq, tgt_seq, ctx_seq),
            pred_seq,
        ),
        "info_nce_loss (tokens, in-batch)": (lambda: info_nce_loss(pred_seq, tgt_seq), pred_seq),
    }
    print(f"device={device} latents={list(z_pred.shape)} packed={list(tgt_seq.shape)}")
    print(f"{'loss (forward + backward)':<38}{'ms':>10}{'x MSE':>9}")
    reference = None
    for name, (loss_fn, leaf) in rows.items():
        t = seconds(with_backward(loss_fn, leaf), device, args.min_run_time)
        reference = reference or t
        print(f"{name:<38}{t * 1e3:10.3f}{t / reference:9.2f}")

    print(f"\n{'distance transform':<38}{'ms/mask':>10}")
    for label, masks in (
        (f"latent mask {size}x{size}", mask > 0.5),
        (f"pixel mask {size * 8}x{size * 8}", pixel_mask[:, None] > 0.5),
    ):
        t = seconds(lambda m=masks: signed_distance_map_from_mask(m), device, args.min_run_time)
        print(f"{label:<38}{t / batch * 1e3:10.3f}")


if __name__ == "__main__":
    main()
