"""GRPO reward fine-tuning for the inpainting families.

:mod:`.sde` (stochastic denoising steps with exact log-densities), :mod:`.rewards` (built-in and
user rewards), :mod:`.policy` (group advantages, the clipped objective, rollouts) and
:mod:`.loop` (sample, score, update; checkpoints and resume).
"""
