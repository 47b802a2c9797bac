"""The package exports every loss under the name the specification gives it."""

import ast
from pathlib import Path

import losses

SEED_NAMES = {
    "000": ["map_mask_to_latent", "masked_flow_matching_loss"],
    "001": [
        "downsample_mask_area",
        "dilate",
        "erode",
        "boundary_band",
        "weighted_masked_mse_latent",
        "background_preservation_mse_latent",
        "soft_change_mask_from_latents",
        "dice_loss",
        "area_ratio_loss",
        "signed_distance_map_from_mask",
        "boundary_loss",
    ],
    "002": ["masked_mse_per_channel", "masked_sam_loss", "mask_coverage_stats"],
    "003": [
        "pair_distance",
        "feature_match_loss",
        "contrastive_pair_loss",
        "triplet_margin_loss",
        "margin_ranking_on_distances",
        "multi_negative_ranking_loss",
        "info_nce_loss",
        "loss_no_edit_identity",
        "loss_geometry_match",
        "loss_overlay_avoidance",
    ],
}


def test_seed_names_are_exported():
    for names in SEED_NAMES.values():
        for name in names:
            assert name in losses.__all__ and callable(getattr(losses, name)), name


def test_all_is_complete_and_resolves():
    for name in losses.__all__:
        assert hasattr(losses, name), name
    public = {name for name in vars(losses) if not name.startswith("_")}
    modules = {"distance", "embedding", "flow_matching", "geometry", "mask_ops"}
    modules |= {"masked_rows", "sequence_mask", "spectral"}
    assert public - modules == set(losses.__all__)


def test_losses_imports_nothing_of_the_suite():
    for path in Path(losses.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in {"data", "training", "models"}, path
