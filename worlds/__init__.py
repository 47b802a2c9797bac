"""The models the tests, benchmarks and evidence run on, built from configs on a CPU.

:mod:`.tiny_models` (tiny random pipelines of every family, saved for ``from_pretrained``),
:mod:`.kontext_world` and :mod:`.qwen_world` (tiny *pretrained* worlds where a mask loss's effect
can be measured) and :mod:`.fitting` (fitting a world's models). The worlds build their training
inputs with the train scripts' own code, so this package sits above the scripts.
"""
