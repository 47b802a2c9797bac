"""Mask-aware losses for diffusion editing and inpainting; pure PyTorch (SciPy for the EDT).

Every public name is exported here with the name the specification uses:

- seed 000, packed-sequence text-region loss: :func:`map_mask_to_latent`,
  :func:`pack_pixel_mask`, :func:`masked_flow_matching_loss`;
- seed 001, latent geometry losses: mask utilities (:func:`downsample_mask_area`, :func:`dilate`,
  :func:`erode`, :func:`boundary_band`, :func:`sure_background`),
  :func:`weighted_masked_mse_latent`, :func:`background_preservation_mse_latent`,
  :func:`soft_change_mask_from_latents`, :func:`dice_loss`, :func:`area_ratio_loss`,
  :func:`signed_distance_map_from_mask`, :func:`boundary_loss` and the starter mix
  :func:`geometry_starter_loss`;
- seed 002, multispectral reconstruction: :func:`masked_mse_per_channel`,
  :func:`masked_sam_loss`, :func:`mask_coverage_stats`, :func:`coverage_warning`;
- seed 003, embedding losses: :func:`pair_distance`, :func:`feature_match_loss`,
  :func:`contrastive_pair_loss`, :func:`triplet_margin_loss`,
  :func:`margin_ranking_on_distances`, :func:`multi_negative_ranking_loss`,
  :func:`info_nce_loss`, :func:`loss_no_edit_identity`, :func:`loss_geometry_match`,
  :func:`loss_overlay_avoidance` and the starter mix :func:`embedding_starter_loss`;
- mask terms on a batch's masked rows only: :func:`masked_rows_loss`, :func:`rows_of`.
"""

from losses.distance import signed_distance_map_from_mask
from losses.embedding import (
    EmbeddingLossWeights,
    contrastive_pair_loss,
    embedding_starter_loss,
    feature_match_loss,
    info_nce_loss,
    loss_geometry_match,
    loss_no_edit_identity,
    loss_overlay_avoidance,
    margin_ranking_on_distances,
    multi_negative_ranking_loss,
    pair_distance,
    triplet_margin_loss,
)
from losses.flow_matching import masked_flow_matching_loss
from losses.geometry import (
    ChangeMaskStats,
    GeometryLossWeights,
    area_ratio_loss,
    background_preservation_mse_latent,
    boundary_loss,
    dice_loss,
    geometry_starter_loss,
    soft_change_mask_from_latents,
    weighted_masked_mse_latent,
)
from losses.mask_ops import (
    as_mask_4d,
    boundary_band,
    dilate,
    downsample_mask_area,
    erode,
    sure_background,
)
from losses.masked_rows import masked_rows_loss, rows_of
from losses.sequence_mask import map_mask_to_latent, pack_pixel_mask
from losses.spectral import (
    HIGH_COVERAGE,
    LOW_COVERAGE,
    coverage_warning,
    mask_coverage_stats,
    masked_mse_per_channel,
    masked_sam_loss,
)

__all__ = [
    "HIGH_COVERAGE",
    "LOW_COVERAGE",
    "ChangeMaskStats",
    "EmbeddingLossWeights",
    "GeometryLossWeights",
    "area_ratio_loss",
    "as_mask_4d",
    "background_preservation_mse_latent",
    "boundary_band",
    "boundary_loss",
    "contrastive_pair_loss",
    "coverage_warning",
    "dice_loss",
    "dilate",
    "downsample_mask_area",
    "embedding_starter_loss",
    "erode",
    "feature_match_loss",
    "geometry_starter_loss",
    "info_nce_loss",
    "loss_geometry_match",
    "loss_no_edit_identity",
    "loss_overlay_avoidance",
    "map_mask_to_latent",
    "margin_ranking_on_distances",
    "mask_coverage_stats",
    "masked_flow_matching_loss",
    "masked_mse_per_channel",
    "masked_rows_loss",
    "masked_sam_loss",
    "multi_negative_ranking_loss",
    "pack_pixel_mask",
    "pair_distance",
    "rows_of",
    "signed_distance_map_from_mask",
    "soft_change_mask_from_latents",
    "sure_background",
    "triplet_margin_loss",
    "weighted_masked_mse_latent",
]
