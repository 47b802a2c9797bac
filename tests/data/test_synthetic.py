"""The synthetic Kontext insertion set and the script that writes it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.edit_pairs import EditPairDataset
from data.synthetic import (
    OBJECT_COLOURS,
    PLACEHOLDER_GREY,
    example_size,
    make_kontext_example,
    write_kontext_dataset,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_synthetic_data.py"


def read_rows(root):
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def pixels(root, relative):
    return np.asarray(Image.open(root / relative))


@pytest.fixture(scope="module")
def kontext_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext")
    write_kontext_dataset(root, n=7, resolution=128, seed=3)
    return root


def test_writes_n_rows_the_dataset_loads(kontext_set):
    rows = read_rows(kontext_set)
    assert len(rows) == 7
    dataset = EditPairDataset.from_folder(kontext_set, resolution=128)
    assert len(dataset) == 7
    assert len(set(dataset.bucket_of_items)) == 3  # square, landscape and portrait buckets


def test_sizes_cycle_through_aspects(kontext_set):
    assert [example_size(i, 128) for i in range(3)] == [(128, 128), (128, 160), (160, 128)]
    for index, row in enumerate(read_rows(kontext_set)):
        for field in ("context", "target", "mask"):
            assert pixels(kontext_set, row[field]).shape[:2] == example_size(index, 128)


def test_target_differs_from_context_exactly_inside_the_mask(kontext_set):
    for row in read_rows(kontext_set):
        mask = pixels(kontext_set, row["mask"])
        assert set(np.unique(mask).tolist()) == {0, 255}
        inside = mask == 255
        changed = (pixels(kontext_set, row["context"]) != pixels(kontext_set, row["target"])).any(
            axis=-1
        )
        assert np.array_equal(changed, inside)


def test_region_size_and_prompt(kontext_set):
    colours = "|".join(OBJECT_COLOURS)
    for row in read_rows(kontext_set):
        inside = pixels(kontext_set, row["mask"]) == 255
        rows, cols = np.nonzero(inside)
        height, width = inside.shape
        assert 0.2 * height - 1 <= rows.max() - rows.min() + 1 <= 0.45 * height + 1
        assert 0.2 * width - 1 <= cols.max() - cols.min() + 1 <= 0.45 * width + 1
        match = re.fullmatch(rf"insert an? ({colours}) (ball|box)", row["prompt"])
        assert match is not None, row["prompt"]
        box_fill = inside.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
        # A box fills its bounding box; a ball (ellipse) about pi/4 of it.
        assert box_fill == 1.0 if match[2] == "box" else 0.7 < box_fill < 0.85
        colour = np.asarray(OBJECT_COLOURS[match[1]])
        target = pixels(kontext_set, row["target"])[inside].astype(float)
        ratios = target / colour
        assert ratios.min() >= 0.69 and ratios.max() <= 1.01


def test_deterministic_for_a_seed(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_kontext_dataset(tmp_path / name, n=3, resolution=64, seed=seed)

    def content(name):
        return [(tmp_path / name / path).read_bytes() for path in sorted_files(tmp_path / name)]

    assert content("a") == content("b")
    assert content("a") != content("c")


def sorted_files(root):
    return sorted(path.relative_to(root) for path in root.rglob("*") if path.is_file())


def test_refuses_to_overwrite(kontext_set):
    before = (kontext_set / "metadata.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match=r"metadata\.jsonl"):
        write_kontext_dataset(kontext_set, n=2)
    assert (kontext_set / "metadata.jsonl").read_bytes() == before


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        write_kontext_dataset(tmp_path, resolution=100)
    with pytest.raises(ValueError, match="n must be"):
        write_kontext_dataset(tmp_path, n=0)


def run_script(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def test_script_cli(tmp_path):
    out = tmp_path / "set"
    result = run_script("--family", "kontext", "--out", str(out), "--n", "4", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert len(read_rows(out)) == 4
    write_kontext_dataset(tmp_path / "same", n=4, seed=3)
    assert (out / "images/0003_target.png").read_bytes() == (
        tmp_path / "same/images/0003_target.png"
    ).read_bytes()
    refused = run_script("--family", "sdxl", "--out", str(tmp_path / "other"))
    assert refused.returncode != 0 and "kontext" in refused.stderr


def test_script_help():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--family", "--out", "--n", "--resolution", "--seed"):
        assert flag in result.stdout


def test_placeholder_marks_the_mask_and_changes_nothing_else():
    plain = make_kontext_example(np.random.default_rng(3), 32, 40)
    marked = make_kontext_example(np.random.default_rng(3), 32, 40, placeholder=True)
    inside = np.asarray(marked.mask) > 0
    context, plain_context = np.asarray(marked.context), np.asarray(plain.context)
    assert (context[inside] == PLACEHOLDER_GREY).all()
    assert (context[~inside] == plain_context[~inside]).all()
    assert np.array_equal(np.asarray(marked.target), np.asarray(plain.target))
    assert marked.prompt == plain.prompt
    # Every object colour still differs from the placeholder on every mask pixel.
    difference = np.abs(np.asarray(marked.target, float) - context).max(axis=-1)
    assert difference[inside].min() > 100


def test_colour_override_recolours_only_the_object():
    drawn = make_kontext_example(np.random.default_rng(5), 32, 32)
    blue = make_kontext_example(np.random.default_rng(5), 32, 32, colour="blue")
    inside = np.asarray(blue.mask) > 0
    assert np.array_equal(np.asarray(blue.context), np.asarray(drawn.context))
    assert np.array_equal(np.asarray(blue.mask), np.asarray(drawn.mask))
    target = np.asarray(blue.target, float)
    assert (target[~inside] == np.asarray(drawn.target, float)[~inside]).all()
    # Stripes scale the colour by 0.7-1.0, so each object pixel is a multiple of pure blue.
    ratio = target[inside] / np.asarray(OBJECT_COLOURS["blue"], float)
    assert ratio.min() >= 0.69 and ratio.max() <= 1.01
    assert np.allclose(ratio, ratio[:, :1], atol=0.02)
    assert blue.prompt.startswith("insert a blue ")
