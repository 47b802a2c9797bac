"""``training.lora.adapters``: peft adapters on a tiny FLUX transformer, saved in diffusers' format
and loaded back by the pipeline and by ``load_lora``."""

import json
import re

import pytest
import torch
from diffusers import FluxKontextPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from training.config import TrainConfig
from training.lora.adapters import (
    LoraFormat,
    add_lora,
    lora_config,
    lora_disabled,
    target_modules,
)
from training.lora.export import LORA_WEIGHTS_NAME
from worlds.tiny_models import tiny_flux_kontext_pipeline

LAYERS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
KONTEXT = LoraFormat(FluxKontextPipeline, "transformer")


def make_config(**overrides) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", **overrides)


def matches(name: str, targets) -> bool:
    """peft's rule for a list of target names: the module name or a dotted suffix of it."""
    return any(name == target or name.endswith("." + target) for target in targets)


def expected_lora_parameters(model: torch.nn.Module, targets, rank: int) -> int:
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and matches(name, targets)
    )


def transformer_inputs(seed: int = 0) -> dict:
    """One FLUX step on a 2x2 packed latent with three text tokens."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 3, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.float32),
        "txt_ids": torch.zeros(3, 3),
        "return_dict": False,
    }


@torch.no_grad()
def run(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    return model(**transformer_inputs(seed))[0]


def randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """peft's gaussian init leaves lora_B at zero (a no-op adapter); give every LoRA weight a
    value so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


def adapted_transformer(seed=0, lora_seed=1, **config):
    transformer = tiny_flux_kontext_pipeline(seed).transformer
    add_lora(transformer, make_config(**config), LAYERS, KONTEXT)
    randomise_lora(transformer, lora_seed)
    return transformer


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


class TestTargetModules:
    def test_default(self):
        assert target_modules(make_config(), LAYERS) == list(LAYERS)
        assert target_modules(make_config(lora_layers=""), LAYERS) == list(LAYERS)

    def test_parsed(self):
        config = make_config(lora_layers=" attn.to_q, attn.to_k ,,proj_out ")
        assert target_modules(config, LAYERS) == ["attn.to_q", "attn.to_k", "proj_out"]


class TestAddLora:
    def test_only_lora_trainable_and_fp32_on_bf16_model(self):
        transformer = tiny_flux_kontext_pipeline(0).transformer.to(torch.bfloat16)
        expected = expected_lora_parameters(transformer, LAYERS, rank=4)
        base_names = {name for name, _ in transformer.named_parameters()}
        add_lora(transformer, make_config(rank=4), LAYERS, KONTEXT)
        trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        frozen = {n: p for n, p in transformer.named_parameters() if not p.requires_grad}
        assert trainable and all("lora_" in name for name in trainable)
        assert all(p.dtype == torch.float32 for p in trainable.values())
        assert sum(p.numel() for p in trainable.values()) == expected
        assert all(p.dtype == torch.bfloat16 for p in frozen.values())
        # every base weight is still there (peft renames wrapped ones to *.base_layer.*) and frozen
        renamed = {name.replace(".base_layer", "") for name in frozen}
        assert renamed == base_names

    def test_rank_alpha_and_targets(self):
        transformer = tiny_flux_kontext_pipeline(0).transformer
        config = make_config(rank=2, lora_alpha=6, lora_layers="norm_out.linear,ff.net.2")
        add_lora(transformer, config, LAYERS, KONTEXT)
        lora_config = transformer.peft_config["default"]
        assert lora_config.r == 2
        assert lora_config.lora_alpha == 6
        assert set(lora_config.target_modules) == {"norm_out.linear", "ff.net.2"}
        names = {n for n, p in transformer.named_parameters() if p.requires_grad}
        assert names == {
            f"{module}.lora_{ab}.default.weight"
            for module in ("norm_out.linear", "transformer_blocks.0.ff.net.2")
            for ab in "AB"
        }
        assert transformer.norm_out.linear.scaling["default"] == 3.0
        assert transformer.norm_out.linear.lora_A["default"].weight.shape == (2, 32)

    def test_alpha_defaults_to_rank(self):
        transformer = tiny_flux_kontext_pipeline(0).transformer
        add_lora(transformer, make_config(rank=8), LAYERS, KONTEXT)
        assert transformer.peft_config["default"].lora_alpha == 8

    def test_fresh_adapter_is_a_no_op_and_trains(self):
        transformer = tiny_flux_kontext_pipeline(0).transformer
        before = run(transformer)
        add_lora(transformer, make_config(rank=4), LAYERS, KONTEXT)
        torch.testing.assert_close(run(transformer), before, atol=0, rtol=0)
        out = transformer(**transformer_inputs())[0]
        out.square().mean().backward()
        grads = [p.grad for n, p in transformer.named_parameters() if "lora_B" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    def test_bf16_base_forward_backward(self):
        transformer = tiny_flux_kontext_pipeline(0).transformer.to(torch.bfloat16)
        add_lora(transformer, make_config(rank=4), LAYERS, KONTEXT)
        inputs = {
            k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v
            for k, v in transformer_inputs().items()
        }
        out = transformer(**inputs)[0]
        assert torch.isfinite(out.float()).all()
        out.float().square().mean().backward()
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                assert param.grad is not None and param.grad.dtype == torch.float32

    def test_unknown_layer_raises_naming_it(self):
        transformer = tiny_flux_kontext_pipeline(0).transformer
        with pytest.raises(ValueError, match=re.escape("attn.to_nothing")):
            add_lora(transformer, make_config(lora_layers="attn.to_nothing"), LAYERS, KONTEXT)

    def test_one_unknown_layer_among_known_raises_naming_it(self):
        transformer = tiny_flux_kontext_pipeline(0).transformer
        with pytest.raises(ValueError, match=re.escape("attn.to_kk")):
            add_lora(transformer, make_config(lora_layers="attn.to_q,attn.to_kk"), LAYERS, KONTEXT)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapted transformer (rank 4, alpha 8), the folder it was saved to, and the file."""
    transformer = adapted_transformer(rank=4, lora_alpha=8)
    folder = tmp_path_factory.mktemp("lora")
    path = KONTEXT.save(transformer, folder)
    return transformer, folder, path


class TestSaveLora:
    def test_file(self, saved):
        transformer, folder, path = saved
        assert path == folder / LORA_WEIGHTS_NAME
        assert [p.name for p in folder.iterdir()] == [LORA_WEIGHTS_NAME]
        with safe_open(str(path), "pt") as handle:
            keys = set(handle.keys())
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in keys}
        peft_state = get_peft_model_state_dict(transformer)
        # diffusers keys: component prefix, no adapter name
        assert keys == {f"transformer.{key}" for key in peft_state}
        assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
        assert not any(".default." in key for key in keys)
        for key, value in peft_state.items():
            assert torch.equal(tensors[f"transformer.{key}"], value)
        lora_metadata = json.loads(metadata["lora_adapter_metadata"])
        assert lora_metadata["transformer.r"] == 4
        assert lora_metadata["transformer.lora_alpha"] == 8
        assert set(lora_metadata["transformer.target_modules"]) == set(LAYERS)

    def test_pipeline_loads_it_and_reproduces_the_outputs(self, saved):
        transformer, folder, _ = saved
        pipe = tiny_flux_kontext_pipeline(0)
        base = run(pipe.transformer)
        expected = run(transformer)
        assert (expected - base).abs().max() > 1e-2  # the adapter matters
        pipe.load_lora_weights(str(folder))
        # alpha 8 / rank 4: only the metadata tells the pipeline the scale is 2
        torch.testing.assert_close(run(pipe.transformer), expected, atol=1e-5, rtol=1e-5)

    def test_from_pretrained_pipeline_loads_it(self, saved, tmp_path):
        transformer, folder, _ = saved
        tiny_flux_kontext_pipeline(0).save_pretrained(tmp_path / "pipe")
        pipe = FluxKontextPipeline.from_pretrained(tmp_path / "pipe")
        pipe.load_lora_weights(str(folder))
        torch.testing.assert_close(run(pipe.transformer), run(transformer), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def source(saved):
    transformer, folder, path = saved
    return lora_state(transformer), folder, path


class TestLoadLora:
    @pytest.mark.parametrize("as_folder", [False, True])
    def test_round_trip_exact(self, source, as_folder):
        state, folder, path = source
        fresh = tiny_flux_kontext_pipeline(0).transformer
        add_lora(fresh, make_config(rank=4, lora_alpha=8), LAYERS, KONTEXT)
        assert any(not torch.equal(state[k], v) for k, v in lora_state(fresh).items())
        KONTEXT.load(fresh, folder if as_folder else path)
        loaded = lora_state(fresh)
        assert loaded.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(loaded[key], value), key
        trainable = [p for p in fresh.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)

    def test_missing_file(self, tmp_path):
        fresh = tiny_flux_kontext_pipeline(0).transformer
        add_lora(fresh, make_config(rank=4), LAYERS, KONTEXT)
        missing = tmp_path / "nope.safetensors"
        with pytest.raises(ValueError, match=re.escape(str(missing))):
            KONTEXT.load(fresh, missing)

    def test_folder_without_the_file(self, tmp_path):
        fresh = tiny_flux_kontext_pipeline(0).transformer
        add_lora(fresh, make_config(rank=4), LAYERS, KONTEXT)
        with pytest.raises((ValueError, OSError), match=re.escape(str(tmp_path))):
            KONTEXT.load(fresh, tmp_path)

    def test_no_transformer_weights(self, tmp_path):
        path = tmp_path / "text_only.safetensors"
        save_file(
            {
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (
                    torch.zeros(4, 32)
                ),
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": (
                    torch.zeros(32, 4)
                ),
            },
            str(path),
        )
        fresh = tiny_flux_kontext_pipeline(0).transformer
        add_lora(fresh, make_config(rank=4), LAYERS, KONTEXT)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*no transformer weights"):
            KONTEXT.load(fresh, path)

    def test_rank_mismatch(self, source):
        _, _, path = source
        fresh = tiny_flux_kontext_pipeline(0).transformer
        add_lora(fresh, make_config(rank=8), LAYERS, KONTEXT)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*does not fit"):
            KONTEXT.load(fresh, path)

    def test_layers_the_adapter_lacks(self, source):
        _, _, path = source
        fresh = tiny_flux_kontext_pipeline(0).transformer
        add_lora(fresh, make_config(rank=4, lora_layers="attn.to_q"), LAYERS, KONTEXT)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*lacks"):
            KONTEXT.load(fresh, path)


class TestWarmStart:
    """--init_lora_weights shapes the adapter like the file's (rank 4, alpha 8 in ``saved``)."""

    def test_rank_alpha_and_modules_come_from_the_metadata(self, saved):
        transformer, _, path = saved
        fresh = tiny_flux_kontext_pipeline(0).transformer
        add_lora(fresh, make_config(init_lora_weights=str(path)), ("proj_out",), KONTEXT)
        adapter = fresh.peft_config["default"]
        assert (adapter.r, adapter.lora_alpha) == (4, 8)
        assert set(adapter.target_modules) == set(LAYERS)
        assert fresh.transformer_blocks[0].attn.to_q.scaling["default"] == 2.0
        assert_same_lora(lora_state(fresh), lora_state(transformer))
        torch.testing.assert_close(run(fresh), run(transformer), atol=0, rtol=0)

    def test_flags_that_agree_are_accepted(self, saved):
        _, _, path = saved
        fresh = tiny_flux_kontext_pipeline(0).transformer
        config = make_config(
            init_lora_weights=str(path), rank=4, lora_alpha=8, lora_layers=",".join(LAYERS)
        )
        add_lora(fresh, config, ("proj_out",), KONTEXT)
        assert fresh.peft_config["default"].r == 4

    @pytest.mark.parametrize(
        "flags,message",
        [
            ({"rank": 16}, "--rank 16 but the file has 4"),
            ({"lora_alpha": 4}, "--lora_alpha 4 but the file has 8"),
            ({"lora_layers": "attn.to_q"}, "--lora_layers ['attn.to_q'] but the file has"),
        ],
    )
    def test_conflicting_flag_is_refused_naming_both(self, saved, flags, message):
        _, _, path = saved
        config = make_config(init_lora_weights=str(path), **flags)
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            lora_config(config, LAYERS, KONTEXT.read(path))
        assert str(path) in str(error.value)

    def test_file_without_metadata(self, saved, tmp_path, caplog):
        transformer, _, _ = saved
        path = tmp_path / "bare.safetensors"
        save_file({f"transformer.{k}": v for k, v in lora_state(transformer).items()}, str(path))
        read = KONTEXT.read(path)
        assert read.metadata == {} and read.rank() == 4
        adapter = lora_config(make_config(), LAYERS, read)
        assert adapter.r == 4 and adapter.lora_alpha == 4  # the rank, said in a warning
        assert "no LoRA metadata" in caplog.text
        assert set(adapter.target_modules) == {
            f"{blocks}.{i}.attn.{layer}"
            for blocks, count in (("transformer_blocks", 1), ("single_transformer_blocks", 1))
            for i in range(count)
            for layer in ("to_q", "to_k", "to_v", "to_out.0")
            if not (blocks == "single_transformer_blocks" and layer == "to_out.0")
        }
        assert lora_config(make_config(lora_alpha=8), LAYERS, read).lora_alpha == 8


def assert_same_lora(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


class TestLoraDisabled:
    def test_base_model_inside_then_the_adapter_as_before(self):
        plain = tiny_flux_kontext_pipeline(0).transformer
        adapted = adapted_transformer()
        with_lora = run(adapted)
        assert not torch.allclose(with_lora, run(plain))
        with lora_disabled(adapted):
            assert torch.equal(run(adapted), run(plain))
            assert not any(param.requires_grad for param in adapted.parameters())
        assert torch.equal(run(adapted), with_lora)
        trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in name for name in trainable)

    def test_restored_after_an_error(self):
        adapted = adapted_transformer()
        with_lora = run(adapted)
        with pytest.raises(RuntimeError, match="inside"), lora_disabled(adapted):
            raise RuntimeError("inside")
        assert torch.equal(run(adapted), with_lora)
