"""``training.grpo.sde`` and ``training.grpo.policy``: the stochastic steps' densities against
``torch.distributions``, group advantages and the clipped objective at known values, and the
rollout/update mechanics on a toy policy small enough to check by hand."""

import dataclasses
import math

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler
from torch.distributions import Normal, kl_divergence

from training.config import TrainConfig
from training.grpo.config import GRPOConfig
from training.grpo.policy import (
    clipped_objective,
    group_advantages,
    policy_update,
    sample_rollout,
    stochastic_steps,
    trained_steps,
    transition,
)
from training.grpo.rewards import RewardOptions, Rewards
from training.grpo.sde import ddim_step, flow_sde_step, gaussian_kl, gaussian_log_prob


@dataclasses.dataclass(kw_only=True)
class Config(GRPOConfig, TrainConfig):
    pass


def grpo_config(**overrides) -> Config:
    values = {"pretrained_model_name_or_path": "m", "train_data_dir": "d", "objective": "grpo"}
    return Config(**{**values, **overrides})


class TestGaussian:
    def test_log_prob_is_normal_log_prob_averaged(self):
        g = torch.Generator().manual_seed(0)
        mean = torch.randn(3, 4, 5, generator=g)
        sample = mean + 0.3 * torch.randn(3, 4, 5, generator=g)
        expected = Normal(mean, 0.3).log_prob(sample).flatten(1).mean(dim=1)
        torch.testing.assert_close(gaussian_log_prob(sample, mean, 0.3), expected)
        # The per-element average times the element count is the joint density.
        joint = Normal(mean, 0.3).log_prob(sample).flatten(1).sum(dim=1)
        torch.testing.assert_close(gaussian_log_prob(sample, mean, 0.3) * 20, joint)

    def test_kl_is_normal_kl_averaged(self):
        g = torch.Generator().manual_seed(1)
        p, q = torch.randn(2, 2, 6, generator=g)
        expected = kl_divergence(Normal(p, 0.5), Normal(q, 0.5)).mean(dim=1)
        torch.testing.assert_close(gaussian_kl(p, q, torch.tensor(0.5)), expected)
        assert torch.equal(gaussian_kl(p, p, 0.5), torch.zeros(2))


class TestFlowSdeStep:
    def test_known_values(self):
        """x = 1, v = 2, sigma 0.5 -> 0.25, a = 0.5: s_t = 0.5 * sqrt(0.5 / 0.5) = 0.5;
        drift = 2 + 0.25 / 1.0 * (1 + 0.5 * 2) = 2.5; mean = 1 - 0.25 * 2.5; std = 0.5 * 0.5."""
        mean, std = flow_sde_step(torch.ones(1, 1), torch.full((1, 1), 2.0), 0.5, 0.25, 0.9, 0.5)
        assert mean.item() == pytest.approx(0.375) and std.item() == pytest.approx(0.25)

    def test_no_noise_is_the_euler_step(self):
        g = torch.Generator().manual_seed(2)
        x, v = torch.randn(2, 2, 8, generator=g)
        mean, std = flow_sde_step(x, v, 0.7, 0.6, 0.9, 0.0)
        assert torch.equal(mean, x + (0.6 - 0.7) * v) and std.item() == 0

    def test_first_step_uses_the_largest_sigma_below_one(self):
        _, std = flow_sde_step(torch.ones(1, 1), torch.ones(1, 1), 1.0, 0.8, 0.8, 0.7)
        assert std.item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.8)) * math.sqrt(0.2))

    @pytest.mark.parametrize("sigma", [0.3, 0.5, 0.8])
    def test_keeps_the_marginals(self, sigma):
        """Data N(0, 1): x_t ~ N(0, s2(t)), s2 = (1-t)^2 + t^2, velocity E[eps - x0 | x] =
        (2t - 1) x / s2. The step is linear, so the next variance is exact: m^2 s2(t) + std^2,
        and must be s2(t + dt) up to O(dt^2) (a wrong drift term misses by O(dt))."""
        dt = -0.01

        def variance(t):
            return (1 - t) ** 2 + t**2

        slope = (2 * sigma - 1) / variance(sigma)
        mean, std = flow_sde_step(
            torch.ones(1, 1), torch.full((1, 1), slope), sigma, sigma + dt, 0.9, 0.7
        )
        following = mean.item() ** 2 * variance(sigma) + std.item() ** 2
        assert following == pytest.approx(variance(sigma + dt), abs=5e-4)


class TestDdimStep:
    @pytest.fixture
    def scheduler(self):
        scheduler = DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        scheduler.set_timesteps(10)
        return scheduler

    @pytest.mark.parametrize("index", [0, 5, 9])
    def test_mean_plus_std_noise_is_diffusers_stochastic_step(self, scheduler, index):
        g = torch.Generator().manual_seed(index)
        latents, output, noise = torch.randn(3, 2, 4, 4, 4, generator=g)
        t = scheduler.timesteps[index]
        mean, std = ddim_step(scheduler, output, t, latents, eta=0.8)
        stepped = scheduler.step(output, t, latents, eta=0.8, variance_noise=noise).prev_sample
        torch.testing.assert_close(mean + std * noise, stepped, rtol=0, atol=1e-6)
        prev = t - 1000 // 10
        assert std.item() == pytest.approx(0.8 * scheduler._get_variance(t, prev).item() ** 0.5)
        # DDPM-style density of the step, evaluated directly.
        expected = Normal(mean, std).log_prob(stepped).flatten(1).mean(dim=1)
        torch.testing.assert_close(gaussian_log_prob(stepped, mean, std), expected)


class TestAdvantages:
    def test_z_scored_within_each_group(self):
        rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
        spread = math.sqrt(2 / 3)  # population std of 1, 2, 3
        expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / spread
        torch.testing.assert_close(group_advantages(rewards, 3, clip=5.0), expected)

    @pytest.mark.parametrize("scale", [1e-6, 1e-4, 1.0, 1e4])
    def test_the_rewards_units_do_not_matter(self, scale):
        """A spread the size of the built-in rewards' (1e-4) is z-scored like any other."""
        rewards = torch.tensor([-3.0, -1.0, -2.0, -2.5])
        expected = group_advantages(rewards, 4, clip=5.0)
        torch.testing.assert_close(group_advantages(rewards * scale, 4, clip=5.0), expected)
        assert expected.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)

    def test_tied_groups_get_zero(self):
        """Equal rewards, or a spread of float rounding alone, carry no preference."""
        rewards = torch.tensor([0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 1.0, 1.0 + 1e-8, 1.0])
        assert torch.equal(group_advantages(rewards, 3, clip=5.0), torch.zeros(9))

    def test_clipped_to_the_bound(self):
        # mean 0.25, std sqrt(3)/4: the odd one out is at +sqrt(3), the others at -1/sqrt(3).
        advantages = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), 4, clip=1.5)
        assert advantages[3].item() == 1.5
        assert advantages[0].item() == pytest.approx(-1 / math.sqrt(3), rel=1e-3)


class TestClippedObjective:
    def test_known_values_and_gradients(self):
        """ratios 1.5, 0.5, 0.5 with advantages +1, -1, +1 and c = 0.2: the first two are
        clipped (-1.2 and 0.8, no gradient), the third is not (pessimistic: -0.5)."""
        old = torch.zeros(3)
        log_prob = torch.log(torch.tensor([1.5, 0.5, 0.5])).requires_grad_(True)
        terms = clipped_objective(log_prob, old, torch.tensor([1.0, -1.0, 1.0]), 0.2)
        assert terms.loss.item() == pytest.approx((-1.2 + 0.8 - 0.5) / 3)
        assert terms.clip_fraction.item() == 1.0
        terms.loss.backward()
        torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 0.0, -0.5 / 3]))

    def test_ratio_one_is_the_policy_gradient(self):
        log_prob = torch.zeros(2, requires_grad=True)
        terms = clipped_objective(log_prob, torch.zeros(2), torch.tensor([2.0, -1.0]), 1e-4)
        terms.loss.backward()
        torch.testing.assert_close(log_prob.grad, torch.tensor([-1.0, 0.5]))
        assert terms.clip_fraction.item() == 0 and terms.approx_kl.item() == 0

    def test_kl_term(self):
        terms = clipped_objective(
            torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1, torch.tensor([0.2, 0.4]), 0.5
        )
        assert terms.loss.item() == pytest.approx(0.15) and terms.kl.item() == pytest.approx(0.3)


class TestConfig:
    def test_defaults_are_valid(self):
        assert grpo_config().reward == "background,seam:0.5,fill"

    @pytest.mark.parametrize(
        "overrides,message",
        [
            ({"num_generations": 1}, "num_generations must be >= 2"),
            ({"timestep_fraction": 0.0}, "timestep_fraction must be in"),
            ({"sde_window": 11}, r"sde_window must be in \[1, --sampling_steps 10\]"),
            ({"reward": "background,sharpness"}, "unknown reward 'sharpness'"),
            ({"reward": "clip"}, "needs --clip_reward_model"),
            ({"reward": "fill,preference"}, "needs --preference_reward_model"),
            ({"lora_dropout": 0.1}, "needs --lora_dropout 0"),
            ({"num_inner_epochs": 2, "checkpointing_steps": 5}, "checkpointing_steps 5 must be"),
        ],
    )
    def test_refused(self, overrides, message):
        with pytest.raises(ValueError, match=message):
            grpo_config(**overrides)

    def test_supervised_runs_ignore_grpo_only_rules(self):
        assert grpo_config(objective="sft", lora_dropout=0.1).lora_dropout == 0.1


class ToyPolicy:
    """A flow policy on 4 numbers per sample, decoded as a 2x2 grey image: the velocity is a
    linear layer, the step Flow-GRPO's SDE on ``linspace(1, 0, steps + 1)``."""

    def start(self, batch, generations, steps, generator):
        count = len(batch["prompt"]) * generations
        sigmas = torch.linspace(1, 0, steps + 1).tolist()
        return {"sigmas": sigmas}, torch.randn(count, 4, generator=generator)

    def step_distribution(self, model, latents, step, conditioning, stochastic):
        sigmas = conditioning["sigmas"]
        velocity = model(latents)
        level = 0.7 if stochastic else 0.0
        return flow_sde_step(latents, velocity, sigmas[step], sigmas[step + 1], sigmas[1], level)

    def decode(self, latents, conditioning):
        return ((latents.view(-1, 1, 2, 2).expand(-1, 3, 2, 2) + 1) / 2).clamp(0, 1)


def toy_batch(examples: int = 2) -> dict:
    """Grey sources (0.5 after decoding), empty masks: the background reward is -MSE to 0.5,
    i.e. final latents near 0 win."""
    return {
        "image": torch.zeros(examples, 3, 2, 2),
        "mask": torch.zeros(examples, 1, 2, 2),
        "prompt": ["a"] * examples,
    }


@pytest.fixture
def accelerator(clean_accelerate_state):
    return Accelerator(cpu=True)


def toy_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 4)


REWARDS = Rewards("background", RewardOptions(), "cpu")


class TestRollout:
    def test_window_and_trained_steps(self):
        config = grpo_config(sampling_steps=8, sde_window=3, timestep_fraction=0.5)
        generator = torch.Generator().manual_seed(0)
        window = stochastic_steps(config, generator)
        assert len(window) == 3 and window == list(range(window[0], window[0] + 3))
        trained = trained_steps(config, window, generator)
        assert len(trained) == 2 and set(trained) <= set(window)

    def test_stores_fp32_states_of_the_trained_steps_only(self):
        config = grpo_config(num_generations=3, sampling_steps=6, sde_window=2)
        rollout = sample_rollout(
            ToyPolicy(), toy_model(), toy_batch(), config, torch.Generator().manual_seed(1), REWARDS
        )
        assert len(rollout.trained) == 2 and rollout.log_probs.keys() == set(rollout.trained)
        assert set(rollout.states) == {s for j in rollout.trained for s in (j, j + 1)}
        assert all(state.dtype == torch.float32 for state in rollout.states.values())
        assert rollout.reward.shape == rollout.advantages.shape == (6,)
        assert rollout.preview.images.shape == (3, 3, 2, 2)
        for group in rollout.advantages.view(2, 3):
            assert group.mean().abs() < 1e-5

    def test_same_generator_same_rollout(self):
        config = grpo_config(num_generations=2, sampling_steps=3)
        first, second = (
            sample_rollout(
                ToyPolicy(),
                toy_model(),
                toy_batch(),
                config,
                torch.Generator().manual_seed(7),
                REWARDS,
            )
            for _ in range(2)
        )
        assert torch.equal(first.reward, second.reward) and first.trained == second.trained


class TestUpdate:
    def test_ratio_is_one_at_the_first_update_then_clipped(self, accelerator):
        config = grpo_config(num_generations=4, sampling_steps=3, clip_range=1e-6)
        model = toy_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        rollout = sample_rollout(
            ToyPolicy(), model, toy_batch(), config, torch.Generator().manual_seed(2), REWARDS
        )
        first = policy_update(accelerator, model, ToyPolicy(), [rollout], config)
        assert all(torch.equal(term.ratio, torch.ones(8)) for term in first)
        assert all(term.clip_fraction == 0 for term in first)
        optimizer.step()
        optimizer.zero_grad()
        second = policy_update(accelerator, model, ToyPolicy(), [rollout], config)
        assert all(term.clip_fraction > 0 for term in second)

    def test_reference_is_the_model_itself_without_an_adapter(self, accelerator):
        config = grpo_config(num_generations=2, sampling_steps=2, kl_beta=0.5)
        model = toy_model()
        rollout = sample_rollout(
            ToyPolicy(), model, toy_batch(), config, torch.Generator().manual_seed(3), REWARDS
        )
        terms = policy_update(accelerator, model, ToyPolicy(), [rollout], config)
        assert all(term.kl == 0 for term in terms)

    def test_gradient_of_the_mean_over_steps_and_rollouts(self, accelerator):
        """Two rollouts (accumulation 1 here, so accelerate divides by 1): the gradient is the
        sum over rollouts of the mean over each one's trained steps, as written out here."""
        config = grpo_config(num_generations=2, sampling_steps=2)
        model = toy_model()
        rollouts = [
            sample_rollout(
                ToyPolicy(), model, toy_batch(), config, torch.Generator().manual_seed(s), REWARDS
            )
            for s in (4, 5)
        ]
        policy_update(accelerator, model, ToyPolicy(), rollouts, config)
        got = model.weight.grad.clone()
        model.zero_grad()
        total = 0
        for rollout in rollouts:
            for step in rollout.trained:
                result = transition(
                    ToyPolicy(),
                    model,
                    rollout.states[step],
                    step,
                    rollout.conditioning,
                    next_latents=rollout.states[step + 1],
                )
                ratio = torch.exp(result.log_prob - rollout.log_probs[step])
                total = total + (-rollout.advantages * ratio).mean() / len(rollout.trained)
        total.backward()
        torch.testing.assert_close(got, model.weight.grad)

    def test_raises_the_reward(self, accelerator):
        """The whole loop on the toy: 40 updates of 4 groups of 8 bring the final latents toward
        the reward's optimum."""
        config = grpo_config(num_generations=8, sampling_steps=3)
        model = toy_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        rewards = []
        for iteration in range(40):
            generator = torch.Generator().manual_seed(iteration)
            rollout = sample_rollout(ToyPolicy(), model, toy_batch(4), config, generator, REWARDS)
            policy_update(accelerator, model, ToyPolicy(), [rollout], config)
            optimizer.step()
            optimizer.zero_grad()
            rewards.append(rollout.reward.mean().item())
        first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
        assert last > first + 0.02, (first, last)
