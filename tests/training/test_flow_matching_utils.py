"""``training.inputs.flow_matching``: sigma shift, resolution shift, sigma sampling, loss weights,
and the x_t / x0 maps of rectified flow."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from training.config import FlowMatchingConfig
from training.inputs.flow_matching import (
    loss_weighting,
    noisy_latents,
    predicted_x0,
    resolution_shift,
    sample_sigmas,
    shift_sigmas,
)
from worlds.tiny_models import FLUX_DEV_SCHEDULER, QWEN_IMAGE_SCHEDULER, tiny_flux_kontext_pipeline

SCHEMES = ["none", "uniform", "logit_normal", "mode", "cosmap", "sigma_sqrt"]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def kontext_scheduler_config():
    return tiny_flux_kontext_pipeline(0).scheduler.config


class TestShiftSigmas:
    @pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 7.5])
    def test_closed_form(self, shift):
        sigmas = torch.linspace(0, 1, 101, dtype=torch.float64)
        shifted = shift_sigmas(sigmas, shift)
        for sigma, value in zip(sigmas.tolist(), shifted.tolist(), strict=True):
            assert value == pytest.approx(shift * sigma / (1 + (shift - 1) * sigma), abs=1e-15)

    def test_known_values(self):
        sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
        # s = 3: 0.75 / 1.5 = 0.5 and 1.5 / 2 = 0.75; the ends stay fixed.
        assert shift_sigmas(sigmas, 3.0).tolist() == [0.0, 0.5, 0.75, 1.0]
        assert shift_sigmas(sigmas, 1.0).tolist() == sigmas.tolist()

    def test_inverse_shift(self):
        sigmas = torch.rand(50, dtype=torch.float64)
        torch.testing.assert_close(shift_sigmas(shift_sigmas(sigmas, 3.0), 1 / 3), sigmas)

    def test_logit_moves_by_log_shift(self):
        sigmas = torch.rand(50, dtype=torch.float64) * 0.98 + 0.01
        difference = torch.logit(shift_sigmas(sigmas, 4.0)) - torch.logit(sigmas)
        torch.testing.assert_close(difference, torch.full_like(sigmas, math.log(4.0)))

    @pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
    def test_matches_diffusers_scheduler_table(self, shift):
        n = 1000
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=n, shift=shift)
        unshifted = torch.from_numpy(np.linspace(1, n, n)[::-1].copy() / n)
        torch.testing.assert_close(
            shift_sigmas(unshifted, shift).float(), scheduler.sigmas, atol=1e-6, rtol=0
        )


class TestResolutionShift:
    @pytest.mark.parametrize(
        ("seq_len", "mu"), [(256, 0.5), (4096, 1.15), (2176, 0.5 + 0.65 * 1920 / 3840)]
    )
    def test_flux_known_values(self, seq_len, mu):
        assert resolution_shift(seq_len, FLUX_DEV_SCHEDULER) == pytest.approx(math.exp(mu))

    @pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096, 8192])
    def test_flux_linear_in_seq_len(self, seq_len):
        mu = 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)
        assert resolution_shift(seq_len, FLUX_DEV_SCHEDULER) == pytest.approx(math.exp(mu))

    def test_uses_the_config_not_flux_defaults(self):
        # Qwen-Image: max_shift 0.9 at 8192 tokens.
        assert resolution_shift(8192, QWEN_IMAGE_SCHEDULER) == pytest.approx(math.exp(0.9))
        assert resolution_shift(256, QWEN_IMAGE_SCHEDULER) == pytest.approx(math.exp(0.5))

    def test_defaults_when_config_lacks_keys(self):
        assert resolution_shift(4096, {}) == pytest.approx(math.exp(1.15))

    @pytest.mark.parametrize("seq_len", [16, 1024, 4096])
    def test_matches_the_kontext_pipeline_schedule(self, kontext_scheduler_config, seq_len):
        """The scheduler of FluxKontextPipeline, given the pipeline's mu for ``seq_len``, shifts
        its sigmas exactly as shift_sigmas does with resolution_shift."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = kontext_scheduler_config
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        mu = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        steps = 10
        sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        expected = shift_sigmas(torch.from_numpy(sigmas), resolution_shift(seq_len, config))
        torch.testing.assert_close(scheduler.sigmas[:-1], expected.float(), atol=1e-6, rtol=0)
        assert resolution_shift(seq_len, config) == pytest.approx(math.exp(mu))


class TestSampleSigmas:
    @pytest.mark.parametrize("scheme", SCHEMES)
    @pytest.mark.parametrize("shift", [1.0, 3.0, "auto"])
    def test_in_open_unit_interval(self, scheme, shift):
        config = FlowMatchingConfig(weighting_scheme=scheme, timestep_shift=shift)
        sigmas = sample_sigmas(config, 5000, 4096, FLUX_DEV_SCHEDULER, generator(1))
        assert sigmas.shape == (5000,)
        assert sigmas.dtype == torch.float32
        assert (sigmas > 0).all() and (sigmas < 1).all()

    @pytest.mark.parametrize("scheme", SCHEMES)
    def test_reproducible_for_a_generator(self, scheme):
        config = FlowMatchingConfig(weighting_scheme=scheme, timestep_shift=3.0)
        first = sample_sigmas(config, 16, 1024, FLUX_DEV_SCHEDULER, generator(7))
        torch.rand(10)
        second = sample_sigmas(config, 16, 1024, FLUX_DEV_SCHEDULER, generator(7))
        other = sample_sigmas(config, 16, 1024, FLUX_DEV_SCHEDULER, generator(8))
        assert torch.equal(first, second)
        assert not torch.equal(first, other)

    def test_does_not_touch_global_rng(self):
        state = torch.get_rng_state()
        sample_sigmas(FlowMatchingConfig(), 8, 256, FLUX_DEV_SCHEDULER, generator())
        assert torch.equal(torch.get_rng_state(), state)

    def test_uniform_moments(self):
        sigmas = sample_sigmas(FlowMatchingConfig(), 20000, 256, FLUX_DEV_SCHEDULER, generator())
        assert sigmas.mean().item() == pytest.approx(0.5, abs=0.01)
        assert sigmas.var().item() == pytest.approx(1 / 12, abs=0.003)

    @pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.3, 0.7), (-0.8, 1.2)])
    def test_logit_normal_moments_in_logit_space(self, mean, std):
        config = FlowMatchingConfig(weighting_scheme="logit_normal", logit_mean=mean, logit_std=std)
        sigmas = sample_sigmas(config, 20000, 256, FLUX_DEV_SCHEDULER, generator(3))
        logits = torch.logit(sigmas.double())
        # diffusers' convention: sigma = 1 - u, so logit(sigma) = -logit(u).
        # Standard errors: std / sqrt(n) <= 0.009 for the mean; about 0.006 for the std.
        assert logits.mean().item() == pytest.approx(-mean, abs=0.04)
        assert logits.std().item() == pytest.approx(std, abs=0.04)

    def test_shift_adds_log_shift_in_logit_space(self):
        base = FlowMatchingConfig(weighting_scheme="logit_normal", logit_mean=0.2)
        shifted = FlowMatchingConfig(
            weighting_scheme="logit_normal", logit_mean=0.2, timestep_shift=3.0
        )
        plain = sample_sigmas(base, 4000, 256, FLUX_DEV_SCHEDULER, generator(5))
        moved = sample_sigmas(shifted, 4000, 256, FLUX_DEV_SCHEDULER, generator(5))
        difference = torch.logit(moved.double()) - torch.logit(plain.double())
        torch.testing.assert_close(
            difference, torch.full_like(difference, math.log(3.0)), atol=2e-4, rtol=0
        )
        assert torch.logit(moved.double()).mean().item() == pytest.approx(
            -0.2 + math.log(3.0), abs=0.06
        )

    @pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
    def test_shift_above_one_raises_the_mean(self, scheme):
        plain = sample_sigmas(
            FlowMatchingConfig(weighting_scheme=scheme), 4000, 256, FLUX_DEV_SCHEDULER, generator()
        )
        moved = sample_sigmas(
            FlowMatchingConfig(weighting_scheme=scheme, timestep_shift=3.0),
            4000,
            256,
            FLUX_DEV_SCHEDULER,
            generator(),
        )
        assert (moved >= plain).all()
        assert moved.mean() > plain.mean() + 0.1

    def test_auto_is_the_resolution_shift(self):
        config = FlowMatchingConfig(weighting_scheme="logit_normal", timestep_shift="auto")
        plain = sample_sigmas(
            FlowMatchingConfig(weighting_scheme="logit_normal"),
            64,
            4096,
            FLUX_DEV_SCHEDULER,
            generator(2),
        )
        for seq_len in (256, 4096):
            auto = sample_sigmas(config, 64, seq_len, FLUX_DEV_SCHEDULER, generator(2))
            expected = shift_sigmas(plain, resolution_shift(seq_len, FLUX_DEV_SCHEDULER))
            torch.testing.assert_close(auto, expected)

    def test_mode_density_is_diffusers_formula(self):
        config = FlowMatchingConfig(weighting_scheme="mode", mode_scale=1.29)
        sigmas = sample_sigmas(config, 100, 256, FLUX_DEV_SCHEDULER, generator(4))
        u = torch.rand(100, generator=generator(4))
        density = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        # diffusers indexes its descending timestep table with the draw: sigma = 1 - draw.
        torch.testing.assert_close(sigmas, 1 - density)


class TestLossWeighting:
    @pytest.mark.parametrize("scheme", ["none", "uniform", "logit_normal", "mode"])
    def test_no_weights(self, scheme):
        assert loss_weighting(FlowMatchingConfig(weighting_scheme=scheme), torch.rand(4)) is None

    def test_sigma_sqrt(self):
        sigmas = torch.tensor([0.5, 0.25, 1.0, 0.1])
        weights = loss_weighting(FlowMatchingConfig(weighting_scheme="sigma_sqrt"), sigmas)
        torch.testing.assert_close(weights, torch.tensor([4.0, 16.0, 1.0, 100.0]))

    def test_cosmap(self):
        sigmas = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64)
        weights = loss_weighting(FlowMatchingConfig(weighting_scheme="cosmap"), sigmas)
        expected = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in sigmas.tolist()]
        torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
        assert weights[1].item() == pytest.approx(4 / math.pi)  # 1 - 1 + 0.5 = 0.5


class TestNoisyAndPredicted:
    def test_noisy_latents_per_sample(self):
        x0 = torch.randn(3, 4, 5, 6)
        noise = torch.randn(3, 4, 5, 6)
        sigmas = torch.tensor([0.0, 0.3, 1.0])
        x_t = noisy_latents(x0, noise, sigmas)
        assert x_t.shape == x0.shape
        assert torch.equal(x_t[0], x0[0])
        assert torch.equal(x_t[2], noise[2])
        torch.testing.assert_close(x_t[1], 0.7 * x0[1] + 0.3 * noise[1])

    def test_packed_latents(self):
        x0 = torch.randn(2, 7, 64)
        noise = torch.randn(2, 7, 64)
        sigmas = torch.tensor([0.25, 0.75])
        x_t = noisy_latents(x0, noise, sigmas)
        for b in range(2):
            torch.testing.assert_close(x_t[b], (1 - sigmas[b]) * x0[b] + sigmas[b] * noise[b])

    def test_true_velocity_recovers_x0_exactly(self):
        # Dyadic values: every product and sum below is exact in float32.
        x0 = torch.randint(-8, 9, (4, 2, 3, 3)).float() / 4
        noise = torch.randint(-8, 9, (4, 2, 3, 3)).float() / 4
        sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
        x_t = noisy_latents(x0, noise, sigmas)
        assert torch.equal(predicted_x0(x_t, noise - x0, sigmas), x0)

    def test_true_velocity_recovers_x0_random(self):
        x0 = torch.randn(5, 16, 8, 8, dtype=torch.float64)
        noise = torch.randn(5, 16, 8, 8, dtype=torch.float64)
        sigmas = torch.rand(5, dtype=torch.float64)
        x_t = noisy_latents(x0, noise, sigmas)
        torch.testing.assert_close(predicted_x0(x_t, noise - x0, sigmas), x0, atol=1e-12, rtol=0)

    def test_predicted_x0_formula(self):
        x_t = torch.randn(2, 3, 4)
        velocity = torch.randn(2, 3, 4)
        sigmas = torch.tensor([0.2, 0.9])
        x0_hat = predicted_x0(x_t, velocity, sigmas)
        for b in range(2):
            torch.testing.assert_close(x0_hat[b], x_t[b] - sigmas[b] * velocity[b])

    def test_dtypes_follow_the_latents(self):
        x0 = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
        noise = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
        sigmas = torch.tensor([0.5, 0.25])  # float32
        x_t = noisy_latents(x0, noise, sigmas)
        assert x_t.dtype == torch.bfloat16
        assert predicted_x0(x_t, noise - x0, sigmas).dtype == torch.bfloat16
