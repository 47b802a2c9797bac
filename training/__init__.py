"""Plumbing every train script shares, and no model-family logic.

At the top, what every run goes through: :mod:`training.config` (flags and YAML),
:mod:`training.runtime` (accelerate set-up), :mod:`training.datasets` (the datasets the flags
describe), :mod:`training.loop` (the loop itself), :mod:`training.optimizers`,
:mod:`training.compiling`, :mod:`training.metrics`, :mod:`training.validation`,
:mod:`training.model_card` and :mod:`training.inference`. Grouped by job below it:

- :mod:`training.inputs`: what the denoiser and the losses are fed (FLUX inputs, flow-matching
  noise and timesteps, latents, image embeddings, the tensor cache).
- :mod:`training.checkpointing`: resumable checkpoints, their state files, the output folder,
  stopping without losing work, sharded LoRA weights.
- :mod:`training.lora`: peft adapters, their key layouts, export and merge.
- :mod:`training.memory`: block offload, quantized bases and the memory plan.
- :mod:`training.grpo`: reward fine-tuning (stochastic steps, rewards, the policy step, its loop).
"""
