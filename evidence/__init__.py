"""What the suite claims, measured: ablations on the tiny pretrained worlds and the demo report.

:mod:`.ablation_runs` (configurations x seeds, recorded and reported), :mod:`.ablation` (the
Kontext mask losses), :mod:`.text_ablation` (the Qwen-Image-Edit text-region loss),
:mod:`.edit_metrics` (an edit scored against its known mask), :mod:`.plots` and
:mod:`.demo_report`. Speed and memory are measured in ``benchmarks`` instead.
"""
