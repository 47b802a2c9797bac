"""Fitting a run on the card it has.

:mod:`.offload` (frozen block weights kept on the CPU), :mod:`.quantization` (a quantized
frozen base and text encoders) and :mod:`.plan` (the bytes a training step holds, by holder).
"""
