"""scripts/infer.py end to end on the tiny pipelines (32 px, FLUX.2's 64 px, 2 steps): what it
saves, checked against the family's pipeline run directly with and without the LoRA."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    Flux2KleinPipeline,
    FluxFillPipeline,
    FluxKontextPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    StableDiffusionInpaintPipeline,
)
from lora_helpers import (
    DOUBLE_BLOCK_LAYERS,
    PROMPT,
    add_random_lora,
    sample_image,
    sample_mask,
    save_random_lora,
)
from PIL import Image
from safetensors.torch import save_file
from script_refusals import refusal

from data.images import DataError
from data.synthetic import write_inpainting_dataset, write_kontext_dataset
from scripts import export_lora, infer
from training.inference import FAMILIES, check_lora_fits, load_examples
from training.inputs.flux import FLUX_LORA_LAYERS
from training.inputs.flux2 import FLUX2_LORA_LAYERS
from training.lora.adapters import LoraFormat
from worlds.tiny_flux2 import tiny_flux2_klein_pipeline
from worlds.tiny_models import (
    tiny_flux_fill_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_qwen_image_edit_pipeline,
    tiny_qwen_image_edit_plus_pipeline,
    tiny_sd15_inpaint_pipeline,
)

SIZE = 32
FLUX2_SIZE = 64  # the FLUX.2 pipelines take no smaller reference
STEPS = 2


def run_infer(*argv) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        infer.main([str(arg) for arg in argv])
    return printed.getvalue()


def saved(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / f"{name}.png"))


def direct(pipe_cls, model: Path, lora: Path, family: str, examples, scale: float, **call) -> dict:
    """Each example through ``pipe_cls`` as a user would call it, with the ``call`` arguments:
    ``{name: (base, lora)}``."""
    pipe = pipe_cls.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    def outputs() -> dict[str, np.ndarray]:
        return {
            example.name: np.asarray(
                pipe(
                    **FAMILIES[family].call_arguments(example),
                    num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(0),
                    **call,
                ).images[0]
            )
            for example in examples
        }

    base = outputs()
    pipe.load_lora_weights(lora, adapter_name="direct")
    pipe.set_adapters("direct", scale)
    adapted = outputs()
    return {name: (base[name], adapted[name]) for name in base}


def assert_saved_as_direct(out: Path, expected: dict, columns: int, size: int = SIZE) -> None:
    for name, (base, adapted) in expected.items():
        assert np.array_equal(saved(out, f"{name}_base"), base), name
        assert np.array_equal(saved(out, f"{name}_lora"), adapted), name
        assert np.abs(base.astype(int) - adapted.astype(int)).max() > 0, name
    grid = Image.open(out / "grid.png")
    assert grid.size == (columns * size, 14 + len(expected) * size)


class TestInfer:
    def test_kontext_on_a_training_folder(self, tmp_path):
        pipe = tiny_flux_kontext_pipeline()
        pipe.save_pretrained(tmp_path / "model")
        add_random_lora(pipe.transformer, DOUBLE_BLOCK_LAYERS, seed=0)
        lora = save_random_lora(FluxKontextPipeline, {"transformer": pipe.transformer}, tmp_path)
        write_kontext_dataset(tmp_path / "data", n=2, resolution=SIZE, seed=0)
        out = tmp_path / "inference"
        args = ["--family", "kontext", "--model", tmp_path / "model", "--lora", tmp_path]
        args += ["--input", tmp_path / "data", "--output_dir", out, "--resolution", SIZE]
        printed = run_infer(*args, "--num_inference_steps", STEPS, "--lora_scale", 0.8)
        assert f"2 example(s) without and with the LoRA in {out}" in printed
        examples = load_examples(FAMILIES["kontext"], [tmp_path / "data"], resolution=SIZE)
        assert [e.image.size for e in examples] == [(SIZE, SIZE)] * 2
        expected = direct(FluxKontextPipeline, tmp_path / "model", lora, "kontext", examples, 0.8)
        assert_saved_as_direct(out, expected, columns=3)

    def test_flux_fill_on_a_training_folder(self, tmp_path):
        pipe = tiny_flux_fill_pipeline()
        pipe.save_pretrained(tmp_path / "model")
        add_random_lora(pipe.transformer, list(FLUX_LORA_LAYERS), seed=1)
        lora = save_random_lora(FluxFillPipeline, {"transformer": pipe.transformer}, tmp_path)
        write_inpainting_dataset(tmp_path / "data", n=1, resolution=SIZE, seed=0)
        out = tmp_path / "inference"
        args = ["--family", "flux-fill", "--model", tmp_path / "model", "--lora", lora]
        args += ["--input", tmp_path / "data", "--output_dir", out, "--resolution", SIZE]
        run_infer(*args, "--num_inference_steps", STEPS, "--prompt", PROMPT)
        examples = load_examples(
            FAMILIES["flux-fill"], [tmp_path / "data"], prompts=[PROMPT], resolution=SIZE
        )
        assert examples[0].prompt == PROMPT and set(np.unique(examples[0].mask)) == {0, 255}
        expected = direct(FluxFillPipeline, tmp_path / "model", lora, "flux-fill", examples, 1.0)
        assert_saved_as_direct(out, expected, columns=4)

    def test_sd15_on_files_with_a_kohya_lora(self, tmp_path):
        pipe = tiny_sd15_inpaint_pipeline()
        pipe.save_pretrained(tmp_path / "model")
        add_random_lora(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], seed=2)
        add_random_lora(pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], seed=3)
        models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        save_random_lora(StableDiffusionInpaintPipeline, models, tmp_path / "lora")
        kohya = tmp_path / "kohya.safetensors"
        with contextlib.redirect_stdout(io.StringIO()):
            export_lora.main([str(tmp_path / "lora"), "--to", "kohya", "--out", str(kohya)])
        sample_image(size=SIZE + 8).save(tmp_path / "room.png")  # cropped to 32 x 32
        sample_mask(size=SIZE + 8).save(tmp_path / "room_mask.png")
        out = tmp_path / "inference"
        args = ["--family", "sd15-inpaint", "--model", tmp_path / "model", "--lora", kohya]
        args += ["--input", tmp_path / "room.png", "--mask", tmp_path / "room_mask.png"]
        run_infer(*args, "--prompt", PROMPT, "--output_dir", out, "--num_inference_steps", STEPS)
        examples = load_examples(
            FAMILIES["sd15-inpaint"],
            [tmp_path / "room.png"],
            [tmp_path / "room_mask.png"],
            [PROMPT],
        )
        assert examples[0].name == "000_room" and examples[0].image.size == (SIZE, SIZE)
        expected = direct(
            StableDiffusionInpaintPipeline, tmp_path / "model", kohya, "sd15-inpaint", examples, 1
        )
        assert_saved_as_direct(out, expected, columns=4)

    def test_qwen_image_edit_on_a_file(self, tmp_path):
        # The tiny edit pipeline encodes its condition at 1024x1024 (seconds a call on a CPU):
        # one example, checked against itself rather than a second direct run.
        pipe = tiny_qwen_image_edit_pipeline()
        pipe.save_pretrained(tmp_path / "model")
        add_random_lora(pipe.transformer, ["attn.to_q", "attn.to_k", "attn.to_v"], seed=4)
        save_random_lora(QwenImageEditPipeline, {"transformer": pipe.transformer}, tmp_path)
        sample_image().save(tmp_path / "sign.png")
        out = tmp_path / "inference"
        args = ["--family", "qwen-edit", "--model", tmp_path / "model", "--lora", tmp_path]
        args += ["--input", tmp_path / "sign.png", "--prompt", 'write "OPEN" on the sign']
        run_infer(*args, "--output_dir", out, "--num_inference_steps", STEPS)
        base, adapted = saved(out, "000_sign_base"), saved(out, "000_sign_lora")
        assert base.shape == adapted.shape == (SIZE, SIZE, 3)
        assert np.abs(base.astype(int) - adapted.astype(int)).max() > 0
        assert Image.open(out / "grid.png").size == (3 * SIZE, 14 + SIZE)

    def test_flux2_klein_on_a_file_with_a_kohya_lora(self, tmp_path):
        pipe = tiny_flux2_klein_pipeline()
        pipe.save_pretrained(tmp_path / "model")
        add_random_lora(pipe.transformer, list(FLUX2_LORA_LAYERS), seed=6)
        save_random_lora(Flux2KleinPipeline, {"transformer": pipe.transformer}, tmp_path / "lora")
        kohya = tmp_path / "kohya.safetensors"
        with contextlib.redirect_stdout(io.StringIO()):
            export_lora.main([str(tmp_path / "lora"), "--to", "kohya", "--out", str(kohya)])
        sample_image(size=FLUX2_SIZE).save(tmp_path / "shelf.png")
        out = tmp_path / "inference"
        args = ["--family", "flux2", "--model", tmp_path / "model", "--lora", kohya]
        args += ["--input", tmp_path / "shelf.png", "--prompt", PROMPT, "--output_dir", out]
        # Without classifier-free guidance: one transformer pass a step on the CPU.
        run_infer(*args, "--num_inference_steps", STEPS, "--guidance_scale", 1.0)
        examples = load_examples(FAMILIES["flux2"], [tmp_path / "shelf.png"], prompts=[PROMPT])
        assert examples[0].image.size == (FLUX2_SIZE, FLUX2_SIZE)
        expected = direct(
            Flux2KleinPipeline, tmp_path / "model", kohya, "flux2", examples, 1, guidance_scale=1.0
        )
        assert_saved_as_direct(out, expected, columns=3, size=FLUX2_SIZE)


class TestSeveralReferences:
    @staticmethod
    def folder(root: Path) -> Path:
        """One edit with two references, the second 24x40 (W x H), in a metadata.jsonl folder."""
        data = root / "data"
        data.mkdir()
        sample_image().save(data / "person.png")
        sample_image(size=40).crop((0, 0, 24, 40)).save(data / "product.png")
        row = {"context": ["person.png", "product.png"], "prompt": "she holds it"}
        (data / "metadata.jsonl").write_text(json.dumps(row))
        return data

    def test_the_plus_pipeline_gets_every_reference(self, tmp_path):
        pipe = tiny_qwen_image_edit_plus_pipeline()
        pipe.save_pretrained(tmp_path / "model")
        add_random_lora(pipe.transformer, ["attn.to_q", "attn.to_k", "attn.to_v"], seed=5)
        save_random_lora(QwenImageEditPlusPipeline, {"transformer": pipe.transformer}, tmp_path)
        data = self.folder(tmp_path)
        out = tmp_path / "inference"
        args = ["--family", "qwen-edit", "--model", tmp_path / "model", "--lora", tmp_path]
        run_infer(*args, "--input", data, "--output_dir", out, "--num_inference_steps", STEPS)
        (example,) = load_examples(FAMILIES["qwen-edit"], [data])
        assert [image.size for image in example.references] == [(24, 40)]
        arguments = FAMILIES["qwen-edit"].call_arguments(example)
        assert [image.size for image in arguments["image"]] == [(SIZE, SIZE), (24, 40)]
        base, adapted = saved(out, "000_person_base"), saved(out, "000_person_lora")
        assert np.abs(base.astype(int) - adapted.astype(int)).max() > 0

    def test_flux2_gets_every_reference(self, tmp_path):
        pipe = tiny_flux2_klein_pipeline(is_distilled=True)
        pipe.save_pretrained(tmp_path / "model")
        add_random_lora(pipe.transformer, list(FLUX2_LORA_LAYERS), seed=7)
        save_random_lora(Flux2KleinPipeline, {"transformer": pipe.transformer}, tmp_path)
        data = tmp_path / "data"
        data.mkdir()
        sample_image(size=FLUX2_SIZE).save(data / "person.png")
        sample_image(1, size=96).crop((0, 0, 64, 96)).save(data / "product.png")
        row = {"context": ["person.png", "product.png"], "prompt": "she holds it"}
        (data / "metadata.jsonl").write_text(json.dumps(row))
        out = tmp_path / "inference"
        args = ["--family", "flux2", "--model", tmp_path / "model", "--lora", tmp_path]
        run_infer(*args, "--input", data, "--output_dir", out, "--num_inference_steps", STEPS)
        (example,) = load_examples(FAMILIES["flux2"], [data])
        arguments = FAMILIES["flux2"].call_arguments(example)
        assert [image.size for image in arguments["image"]] == [(64, 64), (64, 96)]
        base, adapted = saved(out, "000_person_base"), saved(out, "000_person_lora")
        assert base.shape == adapted.shape == (FLUX2_SIZE, FLUX2_SIZE, 3)
        assert np.abs(base.astype(int) - adapted.astype(int)).max() > 0

    def test_a_pipeline_that_reads_one_refuses_before_loading(self, tmp_path, capsys):
        tiny_qwen_image_edit_pipeline().save_pretrained(tmp_path / "model")
        for weights in (tmp_path / "model" / "transformer").glob("*.safetensors"):
            weights.write_bytes(b"not weights")  # loading would fail on them
        args = ["--family", "qwen-edit", "--model", tmp_path / "model", "--lora", tmp_path]
        with pytest.raises(SystemExit):
            run_infer(*args, "--input", self.folder(tmp_path), "--output_dir", tmp_path / "out")
        error = capsys.readouterr().err
        assert "000_person: several reference images; QwenImageEditPipeline reads one" in error


class TestInputs:
    def test_mismatched_inputs_are_refused_by_name(self, tmp_path):
        sample_image().save(tmp_path / "a.png")
        sample_mask(size=SIZE * 2).save(tmp_path / "big_mask.png")
        fill = FAMILIES["flux-fill"]
        with pytest.raises(DataError, match="need one --mask each"):
            load_examples(fill, [tmp_path / "a.png"], prompts=["x"])
        with pytest.raises(DataError, match=r"big_mask\.png.*size differs"):
            load_examples(fill, [tmp_path / "a.png"], [tmp_path / "big_mask.png"], ["x"])
        with pytest.raises(DataError, match="takes no mask"):
            load_examples(FAMILIES["kontext"], [tmp_path / "a.png"], [tmp_path / "a.png"], ["x"])
        with pytest.raises(DataError, match="need --prompt"):
            load_examples(FAMILIES["kontext"], [tmp_path / "a.png"])
        with pytest.raises(DataError, match=r"metadata\.jsonl"):
            load_examples(fill, [tmp_path])

    def test_a_model_of_another_family_is_refused(self, tmp_path, capsys):
        tiny_sd15_inpaint_pipeline().save_pretrained(tmp_path / "model")
        sample_image().save(tmp_path / "a.png")
        args = ["--family", "kontext", "--model", tmp_path / "model", "--lora", tmp_path]
        with pytest.raises(SystemExit) as stopped:
            run_infer(*args, "--input", tmp_path / "a.png", "--prompt", "x")
        assert stopped.value.code == 2
        message = capsys.readouterr().err
        assert "holds a StableDiffusionInpaintPipeline; --family kontext runs" in message

    def test_help_documents_every_flag(self, capsys):
        with pytest.raises(SystemExit):
            infer.main(["--help"])
        text = capsys.readouterr().out
        words = " ".join(text.split())
        for action in infer.build_parser()._actions:
            assert all(flag in text for flag in action.option_strings)
            assert action.help and " ".join(action.help.split()) in words, action.dest


class TestLoraThatDoesNotFit:
    def test_another_familys_lora_is_refused_before_running(self, tmp_path):
        flux = tiny_flux_kontext_pipeline()
        add_random_lora(flux.transformer, list(FLUX_LORA_LAYERS), seed=0)
        lora = save_random_lora(FluxKontextPipeline, {"transformer": flux.transformer}, tmp_path)
        with pytest.raises(ValueError, match=r"is a flux LoRA .*StableDiffusionInpaintPipeline"):
            check_lora_fits(tiny_sd15_inpaint_pipeline(), lora)
        check_lora_fits(tiny_flux_fill_pipeline(), lora)  # same family: loads
        with pytest.raises(ValueError, match=r"is a flux LoRA .*Flux2KleinPipeline is a flux2"):
            check_lora_fits(tiny_flux2_klein_pipeline(), lora)

    def test_a_damaged_file_is_named(self, tmp_path):
        damaged = tmp_path / "lora.safetensors"
        damaged.write_bytes(b"\x00" * 64)
        with pytest.raises(ValueError, match=r"lora\.safetensors': not a readable safetensors"):
            check_lora_fits(tiny_sd15_inpaint_pipeline(), damaged)
        with pytest.raises(ValueError, match=r"lora\.safetensors': not a readable safetensors"):
            LoraFormat(StableDiffusionInpaintPipeline, "unet").read(damaged)


def kohya_pair(name: str, down: tuple[int, ...], up: tuple[int, ...]) -> dict:
    """One module of a kohya file: random ``lora_down`` and ``lora_up`` weights, alpha 1."""
    g = torch.Generator().manual_seed(0)
    return {
        f"{name}.lora_down.weight": torch.randn(down, generator=g),
        f"{name}.lora_up.weight": torch.randn(up, generator=g),
        f"{name}.alpha": torch.tensor(1.0),
    }


class TestLoraDiffusersCannotRead:
    """Kohya FLUX files that diffusers' own converter (``_convert_kohya_flux_lora_to_diffusers``)
    stops on, loaded by the real loader: one line naming the file and what is wrong, exit 2."""

    @pytest.fixture
    def kontext(self, tmp_path):
        tiny_flux_kontext_pipeline().save_pretrained(tmp_path / "model")
        sample_image().save(tmp_path / "a.png")
        return tmp_path

    def infer_args(self, root: Path, lora: Path) -> list:
        args = ["--family", "kontext", "--model", root / "model", "--lora", lora]
        args += ["--input", root / "a.png", "--prompt", PROMPT, "--output_dir", root / "out"]
        return [*args, "--num_inference_steps", 1]

    def test_a_bare_assert_of_diffusers_ends_in_one_line(self, kontext):
        # A single block's linear1 (q, k, v and the MLP input fused) at this transformer's width:
        # diffusers splits it at FLUX.1's widths only, and asserts without a message.
        lora = kontext / "linear1.safetensors"
        save_file(kohya_pair("lora_unet_single_blocks_0_linear1", (4, 32), (7 * 32, 4)), lora)
        message = refusal("infer.py", *self.infer_args(kontext, lora))
        assert message.startswith(
            f"{lora}: its keys are not a LoRA of flux that diffusers can read (AssertionError in "
        )
        assert message.endswith(
            f"; scripts/export_lora.py {lora} --to diffusers --out FILE writes a copy it reads"
        )
        assert not (kontext / "out").exists()

        # What the message says to do works: the suite's own mapping reads the file.
        converted = kontext / "converted.safetensors"
        with contextlib.redirect_stdout(io.StringIO()):
            export_lora.main([str(lora), "--to", "diffusers", "--out", str(converted)])
        printed = run_infer(*self.infer_args(kontext, converted))
        assert "1 example(s) without and with the LoRA" in printed

    def test_a_key_no_flux_module_has_is_named(self, kontext, capsys):
        # diffusers lists the keys it cannot place in a multi-line ValueError.
        lora = kontext / "bogus.safetensors"
        tensors = kohya_pair("lora_unet_double_blocks_0_img_attn_proj", (2, 32), (32, 2))
        tensors |= kohya_pair("lora_unet_double_blocks_0_img_bogus", (2, 32), (32, 2))
        save_file(tensors, lora)
        with pytest.raises(SystemExit) as stopped:
            run_infer(*self.infer_args(kontext, lora))
        assert stopped.value.code == 2
        error = capsys.readouterr().err.rstrip("\n").rsplit("\n", 1)[-1]
        assert error.endswith(
            f": error: {lora}: its keys are not a LoRA of flux that diffusers can read (cannot "
            "place these kohya modules: lora_unet_double_blocks_0_img_bogus is no FLUX module "
            "in kohya's layout)"
        )
