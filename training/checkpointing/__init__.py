"""Runs that survive being stopped: checkpoints, their state files, the output folder.

:mod:`.checkpoints` (``checkpoint-<step>/`` complete or absent, and resume), :mod:`.state_io`
(optimizer, schedule and RNG state without pickle), :mod:`.output_dir` (one run per folder, no
foreign file touched), :mod:`.stopping` (preemption signals, non-finite steps) and
:mod:`.sharding` (LoRA weights of an FSDP2-sharded model).
"""
