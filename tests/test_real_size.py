"""The GPU benchmark's real-size models, checked on the CPU: built on the meta device (no
memory), their parameter counts are the published ones and the FLOPs a forward pass counts
match the closed-form formula MFU is reasoned with; the benchmark's own code runs end to end on
the tiny models. No timings are checked."""

import pytest
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

from benchmarks import gpu
from benchmarks.real_size import (
    CASES,
    FLUX_TRANSFORMER,
    QWEN_IMAGE_TRANSFORMER,
    counted_flops,
    mmdit_forward_flops,
)

# Exact counts of the configurations in benchmarks/real_size.py.
PARAMETERS = {
    "kontext": 11_901_408_320,
    "flux-fill": 11_902_391_360,
    "qwen-edit": 20_430_401_088,
    "flux2-klein": 3_875_544_576,
    "sd15-inpaint": 859_535_364,
}


@pytest.mark.parametrize("family", list(CASES))
def test_real_size_cases_build_with_the_published_sizes(family):
    """What ``run.py --gpu`` builds, on the meta device: the frozen base has the published
    parameter count in bf16, the LoRA is added, the batch has the size the issue asks for."""
    build, resolution, published = CASES[family]  # 11.9B, 11.9B, 20.4B, 0.86B, 3.88B
    case = build(False, 1, resolution, "meta", torch.bfloat16)
    frozen = [p for p in case.denoiser.parameters() if not p.requires_grad]
    trainable = [p for p in case.denoiser.parameters() if p.requires_grad]
    assert sum(p.numel() for p in frozen) == PARAMETERS[family]
    assert sum(p.numel() for p in frozen) == pytest.approx(published, rel=0.005)
    assert {p.dtype for p in frozen} == {torch.bfloat16} and trainable
    assert {p.dtype for p in trainable} == {torch.float32}  # LoRA trains in fp32
    latents = case.batch.get("target_latents", case.batch.get("latents_mean"))
    # FLUX.2's latents are the 2x2-patchified grid: 16 pixels per cell.
    assert latents.shape[-1] * (16 if family == "flux2-klein" else 8) == resolution


# The FLOP checks run the real widths with 2 + 2 (FLUX) and 2 (Qwen) blocks: the formula is per
# block, and the meta device's cost is per operation, so the full depth would only take longer.


def test_flux_kontext_forward_flops_match_the_formula():
    """1024x1024 target + 1024x1024 context: 8192 image tokens, 512 T5 tokens."""
    image, text = 2 * 64 * 64, 512
    assert mmdit_forward_flops(3072, 19, 38, image, text) == pytest.approx(165.43e12, rel=1e-3)
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            **{**FLUX_TRANSFORMER, "num_layers": 2, "num_single_layers": 2}
        )
        inputs = {
            "hidden_states": torch.randn(1, image, 64),
            "encoder_hidden_states": torch.randn(1, text, 4096),
            "pooled_projections": torch.randn(1, 768),
            "timestep": torch.ones(1),
            "img_ids": torch.zeros(image, 3),
            "txt_ids": torch.zeros(text, 3),
            "guidance": torch.ones(1),
            "return_dict": False,
        }
        counted = counted_flops(lambda: model(**inputs))
    formula = mmdit_forward_flops(3072, 2, 2, image, text)
    assert counted == pytest.approx(formula, rel=0.01)  # the embedders are the difference


def test_qwen_image_forward_flops_match_the_formula():
    """1024x1024 target + condition (2 x 4096 tokens of 2x2 patches), 1024 prompt tokens."""
    image, text = 2 * 64 * 64, 1024
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**{**QWEN_IMAGE_TRANSFORMER, "num_layers": 2})
        inputs = {
            "hidden_states": torch.randn(1, image, 64),
            "encoder_hidden_states": torch.randn(1, text, 3584),
            "encoder_hidden_states_mask": None,
            "timestep": torch.ones(1),
            "img_shapes": [[(1, 64, 64), (1, 64, 64)]],
            "return_dict": False,
        }
        counted = counted_flops(lambda: model(**inputs))
    formula = mmdit_forward_flops(3072, 2, 0, image, text)
    assert counted == pytest.approx(formula, rel=0.01)


def test_the_gpu_benchmark_runs_on_tiny_models():
    """Recording the inputs, the bare step, the FLOP count and the table, for one model (the
    others share the code; their cases are built above)."""
    table = gpu.main(
        [
            *("--tiny", "--device", "cpu", "--resolution", "32", "--blocks", "1", "--steps", "1"),
            *("--families", "kontext"),
        ]
    )
    rows = table.splitlines()[2:]
    assert len(rows) == 2  # without and with gradient checkpointing
    assert "FLUX.1 Kontext" in rows[0] and "| no checkpointing |" in rows[0]
    assert "FLUX.1 Kontext" in rows[1] and "| checkpointing |" in rows[1]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[4]) > 0  # suite and bare s/step
        assert cells[6:] == ["n/a"] * 3  # no GPU: no memory, no MFU
