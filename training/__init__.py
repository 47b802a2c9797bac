"""Plumbing every train script shares, and no model-family logic.

:mod:`training.config` (flags and YAML), :mod:`training.runtime` (accelerate set-up),
:mod:`training.lora` (peft adapters in diffusers' format), :mod:`training.checkpoint`
(atomic, resumable checkpoints), :mod:`training.loop` (the loop itself),
:mod:`training.flow_matching` (timestep sampling and weighting), :mod:`training.metrics`,
:mod:`training.caching`, :mod:`training.embeddings`, :mod:`training.datasets`,
:mod:`training.validation`, and GRPO reward fine-tuning: :mod:`training.sde` (stochastic steps
with exact log-densities), :mod:`training.rewards`, :mod:`training.grpo` (advantages, objective,
rollouts) and :mod:`training.grpo_loop` (its loop).
"""
