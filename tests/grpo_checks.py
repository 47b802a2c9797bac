"""Checks of a GRPO policy that every family's tests share."""

from __future__ import annotations

import torch

from training.grpo.policy import transition


def assert_ratios_are_one_on_policy(
    policy, denoiser: torch.nn.Module, rollout, samples: int
) -> None:
    """Recomputed at each trained step of ``rollout`` by the model that sampled it, the new
    log-density equals the recorded one: each of the ``samples`` importance ratios is 1, and
    the log-density has a gradient."""
    for step in rollout.trained:
        result = transition(
            policy,
            denoiser,
            rollout.states[step],
            step,
            rollout.conditioning,
            next_latents=rollout.states[step + 1],
        )
        assert result.log_prob.requires_grad
        ratio = torch.exp(result.log_prob - rollout.log_probs[step]).detach()
        torch.testing.assert_close(ratio, torch.ones(samples), rtol=0, atol=1e-5)
