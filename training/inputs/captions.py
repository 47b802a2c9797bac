"""``--caption_dropout``: some examples train with the empty prompt instead of their own.

A LoRA that only ever saw its captions learns little about the unconditional branch that
classifier-free guidance runs, and nothing about being used without words. Each step draws, per
example, whether its prompt is dropped, from the step's own generator (seeded by run seed, epoch
and batch), so a resumed run drops exactly what the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


class CaptionDropout:
    """Replaces the prompt of each example of a batch with probability ``rate``.

    ``empty`` is the family encoder's encoding of the empty prompt, name -> ``[1, ...]``: what a
    batch from the latent cache holds in place of its prompts (``prompt_embeds`` ``[B, L, D]``,
    ``pooled_prompt_embeds`` ``[B, D]``, or ``input_ids`` ``[B, L]``). A batch of raw items holds
    its prompts as strings under ``"prompt"``; dropped ones become ``""``, which the encoder then
    encodes as the pipeline would.
    """

    def __init__(self, rate: float, empty: Mapping[str, torch.Tensor]) -> None:
        self.rate = rate
        self.empty = {name: value.detach().cpu() for name, value in empty.items()}

    def dropped(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``[B]`` bool: the examples whose prompt goes; one uniform draw per example."""
        draws = torch.rand(batch_size, generator=generator, device=generator.device)
        return (draws < self.rate).cpu()

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        """``batch`` with the dropped examples' prompts replaced; unchanged (and no number
        drawn) at rate 0."""
        if self.rate == 0:
            return batch
        dropped = self.dropped(len(batch["index"]), generator)
        out = dict(batch)
        if "prompt" in batch:
            kept = zip(batch["prompt"], dropped.tolist(), strict=True)
            out["prompt"] = ["" if drop else prompt for prompt, drop in kept]
            return out
        for name, empty in self.empty.items():
            value = batch[name]
            rows = dropped.to(value.device).view(-1, *[1] * (value.dim() - 1))
            out[name] = torch.where(rows, empty.to(value), value)
        return out


def caption_dropout(
    config, encode_prompts: Callable[[list[str]], Mapping[str, torch.Tensor]] | None
) -> CaptionDropout | None:
    """``--caption_dropout`` of ``config``, or None when it is 0. ``encode_prompts`` is the
    family encoder's prompt encoding, which cached batches need for the empty prompt; called
    here, while the text encoders are still on the device. None: batches are never cached."""
    if not config.caption_dropout:
        return None
    empty = encode_prompts([""]) if encode_prompts is not None else {}
    return CaptionDropout(config.caption_dropout, empty)
