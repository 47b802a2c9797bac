"""scripts/export_lora.py: kohya's layout checked by a reader we did not write (diffusers' own
``load_lora_weights``), the way back to diffusers' layout, refusals, and merging.

Each LoRA has random non-zero weights and scale alpha / r = 1.5, so a dropped alpha, a wrong
split of a fused projection or a swapped block would change the outputs compared here.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from lora_helpers import (
    ALPHA,
    DOUBLE_BLOCK_LAYERS,
    PROMPT,
    SIZE,
    add_random_lora,
    max_difference,
    pipeline_outputs,
    sample_image,
    sample_mask,
    save_random_lora,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from script_refusals import refusal
from transformers import CLIPTextModel

from scripts import export_lora
from training.inputs.flux import FLUX_LORA_LAYERS
from training.lora.export import convert, detect_family, read_lora
from training.lora.layouts import LAYOUTS, LayoutError, LoraPair, fuse, split
from training.lora.merge import merge_lora
from worlds.tiny_models import (
    tiny_flux_kontext_pipeline,
    tiny_qwen_image_edit_pipeline,
    tiny_sd15_inpaint_pipeline,
)

# diffusers' kohya FLUX reader splits single blocks' linear1 at FLUX.1's widths (3072 x 3 +
# 12288), so at tiny width only the double blocks go through it; TestFluxAtRealWidth covers
# the single blocks at FLUX.1's width.
TOLERANCE = 1e-5


def export(*argv) -> str:
    """scripts/export_lora.py in this process; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export_lora.main([str(arg) for arg in argv])
    return printed.getvalue()


def generator():
    return torch.Generator().manual_seed(0)


def kohya_module(name: str, pair: LoraPair) -> dict[str, torch.Tensor]:
    """``pair`` as kohya's tensors of the module ``name``."""
    return {
        f"{name}.lora_down.weight": pair.down,
        f"{name}.lora_up.weight": pair.up,
        f"{name}.alpha": torch.tensor(pair.alpha),
    }


def assert_round_trip(original, back) -> None:
    """The diffusers file written back holds the original's modules, alphas and tensors (fused
    parts of equal rank and alpha split back exactly)."""
    original, back = read_lora(original), read_lora(back)
    assert original.pairs.keys() == back.pairs.keys()
    for name, pair in original.pairs.items():
        again = back.pairs[name]
        assert again.alpha == pytest.approx(pair.alpha, rel=1e-6), name
        assert torch.equal(again.down, pair.down), name
        assert torch.equal(again.up, pair.up), name


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """A tiny Kontext pipeline folder and a LoRA on its double blocks' attention."""
    root = tmp_path_factory.mktemp("kontext")
    pipe = tiny_flux_kontext_pipeline()
    pipe.save_pretrained(root / "model")
    add_random_lora(pipe.transformer, DOUBLE_BLOCK_LAYERS, seed=1)
    save_random_lora(FluxKontextPipeline, {"transformer": pipe.transformer}, root / "lora")
    return root


def kontext_call(pipe):
    return pipe(
        image=sample_image(),
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        max_area=SIZE * SIZE,
        _auto_resize=False,
        num_inference_steps=2,
        generator=generator(),
        output_type="np",
    ).images


def sd15_call(pipe):
    return pipe(
        prompt=PROMPT,
        image=sample_image(),
        mask_image=sample_mask(),
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        generator=generator(),
        output_type="np",
    ).images


class TestKohyaExport:
    def test_flux_kontext(self, kontext, tmp_path):
        kohya = tmp_path / "kontext_kohya.safetensors"
        report = export(
            kontext / "lora", "--to", "kohya", "--out", kohya, "--model", kontext / "model"
        )
        assert "every tensor mapped: 8 modules in, 4 out (12 tensors); none dropped" in report
        assert "img_attn_qkv <-> transformer.transformer_blocks.<i>.attn.to_q + " in report
        tensors = load_file(kohya)
        name = "lora_unet_double_blocks_0_txt_attn_qkv"
        # Three rank-4 parts fused: rank 12 and alpha 18 keep each part's scale 1.5.
        assert tensors[f"{name}.lora_down.weight"].shape == (12, 32)
        assert tensors[f"{name}.lora_up.weight"].shape == (96, 12)
        assert tensors[f"{name}.alpha"].item() == 3 * ALPHA
        with safe_open(kohya, "pt") as file:  # no diffusers config that would rescale it
            assert "lora_adapter_metadata" not in file.metadata()

        pipe = FluxKontextPipeline.from_pretrained(kontext / "model")
        pipe.set_progress_bar_config(disable=True)
        out = pipeline_outputs(pipe, {"original": kontext / "lora", "kohya": kohya}, kontext_call)
        pipe.set_adapters("original", 1 / 1.5)  # what a reader ignoring alpha would give
        alpha_lost = kontext_call(pipe)
        print("FLUX Kontext kohya vs original:", max_difference(out["kohya"], out["original"]))
        assert max_difference(out["kohya"], out["original"]) < TOLERANCE
        assert max_difference(out["original"], out["base"]) > 100 * TOLERANCE
        assert max_difference(alpha_lost, out["original"]) > 100 * TOLERANCE

        # FLUX.2 has these kohya names too (double blocks' attention alone): the family is told.
        back = tmp_path / "back.safetensors"
        export(kohya, "--to", "diffusers", "--out", back, "--family", "flux")
        assert_round_trip(kontext / "lora", back)

    def test_in_bfloat16_half_the_size_with_exact_alphas(self, kontext, tmp_path):
        full, half = tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors"
        export(kontext / "lora", "--to", "kohya", "--out", full, "--model", kontext / "model")
        report = export(
            kontext / "lora",
            "--to",
            "kohya",
            "--out",
            half,
            "--model",
            kontext / "model",
            "--dtype",
            "bfloat16",
        )
        assert f"wrote {half} in bfloat16" in report
        wide, narrow = load_file(full), load_file(half)
        assert wide.keys() == narrow.keys()
        for name, tensor in wide.items():
            if name.endswith(".alpha"):  # scalars stay as written: alpha keeps its value
                assert narrow[name].dtype == torch.float32 and torch.equal(narrow[name], tensor)
            else:
                assert narrow[name].dtype == torch.bfloat16
                assert torch.equal(narrow[name], tensor.to(torch.bfloat16))
        with safe_open(half, "pt") as narrow_file, safe_open(full, "pt") as wide_file:
            assert narrow_file.metadata() == wide_file.metadata()
        weights = [t for n, t in wide.items() if not n.endswith(".alpha")]
        assert half.stat().st_size < 0.6 * full.stat().st_size and weights

    def test_qwen_image_edit(self, tmp_path):
        pipe = tiny_qwen_image_edit_pipeline()
        layers = [layer for layer in FLUX_LORA_LAYERS if layer != "attn.to_add_out"]
        add_random_lora(pipe.transformer, [*layers, "img_mlp.net.2"], seed=2)
        save_random_lora(QwenImageEditPipeline, {"transformer": pipe.transformer}, tmp_path)
        kohya = tmp_path / "qwen_kohya.safetensors"
        report = export(tmp_path, "--to", "kohya", "--out", kohya, "--family", "qwen-image")
        assert "8 modules in, 8 out (24 tensors)" in report
        tensors = load_file(kohya)
        assert tensors["lora_unet_transformer_blocks_0_attn_add_q_proj.alpha"].item() == ALPHA
        assert "lora_unet_transformer_blocks_0_img_mlp_net_2.lora_up.weight" in tensors

        # The tiny edit pipeline encodes its condition image at 1024x1024 (8 s a call on a CPU);
        # the LoRA acts on the transformer alone, so its output on one denoising step's inputs
        # is compared, after pipe.load_lora_weights as everywhere else.
        pipe.transformer.delete_adapters("default")
        g = generator()
        inputs = {
            "hidden_states": torch.randn(1, 8, 64, generator=g),  # 2x2 target + 2x2 condition
            "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
            "timestep": torch.tensor([0.6]),
            "img_shapes": [[(1, 2, 2), (1, 2, 2)]],
            "return_dict": False,
        }

        def call(pipe):
            with torch.no_grad():
                return pipe.transformer(**inputs)[0].numpy()

        out = pipeline_outputs(pipe, {"original": tmp_path, "kohya": kohya}, call)
        print("Qwen-Image-Edit kohya vs original:", max_difference(out["kohya"], out["original"]))
        assert max_difference(out["kohya"], out["original"]) < TOLERANCE
        assert max_difference(out["original"], out["base"]) > 100 * TOLERANCE

        back = tmp_path / "back.safetensors"
        export(kohya, "--to", "diffusers", "--out", back)
        assert_round_trip(tmp_path, back)

    def test_sd15_unet_and_text_encoder(self, tmp_path):
        pipe = tiny_sd15_inpaint_pipeline()
        pipe.save_pretrained(tmp_path / "model")
        add_random_lora(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], seed=3)
        add_random_lora(pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], seed=4)
        models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        save_random_lora(StableDiffusionInpaintPipeline, models, tmp_path / "lora")
        kohya = tmp_path / "sd15_kohya.safetensors"
        report = export(tmp_path / "lora", "--to", "kohya", "--out", kohya)
        assert "every tensor mapped: 36 modules in, 36 out (108 tensors); none dropped" in report
        tensors = load_file(kohya)
        te = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
        unet = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
        assert tensors[f"{te}.alpha"].item() == tensors[f"{unet}.alpha"].item() == ALPHA

        pipe = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "model")
        pipe.set_progress_bar_config(disable=True)
        out = pipeline_outputs(pipe, {"original": tmp_path / "lora", "kohya": kohya}, sd15_call)
        print("SD1.5 kohya vs original:", max_difference(out["kohya"], out["original"]))
        assert max_difference(out["kohya"], out["original"]) < TOLERANCE
        assert max_difference(out["original"], out["base"]) > 100 * TOLERANCE

        back = tmp_path / "back.safetensors"
        export(kohya, "--to", "diffusers", "--out", back)
        assert_round_trip(tmp_path / "lora", back)

    def test_a_flux_projection_trained_fused_back_to_diffusers(self, tmp_path):
        # kohya's sd-scripts train a single block's linear1 as one layer: a dense up, whose four
        # parts share its down (widths 1, 1, 1, 4 of 32 inputs: 224 rows).
        g = generator()
        name = "lora_unet_single_blocks_0_linear1"
        fused = LoraPair(torch.randn(4, 32, generator=g), torch.randn(224, 4, generator=g), 2.0)
        kohya = tmp_path / "kohya.safetensors"
        save_file(kohya_module(name, fused), kohya)
        back = tmp_path / "back.safetensors"
        export(kohya, "--to", "diffusers", "--out", back, "--family", "flux")
        parts = read_lora(back).pairs
        block = "transformer.single_transformer_blocks.0"
        names = [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v"]
        names.append(f"{block}.proj_mlp")
        assert sorted(parts) == sorted(names)
        stacked = torch.cat([parts[n].scale * parts[n].up @ parts[n].down for n in names])
        torch.testing.assert_close(stacked, fused.scale * fused.up @ fused.down)


SINGLE_BLOCK_LAYERS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "single_transformer_blocks.0.proj_out",
    "norm.linear",
]


class TestFluxAtRealWidth:
    """Single blocks' ``linear1`` (q, k, v and the MLP input fused) at FLUX.1's width, the only
    width diffusers' reader splits it at: a one-single-block transformer (180M weights)."""

    def test_single_block_linear1(self, tmp_path):
        # linear1's q, k, v (not the MLP part), linear2 and the modulation; a bare "proj_out"
        # would also adapt the top-level final layer, which diffusers' reader skips.
        with init_empty_weights():
            transformer = FluxTransformer2DModel(
                num_layers=0,
                num_single_layers=1,
                attention_head_dim=128,
                num_attention_heads=24,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                axes_dims_rope=(16, 56, 56),
            )
        transformer = transformer.to_empty(device="cpu")
        g = generator()
        with torch.no_grad():
            for param in transformer.parameters():
                param.normal_(0, 0.02, generator=g)
        # q and k at rank 4, v at rank 2 and another alpha, no MLP LoRA: the fused pair pads
        # ranks, rescales v's block and leaves the MLP's block zero.
        add_random_lora(
            transformer,
            SINGLE_BLOCK_LAYERS,
            seed=5,
            rank_pattern={"attn.to_v": 2},
            alpha_pattern={"attn.to_v": 5.0},
        )
        inputs = {
            "hidden_states": torch.randn(1, 4, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, 3, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g),
            "timestep": torch.tensor([0.6]),
            "img_ids": torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]).float(),
            "txt_ids": torch.zeros(3, 3),
            "return_dict": False,
        }
        with torch.no_grad():
            original = transformer(**inputs)[0]
        save_random_lora(FluxPipeline, {"transformer": transformer}, tmp_path)
        kohya = tmp_path / "kohya.safetensors"
        report = export(tmp_path, "--to", "kohya", "--out", kohya)
        assert "single_blocks_<i>_linear1 <-> transformer.single_transformer_blocks" in report
        tensors = load_file(kohya)
        assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 16)
        assert tensors["lora_unet_single_blocks_0_modulation_lin.alpha"].item() == ALPHA

        transformer.delete_adapters("default")
        empty = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2"))
        pipe = FluxPipeline(**empty, tokenizer_2=None, transformer=transformer)
        pipe.load_lora_weights(kohya)
        with torch.no_grad():
            exported = transformer(**inputs)[0]
            transformer.disable_lora()
            base = transformer(**inputs)[0]
        difference = max_difference(exported, original)
        print("FLUX single block (3072 wide) kohya vs original:", difference)
        # fp32 rounding of 3072-wide sums, relative to outputs of about 3
        assert difference < TOLERANCE * float(original.abs().max())
        assert max_difference(original, base) > 100 * TOLERANCE


class TestFusedProjections:
    def pair(self, rank, in_features, out_features, alpha, seed):
        g = torch.Generator().manual_seed(seed)
        down = torch.randn(rank, in_features, generator=g)
        return LoraPair(down, torch.randn(out_features, rank, generator=g), alpha)

    @staticmethod
    def delta(pair):
        return pair.scale * pair.up @ pair.down

    def test_fuse_stacks_the_parts_deltas_and_split_inverts_it(self):
        parts = [self.pair(4, 8, 8, 6.0, 0), None, self.pair(2, 8, 8, 1.0, 1)]
        fused = fuse(parts, (1, 1, 1))
        assert fused.rank == 12 and fused.alpha == pytest.approx(1.5 * 12)
        expected = torch.cat([self.delta(parts[0]), torch.zeros(8, 8), self.delta(parts[2])])
        torch.testing.assert_close(self.delta(fused), expected)
        again = split(fused, (1, 1, 1))
        assert again[1] is None and again[0].rank == 4 and again[2].rank == 2
        for part, back in zip(parts, again, strict=True):
            if part is not None:
                torch.testing.assert_close(self.delta(back), self.delta(part))

    def test_a_projection_trained_fused_splits_with_a_shared_down(self):
        whole = self.pair(4, 8, 8 * 3, 8.0, 2)  # a dense up: not block-diagonal
        parts = split(whole, (1, 1, 1))
        assert all(part.rank == 4 and torch.equal(part.down, whole.down) for part in parts)
        stacked = torch.cat([self.delta(part) for part in parts])
        torch.testing.assert_close(stacked, self.delta(whole))

    def test_widths_that_do_not_fit_are_refused(self):
        with pytest.raises(LayoutError, match="has 32 outputs here, not 24"):
            split(self.pair(4, 8, 24, 4.0, 3), (1, 1, 1, 1))


class TestRefusals:
    def write(self, path, tensors, metadata=None):
        save_file(tensors, path, metadata=metadata)
        return path

    def test_a_module_kohya_has_no_name_for(self, tmp_path, capsys):
        lora = {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(4, 2),
            "transformer.pos_embed.lora_A.weight": torch.ones(2, 4),
            "transformer.pos_embed.lora_B.weight": torch.ones(4, 2),
        }
        path = self.write(tmp_path / "lora.safetensors", lora)
        out = tmp_path / "kohya.safetensors"
        with pytest.raises(SystemExit) as stopped:
            export_lora.main([str(path), "--to", "kohya", "--out", str(out)])
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        assert f"error: {path}: kohya's FLUX layout has no name for: pos_embed" in error
        assert not out.exists()

    def test_flattened_names(self):
        pair = LoraPair(torch.ones(2, 4), torch.ones(4, 2), 2.0)
        # CLIP's modules with and without transformers 4's text_model. (kohya's names have it)
        te = "lora_te_text_model_encoder_layers_"
        expected = {
            "encoder.layers.0.self_attn.q_proj": f"{te}0_self_attn_q_proj",
            "text_model.encoder.layers.1.mlp.fc1": f"{te}1_mlp_fc1",
        }
        for module, kohya in expected.items():
            pairs, _ = LAYOUTS["sd15"].to_kohya({f"text_encoder.{module}": pair})
            assert list(pairs) == [kohya]
        with pytest.raises(LayoutError, match=r"cannot tell these modules apart.*my_proj"):
            LAYOUTS["sd15"].to_kohya({"unet.down_blocks.0.my_proj": pair})

    def test_tensors_outside_pairs(self, tmp_path):
        lora = {
            "unet.conv_in.lora_A.weight": torch.ones(2, 4),
            "unet.conv_in.lora_B.weight": torch.ones(4, 2),
            "unet.conv_in.lora_magnitude_vector": torch.ones(4),
            "unet.conv_out.lora_A.weight": torch.ones(2, 4),
        }
        with pytest.raises(LayoutError) as error:
            read_lora(self.write(tmp_path / "dora.safetensors", lora))
        message = str(error.value)
        assert "lora_magnitude_vector" in message and "unet.conv_out" in message

    def test_pickled_weights_are_never_read(self, tmp_path):
        path = tmp_path / "lora.bin"
        path.write_bytes(b"not read")
        with pytest.raises(ValueError, match=r"only \.safetensors"):
            read_lora(path)

    def test_the_family_of_an_attention_only_lora(self, tmp_path, kontext):
        lora = {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(4, 2),
        }
        path = self.write(tmp_path / "pytorch_lora_weights.safetensors", lora)
        with pytest.raises(ValueError, match="FLUX and Qwen-Image name attention alike"):
            detect_family(read_lora(path))
        assert detect_family(read_lora(path), model=kontext / "model") == "flux"
        mlp = {
            "transformer.transformer_blocks.0.img_mlp.net.2.lora_A.weight": torch.ones(2, 4),
            "transformer.transformer_blocks.0.img_mlp.net.2.lora_B.weight": torch.ones(4, 2),
        }
        assert detect_family(read_lora(self.write(tmp_path / "mlp.safetensors", mlp))) == (
            "qwen-image"
        )
        (tmp_path / "README.md").write_text("---\ntags:\n- lora\n- qwen-image\n---\ncard\n")
        assert detect_family(read_lora(path)) == "qwen-image"
        with pytest.raises(ValueError, match="already"):
            convert(read_lora(path), "diffusers", "qwen-image")

    def test_help_documents_every_flag(self, capsys):
        with pytest.raises(SystemExit):
            export_lora.main(["--help"])
        text = capsys.readouterr().out
        # argparse wraps lines at spaces and after hyphens, so compare without white space.
        letters = "".join(text.split())
        for action in export_lora.build_parser()._actions:
            assert all(flag in text for flag in action.option_strings)
            assert action.help and "".join(action.help.split()) in letters, action.dest


class TestMerge:
    def test_flux_from_the_kohya_file(self, kontext, tmp_path):
        kohya = tmp_path / "kohya.safetensors"
        export(kontext / "lora", "--to", "kohya", "--out", kohya, "--family", "flux")
        printed = export(
            kohya, "--merge", "--model", kontext / "model", "--out", tmp_path / "merged",
            "--scale", 0.7, "--max_shard_size", "100KB",
        )  # fmt: skip
        folder = tmp_path / "merged" / "transformer"
        assert f"merged transformer at scale 0.7: {folder}" in printed
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # sharded
        assert not any("lora" in name for name in index["weight_map"])
        merged = FluxTransformer2DModel.from_pretrained(folder)

        pipe = FluxKontextPipeline.from_pretrained(kontext / "model")
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(kontext / "lora", adapter_name="lora")
        pipe.set_adapters("lora", 0.7)
        adapter = kontext_call(pipe)
        pipe.transformer = merged
        difference = max_difference(kontext_call(pipe), adapter)
        print("FLUX merged (scale 0.7) vs adapter:", difference)
        assert difference < TOLERANCE

    def test_sd15_unet_and_text_encoder(self, tmp_path):
        pipe = tiny_sd15_inpaint_pipeline()
        pipe.save_pretrained(tmp_path / "model")
        add_random_lora(pipe.unet, ["to_q", "to_v", "ff.net.2"], seed=6)
        add_random_lora(pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], seed=7)
        models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        save_random_lora(StableDiffusionInpaintPipeline, models, tmp_path / "lora")
        export(tmp_path / "lora", "--merge", "--model", tmp_path / "model", "--out", tmp_path / "m")

        pipe = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "model")
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(tmp_path / "lora")
        adapter = sd15_call(pipe)
        merged = StableDiffusionInpaintPipeline.from_pretrained(
            tmp_path / "model",
            unet=UNet2DConditionModel.from_pretrained(tmp_path / "m" / "unet"),
            text_encoder=CLIPTextModel.from_pretrained(tmp_path / "m" / "text_encoder"),
        )
        merged.set_progress_bar_config(disable=True)
        difference = max_difference(sd15_call(merged), adapter)
        print("SD1.5 merged (UNet + text encoder) vs adapter:", difference)
        assert difference < TOLERANCE

    def test_never_over_the_base_model_or_files_already_there(self, kontext, tmp_path):
        base = kontext / "model"
        weights = {p: p.read_bytes() for p in (base / "transformer").iterdir() if p.is_file()}
        for out in (base, base / "transformer", kontext):
            with pytest.raises(ValueError, match="base model's folder"):
                merge_lora(kontext / "lora", base, out)
        taken = tmp_path / "taken"
        taken.mkdir()
        (taken / "notes.txt").write_text("mine")
        with pytest.raises(ValueError, match="already holds files"):
            merge_lora(kontext / "lora", base, taken)
        assert weights == {p: p.read_bytes() for p in weights}

    def test_a_lora_diffusers_cannot_load_ends_in_one_line(self, tmp_path):
        # SD2's transformer blocks take proj_in as a linear layer, SD1.5's as a 1x1 conv: an
        # SD2-shaped LoRA has SD1.5's module names and weights that do not fit them.
        tiny_sd15_inpaint_pipeline().save_pretrained(tmp_path / "model")
        g = generator()
        linear = LoraPair(torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 1.0)
        lora = tmp_path / "sd2.safetensors"
        save_file(kohya_module("lora_unet_down_blocks_0_attentions_0_proj_in", linear), lora)
        out = tmp_path / "merged"
        message = refusal(
            "export_lora.py", lora, "--merge", "--model", tmp_path / "model", "--out", out
        )
        assert message.startswith(
            f"{lora}: diffusers cannot load it into {tmp_path / 'model'} (RuntimeError in "
        )
        assert "size mismatch for down_blocks.0.attentions.0.proj_in.lora_A" in message
        assert message.endswith("Nothing was written.")
        assert not out.exists()

    def test_a_lora_of_another_model_family_is_refused(self, kontext, tmp_path):
        flux = tiny_flux_kontext_pipeline()
        add_random_lora(flux.transformer, list(FLUX_LORA_LAYERS), seed=2)
        lora = save_random_lora(FluxKontextPipeline, {"transformer": flux.transformer}, tmp_path)
        tiny_qwen_image_edit_pipeline().save_pretrained(tmp_path / "qwen")
        with pytest.raises(ValueError, match=r"is a flux LoRA .* is a qwen-image model"):
            merge_lora(lora, tmp_path / "qwen", tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
