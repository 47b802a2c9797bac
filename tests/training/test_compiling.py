"""--compile: every repeated block compiled in place, names kept, the same loss and gradients.

The blocks compile with the ``aot_eager`` backend here (TorchDynamo's graph capture and
AOTAutograd's forward/backward split, without generating kernels): inductor's C++ build of a
tiny transformer takes minutes on a small CPU, and what the suite must get right (which modules,
in place, gradients through LoRA) is the same for every backend.
"""

import pytest
import torch

from benchmarks.real_size import kontext_case, sd15_case
from training.compiling import compile_repeated_blocks, repeated_block_classes
from training.config import TrainConfig, parse_config


def loss_and_grads(case):
    loss, _ = case.loss(case.model, case.batch, torch.Generator().manual_seed(0))
    loss.backward()
    grads = {n: p.grad for n, p in case.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_kontext_blocks_compile_in_place_with_the_same_loss():
    torch.manual_seed(0)
    plain = kontext_case(True, 1, 32, "cpu", torch.float32)
    torch.manual_seed(0)
    compiled = kontext_case(True, 1, 32, "cpu", torch.float32)
    names = list(compiled.model.state_dict())
    config = compiled.denoiser.config

    counts = compile_repeated_blocks(compiled.denoiser, backend="aot_eager")

    assert counts == {
        "FluxTransformerBlock": config.num_layers,
        "FluxSingleTransformerBlock": config.num_single_layers,
    }
    assert list(compiled.model.state_dict()) == names  # no _orig_mod. prefix: same LoRA file
    assert compiled.denoiser.transformer_blocks[0]._compiled_call_impl is not None
    expected_loss, expected_grads = loss_and_grads(plain)
    loss, grads = loss_and_grads(compiled)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6)


def test_unet_compiles_its_transformer_blocks():
    case = sd15_case(True, 1, 32, "cpu", torch.float32)
    assert repeated_block_classes(case.model) == {"BasicTransformerBlock"}
    counts = compile_repeated_blocks(case.model, backend="aot_eager")
    # One per attention layer: 1 in the down block, 1 in the middle, 2 in the up block.
    assert counts == {"BasicTransformerBlock": 4}


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no repeated block"):
        compile_repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_flag_reaches_the_config():
    flags = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]
    assert parse_config(TrainConfig, [*flags, "--compile"]).compile is True
    assert parse_config(TrainConfig, flags).compile is False
