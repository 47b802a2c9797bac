"""The LoRA a run trains, and that LoRA in other tools' hands.

:mod:`.adapters` (peft adapters saved and loaded in diffusers' format), :mod:`.layouts` (each
tool's key layout), :mod:`.export` (conversion between layouts and dtypes) and :mod:`.merge`
(the LoRA folded into the base weights).
"""
