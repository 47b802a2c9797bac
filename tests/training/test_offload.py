"""``training.memory.offload``: a denoiser whose blocks' frozen weights live on the CPU computes the
same loss and LoRA gradients as the whole model, holds none of those weights between calls, and
works on a quantized base."""

import pytest
import torch
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from benchmarks.real_size import kontext_case, sd15_case
from training.memory.offload import denoiser_blocks, offload_blocks


def case(quantized: bool = False):
    """The tiny Kontext training step (every mask term on), checkpointing as --offload_blocks
    asks; the transformer quantized to int8 before its LoRA when ``quantized``."""
    torch.manual_seed(0)
    step = kontext_case(tiny=True, batch=1, resolution=32, device="cpu", dtype=torch.float32)
    if quantized:
        # The frozen linears under the LoRA, as --quantize_base int8 leaves them.
        quantize_(
            step.model,
            Int8WeightOnlyConfig(),
            filter_fn=lambda module, name: (
                isinstance(module, torch.nn.Linear) and "lora_" not in name
            ),
        )
        weight = step.model.transformer_blocks[0].attn.to_q.base_layer.weight
        assert "Int8" in type(weight).__name__
    step.model.enable_gradient_checkpointing()
    return step


def loss_and_lora_grads(step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, _ = step.loss(step.model, step.batch, torch.Generator().manual_seed(3))
    loss.backward()
    grads = {
        name: param.grad.clone()
        for name, param in step.model.named_parameters()
        if param.requires_grad
    }
    step.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def frozen_in(block: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("count", [2, "all"])
def test_same_loss_and_lora_gradients_as_the_whole_model(quantized, count):
    whole = case(quantized)
    expected_loss, expected_grads = loss_and_lora_grads(whole)
    split = case(quantized)
    offload = offload_blocks(split.model, count, "cpu")
    blocks = denoiser_blocks(split.model)
    chosen = blocks if count == "all" else blocks[-count:]
    assert list(offload.slots) == chosen
    loss, grads = loss_and_lora_grads(split)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Between calls the chosen blocks hold their LoRA only, but for the last one the backward
    # pass recomputed (its recomputation stops before the block's end, and so before the hook
    # that takes the weights away; the next call's first hook does). The others keep all.
    assert len(offload.onloaded) == 1
    for block in blocks:
        held = block not in chosen or block in offload.onloaded
        assert (frozen_in(block) != []) == held
        assert any(p.requires_grad for p in block.parameters())
    split.loss(split.model, split.batch, torch.Generator().manual_seed(4))
    assert offload.onloaded == set()
    assert all(frozen_in(block) == [] for block in chosen)


def test_offloaded_bytes_are_the_blocks_frozen_weights():
    step = case()
    blocks = denoiser_blocks(step.model)
    expected = sum(t.numel() * t.element_size() for b in blocks[-3:] for t in frozen_in(b))
    offload = offload_blocks(step.model, 3, "cpu")
    assert offload.offloaded_bytes == expected > 0


def test_none_is_nothing():
    assert offload_blocks(case().model, 0, "cpu") is None


def test_a_unet_is_refused():
    unet = sd15_case(tiny=True, batch=1, resolution=32, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"transformer denoisers .*UNet2DConditionModel"):
        offload_blocks(unet.denoiser, "all", "cpu")
