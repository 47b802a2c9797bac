"""FLUX.2 LoRA files in kohya's layout (ComfyUI's): written by scripts/export_lora.py, checked by a
reader we did not write (diffusers' ``Flux2KleinPipeline.load_lora_weights``), read back to
diffusers' layout, and told apart from FLUX.1's.

The tiny [klein] transformer has one double and one single block, 32 wide. Each LoRA has random
non-zero weights and scale alpha / r = 1.5, and the trainer's and [dev]'s give the double
block's ``to_v`` rank 2 and alpha 5 (scale 2.5), so that a lost alpha, a wrong fuse or split of
q, k and v, or a swapped stream changes what is compared.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, FluxKontextPipeline
from lora_helpers import (
    ALPHA,
    PROMPT,
    add_random_lora,
    max_difference,
    pipeline_outputs,
    sample_image,
    save_random_lora,
)
from safetensors.torch import load_file, save_file
from test_export_lora import export, kohya_module

from training.inputs.flux import FLUX_LORA_LAYERS
from training.inputs.flux2 import FLUX2_LORA_LAYERS
from training.lora.adapters import LoraFormat
from training.lora.export import detect_family, families_of_modules, read_lora
from training.lora.layouts import LoraPair
from worlds.tiny_flux2 import MISTRAL_DIM, tiny_flux2_klein_pipeline, tiny_flux2_transformer
from worlds.tiny_models import tiny_flux_kontext_pipeline

SIZE = 64  # the FLUX.2 pipelines take no smaller reference
WIDTH = 32  # the tiny transformer's hidden size
TOLERANCE = 1e-5
OTHER_RANK = {"rank_pattern": {"attn.to_v": 2}, "alpha_pattern": {"attn.to_v": 5.0}}
# What diffusers' kohya FLUX.2 reader (0.42) drops, by diffusers' names: the guidance embedding
# ([dev] only), the modulations the blocks share, and the final norm's.
SKIPPED = (
    "time_guidance_embed.guidance_embedder.linear_1",
    "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear",
    "norm_out.linear",
)


def klein_call(pipe, references: int = 2):
    """Two denoising steps at 64x64 from ``references`` images, without classifier-free
    guidance and with a short prompt window (under half the time of the defaults on a CPU)."""
    return pipe(
        image=[sample_image(seed, SIZE) for seed in range(references)],
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        guidance_scale=1.0,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def file_deltas(path) -> dict[str, torch.Tensor]:
    """Each module's delta ``(alpha / r) * up @ down`` in float64 by name, as the suite reads
    the file ``path``."""
    return {
        name: pair.scale * pair.up.double() @ pair.down.double()
        for name, pair in read_lora(path).pairs.items()
    }


def assert_same_deltas(path, original) -> None:
    """The diffusers file ``path`` holds ``original``'s modules with the same deltas (a fused
    part of another rank comes back with its scale in its up and the fused alpha)."""
    actual, expected = file_deltas(path), file_deltas(original)
    assert actual.keys() == expected.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(actual[name], delta, msg=name)


def linear_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """A saved tiny [klein] pipeline (``model``), a LoRA on FLUX2_LORA_LAYERS saved as
    train_flux2_edit_lora.py saves it (``lora``), and its kohya export (``kohya``, ``report``)
    by the script alone, the family told by the module names."""
    root = tmp_path_factory.mktemp("klein")
    pipe = tiny_flux2_klein_pipeline()
    pipe.save_pretrained(root / "model")
    add_random_lora(pipe.transformer, list(FLUX2_LORA_LAYERS), seed=1, **OTHER_RANK)
    LoraFormat(Flux2KleinPipeline, "transformer").save(pipe.transformer, root / "lora")
    kohya = root / "kohya.safetensors"
    report = export(root / "lora", "--to", "kohya", "--out", kohya)
    return SimpleNamespace(model=root / "model", lora=root / "lora", kohya=kohya, report=report)


class TestKohyaExport:
    def test_diffusers_loads_it_as_the_original(self, klein):
        pipe = Flux2KleinPipeline.from_pretrained(klein.model)
        pipe.set_progress_bar_config(disable=True)
        out = pipeline_outputs(pipe, {"original": klein.lora, "kohya": klein.kohya}, klein_call)
        pipe.set_adapters("original", 1 / 1.5)  # what a reader ignoring alpha would give
        alpha_lost = klein_call(pipe)
        print("FLUX.2 klein kohya vs original:", max_difference(out["kohya"], out["original"]))
        assert max_difference(out["kohya"], out["original"]) < TOLERANCE
        assert max_difference(out["original"], out["base"]) > 100 * TOLERANCE
        assert max_difference(alpha_lost, out["original"]) > 100 * TOLERANCE

    def test_kohya_names_and_fused_projections(self, klein):
        assert "9 flux2 LoRA modules (18 tensors, diffusers layout) -> kohya" in klein.report
        assert "every tensor mapped: 9 modules in, 5 out (15 tensors); none dropped" in klein.report
        assert (
            "img_attn_qkv <-> transformer.transformer_blocks.<i>.attn.to_q + "
            "transformer.transformer_blocks.<i>.attn.to_k + "
            "transformer.transformer_blocks.<i>.attn.to_v (fused)" in klein.report
        )
        assert "note:" not in klein.report  # diffusers reads every module of these
        tensors = load_file(klein.kohya)
        modules = {name.split(".", 1)[0] for name in tensors}
        assert modules == {
            "lora_unet_double_blocks_0_img_attn_qkv",
            "lora_unet_double_blocks_0_img_attn_proj",
            "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_double_blocks_0_txt_attn_proj",
            "lora_unet_single_blocks_0_linear1",
        }
        # q, k and v fused: ranks 4, 4 and 2 padded to 4 each, ups block-diagonal; the fused
        # alpha keeps q's scale 1.5, v's 2.5 being carried by its up.
        qkv = "lora_unet_double_blocks_0_img_attn_qkv"
        assert tensors[f"{qkv}.lora_down.weight"].shape == (12, WIDTH)
        up = tensors[f"{qkv}.lora_up.weight"]
        assert up.shape == (3 * WIDTH, 12)
        assert not up[:WIDTH, 4:].any() and not up[2 * WIDTH :, :8].any()
        assert not up[2 * WIDTH :, 10:].any()  # v's rank-2 block, padded
        assert tensors[f"{qkv}.alpha"].item() == 3 * ALPHA
        # The single block's fused projection is one diffusers module: 3 + 2 * 3 widths wide.
        linear1 = "lora_unet_single_blocks_0_linear1"
        assert tensors[f"{linear1}.lora_up.weight"].shape == (9 * WIDTH, 4)
        assert tensors[f"{linear1}.alpha"].item() == ALPHA

    def test_back_to_diffusers(self, klein, tmp_path):
        back = tmp_path / "back.safetensors"
        report = export(klein.kohya, "--to", "diffusers", "--out", back)
        assert "5 flux2 LoRA modules (15 tensors, kohya layout) -> diffusers" in report
        assert_same_deltas(back, klein.lora)
        pipe = Flux2KleinPipeline.from_pretrained(klein.model)
        pipe.set_progress_bar_config(disable=True)
        out = pipeline_outputs(pipe, {"original": klein.lora, "back": back}, klein_call)
        assert max_difference(out["back"], out["original"]) < TOLERANCE

    def test_every_module_diffusers_reads(self, tmp_path):
        # The MLPs, the single block's output, the embeddings and the final layer too.
        pipe = tiny_flux2_klein_pipeline()
        pipe.save_pretrained(tmp_path / "model")
        targets = [name for name in linear_modules(pipe.transformer) if name not in SKIPPED]
        add_random_lora(pipe.transformer, targets, seed=2)
        save_random_lora(Flux2KleinPipeline, {"transformer": pipe.transformer}, tmp_path)
        kohya = tmp_path / "kohya.safetensors"
        report = export(tmp_path, "--to", "kohya", "--out", kohya)
        assert f"{len(targets)} modules in, {len(targets) - 4} out" in report
        assert "single_blocks_<i>_linear2 <-> transformer.single_transformer_blocks" in report
        assert "img_mlp_0 <-> transformer.transformer_blocks.<i>.ff.linear_in" in report
        assert "note:" not in report

        pipe = Flux2KleinPipeline.from_pretrained(tmp_path / "model")
        pipe.set_progress_bar_config(disable=True)

        def call(pipe):
            return klein_call(pipe, references=1)

        out = pipeline_outputs(pipe, {"original": tmp_path, "kohya": kohya}, call)
        print(
            "FLUX.2 every module kohya vs original:", max_difference(out["kohya"], out["original"])
        )
        assert max_difference(out["kohya"], out["original"]) < TOLERANCE
        assert max_difference(out["original"], out["base"]) > 100 * TOLERANCE

    def test_every_module_of_dev_round_trips(self, tmp_path):
        # [dev]'s transformer adds the guidance embedding; the final norm's halves are (shift,
        # scale) in kohya's layout, (scale, shift) in diffusers'.
        transformer = tiny_flux2_transformer(3 * MISTRAL_DIM, guidance_embeds=True)
        add_random_lora(transformer, linear_modules(transformer), seed=3, **OTHER_RANK)
        save_random_lora(Flux2Pipeline, {"transformer": transformer}, tmp_path)
        kohya = tmp_path / "kohya.safetensors"
        report = export(tmp_path, "--to", "kohya", "--out", kohya)
        assert (
            "note: ComfyUI and kohya load every module; diffusers' kohya flux2 reader (0.42) "
            "skips lora_unet_double_stream_modulation_img_lin, "
            "lora_unet_double_stream_modulation_txt_lin, lora_unet_final_layer_adaLN_modulation_1, "
            "lora_unet_guidance_in_in_layer, lora_unet_guidance_in_out_layer, "
            "lora_unet_single_stream_modulation_lin"
        ) in report.splitlines()
        tensors = load_file(kohya)
        original = load_file(tmp_path / "pytorch_lora_weights.safetensors")
        scale, shift = original["transformer.norm_out.linear.lora_B.weight"].chunk(2)
        kohya_up = tensors["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
        assert torch.equal(kohya_up, torch.cat([shift, scale]))
        back = tmp_path / "back.safetensors"
        export(kohya, "--to", "diffusers", "--out", back)
        assert_same_deltas(back, tmp_path)


def kohya_lora(path, modules: dict[str, tuple[int, int]]):
    """A kohya file of ``modules`` (name -> ``(out, in)``) with rank-2 random pairs, read."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out_features, in_features) in modules.items():
        down, up = (
            torch.randn(2, in_features, generator=g),
            torch.randn(out_features, 2, generator=g),
        )
        tensors |= kohya_module(name, LoraPair(down, up, 2.0))
    save_file(tensors, path)
    return read_lora(path)


class TestFamily:
    def test_the_exported_and_the_trained_files_are_flux2(self, klein):
        for path in (klein.lora, klein.kohya):
            assert families_of_modules(read_lora(path)) == ["flux2"], path
            assert detect_family(read_lora(path)) == "flux2", path

    def test_flux1_files_are_flux(self, tmp_path):
        pipe = tiny_flux_kontext_pipeline()
        add_random_lora(pipe.transformer, list(FLUX_LORA_LAYERS), seed=4)
        save_random_lora(FluxKontextPipeline, {"transformer": pipe.transformer}, tmp_path)
        kohya = tmp_path / "kohya.safetensors"
        export(tmp_path, "--to", "kohya", "--out", kohya)
        for path in (tmp_path, kohya):
            assert families_of_modules(read_lora(path)) == ["flux"], path
            assert detect_family(read_lora(path)) == "flux", path

    @pytest.mark.parametrize(
        "name,shape,family",
        [
            # Names FLUX.1 and FLUX.2 share, told apart by their widths (out, in).
            ("single_blocks_0_linear1", (7 * WIDTH, WIDTH), "flux"),
            ("single_blocks_0_linear1", (9 * WIDTH, WIDTH), "flux2"),
            ("single_blocks_0_linear2", (WIDTH, 5 * WIDTH), "flux"),
            ("single_blocks_0_linear2", (WIDTH, 4 * WIDTH), "flux2"),
            ("double_blocks_0_img_mlp_0", (4 * WIDTH, WIDTH), "flux"),
            ("double_blocks_0_txt_mlp_0", (6 * WIDTH, WIDTH), "flux2"),
            ("double_blocks_0_txt_mlp_2", (WIDTH, 4 * WIDTH), "flux"),
            ("double_blocks_0_img_mlp_2", (WIDTH, 3 * WIDTH), "flux2"),
            # Names only one of them has.
            ("double_blocks_0_img_mod_lin", (6 * WIDTH, WIDTH), "flux"),
            ("vector_in_in_layer", (WIDTH, 768), "flux"),
            ("double_stream_modulation_img_lin", (6 * WIDTH, WIDTH), "flux2"),
            ("single_stream_modulation_lin", (3 * WIDTH, WIDTH), "flux2"),
        ],
    )
    def test_a_kohya_file_by_names_and_widths(self, tmp_path, name, shape, family):
        # Beside a double block's attention, which both name alike.
        lora = kohya_lora(
            tmp_path / "lora.safetensors",
            {"lora_unet_double_blocks_0_img_attn_proj": (WIDTH, WIDTH), f"lora_unet_{name}": shape},
        )
        assert families_of_modules(lora) == [family]
        assert detect_family(lora) == family

    def test_double_blocks_attention_alone_needs_a_hint(self, tmp_path, klein):
        path = tmp_path / "pytorch_lora_weights.safetensors"
        lora = kohya_lora(path, {"lora_unet_double_blocks_0_img_attn_qkv": (3 * WIDTH, WIDTH)})
        assert families_of_modules(lora) == ["flux", "flux2"]
        with pytest.raises(ValueError, match=r"\(it has flux and flux2 names\); pass --family"):
            detect_family(lora)
        assert detect_family(lora, model=klein.model) == "flux2"
        # train_flux2_edit_lora.py's model card tags the run flux2.
        (tmp_path / "README.md").write_text("---\ntags:\n- lora\n- flux2\n---\ncard\n")
        assert detect_family(lora) == "flux2"
