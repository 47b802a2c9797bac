"""The LoRA a run trains, and that LoRA in other tools' hands.

:mod:`.adapters` (peft adapters saved in diffusers' format, warm-started from either layout),
:mod:`.layouts` (each tool's key layout), :mod:`.export` (LoRA files in either layout: read,
converted, written; the others read through it) and :mod:`.merge` (the LoRA folded into the base
weights).
"""
