"""AutoencoderKLMultispectralAdapter on a tiny random SD3 VAE, saved and loaded like a real one."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch.func import functional_call

from losses import masked_mse_per_channel
from models.multispectral import (
    ADAPTER_WEIGHTS_NAME,
    BACKGROUND,
    AutoencoderKLMultispectralAdapter,
    SpectralGate,
    SpectralMap,
    apply_matrix,
    band_groups,
    band_to_rgb_matrix,
    rgb_to_band_matrix,
)
from worlds.tiny_models import tiny_sd3_vae

SIZE = 16
LOW = [100.0, 900.0, 300.0, 2000.0, 2500.0]
HIGH = [1100.0, 1800.0, 2400.0, 3600.0, 5800.0]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd3") / "vae"
    tiny_sd3_vae(seed=0).save_pretrained(folder)
    return folder


def build(vae_dir: Path, **config) -> AutoencoderKLMultispectralAdapter:
    config = {"num_bands": 5, "band_low": LOW, "band_high": HIGH, **config}
    return AutoencoderKLMultispectralAdapter.from_pretrained(vae_dir, **config)


def leaf_batch(seed: int = 0, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample: [2, 5, size, size]`` in data units and an elliptic leaf ``mask: [2, 1, ...]``."""
    generator = torch.Generator().manual_seed(seed)
    low, high = torch.tensor(LOW)[:, None, None], torch.tensor(HIGH)[:, None, None]
    sample = low + (high - low) * torch.rand(2, 5, size, size, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    leaf = ((yy - size / 2) / (0.4 * size)) ** 2 + ((xx - size / 2) / (0.3 * size)) ** 2 <= 1
    mask = leaf[None, None].expand(2, 1, size, size).float().clone()
    mask[1, :, :, : size // 2] = 0  # a second, smaller leaf
    return sample, mask


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every added weight off its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_state_dict().values():
            param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def naive_sam(pred: torch.Tensor, target: torch.Tensor, leaf: torch.Tensor) -> float:
    """Mean angle between each leaf pixel's own N-band spectra, one pixel at a time."""
    p, t, m = pred.tolist(), target.tolist(), leaf.tolist()
    batch, bands, height, width = pred.shape
    angles = []
    for b in range(batch):
        for h in range(height):
            for w in range(width):
                if not m[b][0][h][w]:
                    continue
                ps = [p[b][c][h][w] for c in range(bands)]
                ts = [t[b][c][h][w] for c in range(bands)]
                dot = sum(x * y for x, y in zip(ps, ts, strict=True))
                norms = math.sqrt(sum(x * x for x in ps)) * math.sqrt(sum(y * y for y in ts))
                angles.append(math.acos(max(-1.0, min(1.0, dot / norms))))
    return sum(angles) / len(angles)


def grouped_sam(pred: torch.Tensor, target: torch.Tensor, leaf: torch.Tensor) -> float:
    """The old fault: boolean-index ``[B, C, H, W]`` then ``view(-1, C)``, so a "spectrum" is C
    neighbouring pixels of one band."""
    valid = leaf.expand_as(target)
    p = pred[valid].view(-1, pred.shape[1])
    t = target[valid].view(-1, pred.shape[1])
    cos = (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1))
    return torch.acos(cos.clamp(-1, 1)).mean().item()


def naive_mse(pred: torch.Tensor, target: torch.Tensor, leaf: torch.Tensor) -> list[float]:
    """Per band: mean squared difference over leaf pixels, pooled over the batch."""
    p, t, m = pred.tolist(), target.tolist(), leaf.tolist()
    batch, bands, height, width = pred.shape
    out = []
    for c in range(bands):
        errors = [
            (p[b][c][h][w] - t[b][c][h][w]) ** 2
            for b in range(batch)
            for h in range(height)
            for w in range(width)
            if m[b][0][h][w]
        ]
        out.append(sum(errors) / len(errors))
    return out


class TestFixedRules:
    def test_band_groups_for_five_bands(self):
        assert [group.tolist() for group in band_groups(5)] == [[4], [2, 3], [0, 1]]

    def test_band_to_rgb_is_group_means_and_back_copies(self):
        expected = torch.tensor(
            [[0, 0, 0, 0, 1], [0, 0, 0.5, 0.5, 0], [0.5, 0.5, 0, 0, 0]], dtype=torch.float32
        )
        torch.testing.assert_close(band_to_rgb_matrix(5), expected, rtol=0, atol=0)
        back = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 0]]).float()
        torch.testing.assert_close(rgb_to_band_matrix(5), back, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("bands", [3, 7, 50])
    def test_back_mapping_inverts_the_projection_on_rgb(self, bands):
        identity = band_to_rgb_matrix(bands) @ rgb_to_band_matrix(bands)
        torch.testing.assert_close(identity, torch.eye(3), rtol=0, atol=1e-5)


class TestConstruction:
    def test_only_added_weights_train_and_the_vae_is_the_pretrained_one(self, vae_dir):
        model = build(vae_dir, decoder_lora_rank=2)
        pretrained = AutoencoderKL.from_pretrained(vae_dir)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(model.adapter_state_dict())
        assert all(not n.startswith("vae.") or ".lora_" in n for n in trainable)
        assert any(".lora_" in n for n in trainable)
        base = {n: p for n, p in model.vae.named_parameters() if ".lora_" not in n}
        for name, param in pretrained.named_parameters():
            key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(base.get(name, base.get(key)), param), name
        assert model.config.base_model_name_or_path == str(vae_dir.resolve())

    @pytest.mark.parametrize("placement", ["input", "output", "both"])
    def test_every_placement_starts_as_the_fixed_rules(self, vae_dir, placement):
        model = build(vae_dir, adapter_placement=placement)
        assert (model.input_adapter is not None) == (placement != "output")
        assert (model.output_adapter is not None) == (placement != "input")
        sample, mask = leaf_batch()
        with torch.no_grad():
            reconstruction, _ = model(sample, mask)
            normalized = model.normalize(sample)
            hidden = torch.where(mask > 0.5, normalized, torch.full_like(normalized, BACKGROUND))
            latents = model.vae.encode(apply_matrix(band_to_rgb_matrix(5), hidden)).latent_dist
            rgb = model.vae.decode(latents.mode()).sample
            expected = model.denormalize(apply_matrix(rgb_to_band_matrix(5), rgb))
        torch.testing.assert_close(reconstruction, expected, rtol=1e-5, atol=1e-2)

    def test_pipeline_folder_uses_its_vae_subfolder(self, tmp_path):
        tiny_sd3_vae().save_pretrained(tmp_path / "pipeline" / "vae")
        model = build(tmp_path / "pipeline")
        assert model.config.base_model_subfolder == "vae"

    def test_refuses_too_few_bands_flat_bands_and_other_models(self, vae_dir, tmp_path):
        with pytest.raises(ValueError, match="num_bands must be at least 3"):
            build(vae_dir, num_bands=2, band_low=None, band_high=None)
        with pytest.raises(ValueError, match=r"must exceed band_low; it does not for bands \[2\]"):
            build(vae_dir, band_high=[*HIGH[:2], LOW[2], *HIGH[3:]])
        (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
        with pytest.raises(ValueError, match="holds a UNet2DModel"):
            build(tmp_path)

    def test_half_precision_vae_with_float32_adapters(self, vae_dir):
        model = AutoencoderKLMultispectralAdapter.from_pretrained(
            vae_dir, torch_dtype=torch.bfloat16, num_bands=5, band_low=LOW, band_high=HIGH
        )
        sample, mask = leaf_batch()
        reconstruction, losses = model(sample, mask)
        assert model.vae.dtype == torch.bfloat16 and model.output_adapter.linear.weight.dtype == (
            torch.float32
        )
        assert reconstruction.dtype == torch.float32 and torch.isfinite(losses["total"])


class TestLosses:
    def test_mse_and_sam_match_naive_loops_and_the_grouping_fault_does_not(self, vae_dir):
        model = build(vae_dir, sam_weight=0.3)
        randomise(model)
        sample, mask = leaf_batch()
        with torch.no_grad():
            reconstruction, losses = model(sample, mask)
        leaf = mask > 0.5
        expected = naive_mse(model.normalize(reconstruction), model.normalize(sample), leaf)
        torch.testing.assert_close(
            losses["mse_per_channel"], torch.tensor(expected), rtol=1e-4, atol=1e-6
        )
        sam = naive_sam(reconstruction, sample, leaf)
        assert losses["sam"].item() == pytest.approx(sam, rel=1e-4, abs=1e-6)
        assert abs(grouped_sam(reconstruction, sample, leaf) - sam) > 0.01
        total = losses["mse_per_channel"].mean() + 0.3 * losses["sam"]
        assert losses["total"].item() == pytest.approx(total.item(), rel=1e-6)

    def test_range_penalty_is_the_squared_excess_on_the_leaf(self, vae_dir):
        narrow_min = [v + 200 for v in LOW]
        narrow_max = [v - 200 for v in HIGH]
        model = build(
            vae_dir, range_weight=2.0, use_sam_loss=False, band_min=narrow_min, band_max=narrow_max
        )
        randomise(model)
        sample, mask = leaf_batch()
        with torch.no_grad():
            reconstruction, losses = model(sample, mask)
        output = model.normalize(reconstruction)
        low = model.normalize(torch.tensor(narrow_min)[None, :, None, None].expand_as(sample))
        high = model.normalize(torch.tensor(narrow_max)[None, :, None, None].expand_as(sample))
        excess = torch.relu(output - high) - torch.relu(low - output)
        expected = masked_mse_per_channel(excess, torch.zeros_like(excess), mask).mean()
        assert losses["range"] > 0
        torch.testing.assert_close(losses["range"], expected, rtol=1e-4, atol=1e-7)
        assert "sam" not in losses
        assert losses["total"].item() == pytest.approx(
            (losses["mse"] + 2.0 * losses["range"]).item(), rel=1e-6
        )

    def test_background_values_even_nan_change_nothing(self, vae_dir):
        model = build(vae_dir, decoder_lora_rank=2, range_weight=1.0)
        randomise(model)
        sample, mask = leaf_batch()
        changed = sample.clone()
        background = (mask < 0.5).expand_as(sample)
        values = 1e4 * torch.rand(int(background.sum()))
        values[::2] = float("nan")  # no-data
        changed[background] = values
        runs = []
        for data in (sample, changed):
            model.zero_grad()
            reconstruction, losses = model(data, mask)
            losses["total"].backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            runs.append((reconstruction.detach(), losses, grads))
        (first, losses_a, grads_a), (second, losses_b, grads_b) = runs
        assert torch.equal(first[mask.expand_as(first) > 0.5], second[mask.expand_as(first) > 0.5])
        for name in ("total", "mse", "mse_per_channel", "sam", "range", "band_weights"):
            assert torch.equal(losses_a[name], losses_b[name]), name
        assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
        for name, grad in grads_a.items():
            assert torch.isfinite(grad).all() and torch.equal(grad, grads_b[name]), name

    def test_no_mask_is_every_finite_pixel(self, vae_dir):
        model = build(vae_dir)
        sample, _ = leaf_batch()
        with torch.no_grad():
            _, unmasked = model(sample)
            _, full = model(sample, torch.ones(2, 1, SIZE, SIZE))
            assert unmasked["mask_stats"]["coverage"] == 1.0
            torch.testing.assert_close(unmasked["total"], full["total"], rtol=0, atol=0)
            holes = sample.clone()
            holes[0, 2, 5, 5] = float("nan")
            _, with_holes = model(holes)
            expected = torch.ones(2, 1, SIZE, SIZE)
            expected[0, 0, 5, 5] = 0
            _, reference = model(holes, expected)
        assert torch.isfinite(with_holes["total"])
        assert with_holes["mask_stats"]["valid_pixels"] == 2 * SIZE * SIZE - 1
        torch.testing.assert_close(with_holes["total"], reference["total"], rtol=0, atol=0)

    def test_masks_are_binarised_at_one_half(self, vae_dir):
        model = build(vae_dir)
        sample, mask = leaf_batch()
        soft = torch.where(mask > 0.5, 0.7, 0.5)
        with torch.no_grad():
            assert torch.equal(model(sample, soft)[1]["total"], model(sample, mask)[1]["total"])
            per_band = model(sample, mask.expand(-1, 5, -1, -1))[1]["total"]
            # The same pixels, reduced over another layout: equal up to float rounding.
            torch.testing.assert_close(per_band, model(sample, mask)[1]["total"], rtol=1e-6, atol=0)

    def test_empty_mask_gives_zero_loss_and_zero_gradients(self, vae_dir):
        model = build(vae_dir)
        randomise(model)
        sample, _ = leaf_batch()
        _, losses = model(sample, torch.zeros(2, 1, SIZE, SIZE))
        assert losses["total"].item() == 0 and losses["mask_stats"]["valid_pixels"] == 0
        losses["total"].backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert torch.equal(param.grad, torch.zeros_like(param)), name

    @pytest.mark.parametrize(
        "mask_shape,message",
        [
            ((2, 1, SIZE, 8), r"mask \[2, 1, 16, 8\] does not match sample \[2, 5, 16, 16\]"),
            ((1, 1, SIZE, SIZE), r"expected \[2, 1, 16, 16\] or \[2, 5, 16, 16\]"),
            ((2, 3, SIZE, SIZE), r"mask \[2, 3, 16, 16\] does not match"),
        ],
    )
    def test_mask_shape_mismatch_names_both_shapes(self, vae_dir, mask_shape, message):
        model = build(vae_dir)
        with pytest.raises(ValueError, match=message):
            model(leaf_batch()[0], torch.ones(mask_shape))

    def test_sample_shape_errors(self, vae_dir):
        model = build(vae_dir)
        with pytest.raises(
            ValueError, match=r"sample must be \[B, 5, H, W\], got \[2, 4, 16, 16\]"
        ):
            model(torch.ones(2, 4, SIZE, SIZE))
        with pytest.raises(ValueError, match="multiples of 8, got 12x16"):
            model(torch.ones(2, 5, 12, SIZE))

    def test_coverage_stats_and_warnings_once_per_kind(self, vae_dir, caplog):
        model = build(vae_dir)
        sample, mask = leaf_batch()
        tiny = torch.zeros_like(mask)
        tiny[:, :, 4:6, 4:6] = 1
        with torch.no_grad(), caplog.at_level(logging.WARNING):
            _, losses = model(sample, mask)
            assert not caplog.records
            stats = losses["mask_stats"]
            assert stats["valid_pixels"] == int(mask.sum())
            assert stats["total_pixels"] == 2 * SIZE * SIZE
            assert stats["coverage"] == stats["valid_pixels"] / stats["total_pixels"]
            for _ in range(2):
                model(sample, tiny)
                model(sample, torch.ones_like(mask))
        messages = [record.getMessage() for record in caplog.records]
        assert len(messages) == 2
        assert messages[0].startswith("Low mask coverage (0.0156)")
        assert messages[1].startswith("Very high mask coverage (1.0000)")

    def test_band_weights_read_out_the_gate(self, vae_dir):
        model = build(vae_dir)
        sample, mask = leaf_batch()
        with torch.no_grad():
            assert torch.equal(model(sample, mask)[1]["band_weights"], torch.ones(5))
            model.gate.score.bias.copy_(torch.tensor([math.log(3.0), 0, 0, 0, -math.log(3.0)]))
            weights = model(sample, mask)[1]["band_weights"]
        torch.testing.assert_close(weights, torch.tensor([1.5, 1, 1, 1, 0.5]))
        assert "band_weights" not in build(vae_dir, use_spectral_attention=False)(sample)[1]


class TestGradients:
    def test_adapter_modules_gradcheck(self):
        generator = torch.Generator().manual_seed(3)
        spectral_map = SpectralMap(band_to_rgb_matrix(5), 4).double()
        gate = SpectralGate(5).double()
        with torch.no_grad():
            for param in [*spectral_map.parameters(), *gate.parameters()]:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
        x = torch.randn(1, 5, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(spectral_map, (x,))
        assert torch.autograd.gradcheck(lambda v: gate(v)[0], (x,))

    def test_total_loss_gradcheck_through_the_vae_with_nan_background(self, vae_dir):
        model = build(vae_dir, range_weight=1.0, band_min=[v + 300 for v in LOW]).double()
        randomise(model)
        sample, mask = leaf_batch()
        sample = sample.double()
        sample[(mask < 0.5).expand_as(sample)] = float("nan")
        weight = model.output_adapter.linear.weight.detach().clone().requires_grad_()

        def total(w: torch.Tensor) -> torch.Tensor:
            params = {"output_adapter.linear.weight": w}
            return functional_call(model, params, (sample, mask))[1]["total"]

        assert torch.autograd.gradcheck(total, (weight,))


class TestSaveAndLoad:
    def test_reload_reproduces_the_reconstruction_bit_for_bit(self, vae_dir, tmp_path):
        model = build(vae_dir, decoder_lora_rank=2, decoder_lora_alpha=4, range_weight=0.5)
        randomise(model)
        model.save_pretrained(tmp_path / "adapter")
        assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
            ADAPTER_WEIGHTS_NAME,
            "config.json",
        ]
        stored = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME)
        assert stored.keys() == model.adapter_state_dict().keys()
        assert not any(k.startswith("vae.") and ".lora_" not in k for k in stored)
        loaded = AutoencoderKLMultispectralAdapter.from_pretrained(tmp_path / "adapter")
        assert loaded.config.band_low == LOW and loaded.config.band_high == HIGH
        assert torch.equal(loaded.low, torch.tensor(LOW)) and loaded.config.decoder_lora_alpha == 4
        sample, mask = leaf_batch()
        model.eval()
        with torch.no_grad():
            expected, expected_losses = model(sample, mask)
            got, got_losses = loaded(sample, mask)
            assert torch.equal(model.decode(model.encode(sample, mask)), expected)
        assert torch.equal(expected, got)
        assert torch.equal(expected_losses["total"], got_losses["total"])

    def test_a_moved_vae_is_passed_explicitly(self, vae_dir, tmp_path):
        model = build(vae_dir)
        model.register_to_config(base_model_name_or_path=str(tmp_path / "gone"))
        model.save_pretrained(tmp_path / "adapter")
        with pytest.raises(ValueError, match="which is not there; pass vae="):
            AutoencoderKLMultispectralAdapter.from_pretrained(tmp_path / "adapter")
        loaded = AutoencoderKLMultispectralAdapter.from_pretrained(
            tmp_path / "adapter", vae=vae_dir
        )
        assert loaded.config.num_bands == 5
        with pytest.raises(TypeError, match="load it without them"):
            AutoencoderKLMultispectralAdapter.from_pretrained(tmp_path / "adapter", num_bands=4)

    def test_another_architecture_is_refused_naming_the_difference(self, vae_dir, tmp_path):
        build(vae_dir, adapter_placement="input").save_pretrained(tmp_path / "adapter")
        model = build(vae_dir)
        with pytest.raises(ValueError, match=r"adapter_placement='input' \(this model: 'both'\)"):
            model.load_adapter(tmp_path / "adapter")
        with pytest.raises(ValueError, match=r"holds no adapter_model\.safetensors"):
            model.load_adapter(tmp_path)
