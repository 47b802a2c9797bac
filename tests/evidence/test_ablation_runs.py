"""The ablation's configurations, the demo's loss curves and the PIL plots (no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from evidence.ablation import GEOMETRY_FLAGS, METRICS, ablation_configs
from evidence.ablation_runs import AblationPlan, earlier_runs, run_ablation, summary_table
from evidence.demo_report import weighted_terms
from evidence.plots import COLOURS, line_plot


def test_ablation_configs_switch_one_term_on_at_a_time():
    configs = ablation_configs()
    assert list(configs) == [
        "fm",
        "fm+mse",
        "fm+bg",
        "fm+dice",
        "fm+area",
        "fm+bnd",
        "starter",
        "starter+emb",
        "balanced",
        "balanced@int8",
        "balanced@bf16",
        "balanced@fp8",
    ]
    assert set(configs["fm"].values()) == {0.0}
    # Seed 001's weights, each alone.
    seed_weights = {"mse": 1.0, "bg": 0.6, "dice": 0.9, "area": 0.2, "bnd": 0.4}
    for name, flag in GEOMETRY_FLAGS.items():
        on = {key: value for key, value in configs[f"fm+{name}"].items() if value}
        assert on == {flag: seed_weights[name]}
    starter = {key: value for key, value in configs["starter"].items() if value}
    assert starter == {GEOMETRY_FLAGS[name]: value for name, value in seed_weights.items()}
    with_embeddings = {key: value for key, value in configs["starter+emb"].items() if value}
    assert with_embeddings == {**starter, "identity_weight": 1.0, "overlay_weight": 0.7}
    # The demo's balanced weights, every term on.
    assert configs["balanced"] == {
        "geometry_mse_weight": 0.3,
        "background_weight": 4.0,
        "dice_weight": 0.9,
        "area_weight": 1.0,
        "boundary_weight": 0.4,
        "identity_weight": 1.0,
        "geometry_match_weight": 0.02,
        "overlay_weight": 0.7,
    }
    # The same mix on a quantized base; fp8 beside its own bf16 reference.
    assert configs["balanced@int8"] == {**configs["balanced"], "quantize_base": "int8"}
    assert configs["balanced@bf16"] == {**configs["balanced"], "mixed_precision": "bf16"}
    assert configs["balanced@fp8"] == {**configs["balanced@bf16"], "quantize_base": "fp8"}


def test_earlier_runs_are_reused_only_with_the_same_settings(tmp_path):
    settings = {"world": {"seed": 0}, "steps": 4, "every": 2, "heldout_pairs": 2}
    runs = {"fm": {"0": {"0": {}, "4": {}}}}
    seconds = {"fm": {"0": 1.5}}
    assert earlier_runs(tmp_path, settings) == ({}, {})
    record = {"settings": settings, "results": runs, "train_seconds": seconds}
    (tmp_path / "results.json").write_text(json.dumps(record))
    assert earlier_runs(tmp_path, settings) == (runs, seconds)
    assert earlier_runs(tmp_path, {**settings, "steps": 8}) == ({}, {})
    assert earlier_runs(tmp_path, {**settings, "world": {"seed": 1}}) == ({}, {})


@pytest.mark.parametrize("noise_per_seed", [True, False])
def test_run_ablation_scores_the_base_once_per_noise_seed(tmp_path, noise_per_seed):
    # A plan of plain functions: "training" writes nothing, a score is lora's config and seed.
    calls = []

    def evaluate(lora, seed):
        calls.append((None if lora is None else lora.parent.name, seed))
        value = seed + (0 if lora is None else 10 * (lora.parent.parent.name == "b"))
        return {"m": float(value)}, [np.zeros((4, 4, 3), np.uint8)]

    plan = AblationPlan(
        configs={"a": {}, "b": {}},
        metrics=("m",),
        train=lambda run_dir, flags, seed: 0.0,
        evaluate=evaluate,
        example_grid=lambda examples: Image.new("RGB", (4 * len(examples), 4)),
        noise_per_seed=noise_per_seed,
    )
    run_ablation(plan, tmp_path, ["a", "b"], (3, 5), {"steps": 2, "every": 2}, {"m": 1.0})
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    if noise_per_seed:
        assert calls == [
            (None, 3),
            ("seed3", 3),
            ("seed3", 3),
            (None, 5),
            ("seed5", 5),
            ("seed5", 5),
        ]
        assert results["b"]["5"] == {"0": {"m": 5.0}, "2": {"m": 15.0}}
    else:
        assert calls == [(None, 0), ("seed3", 0), ("seed3", 0), ("seed5", 0), ("seed5", 0)]
        assert results["b"]["5"] == {"0": {"m": 0.0}, "2": {"m": 10.0}}
    assert results["a"]["3"]["2"] == {"m": 3.0 if noise_per_seed else 0.0}


def test_a_resumed_ablation_draws_the_examples_of_the_runs_it_kept(tmp_path):
    grids = []

    def evaluate(lora, seed):
        value = 10 if lora is None else {"a": 20, "b": 30}[lora.parent.parent.name]
        outputs = [np.full((2, 2, 3), value + index, np.uint8) for index in range(6)]
        return {"m": float(value)}, outputs

    def grid(examples):
        grids.append(
            {name: [int(o[0, 0, 0]) for o in outputs] for name, outputs in examples.items()}
        )
        return Image.new("RGB", (1, 1))

    plan = AblationPlan({"a": {}, "b": {}}, ("m",), lambda *args: 0.0, evaluate, grid)
    settings = {"steps": 2, "every": 2}
    run_ablation(plan, tmp_path, ["a"], (0,), settings, {"m": 1.0})
    assert grids[-1] == {"base": list(range(10, 16)), "a": list(range(20, 26))}
    # Adding "b" reruns nothing of "a": its first examples come back from disk, beside "b"'s.
    run_ablation(plan, tmp_path, ["a", "b"], (0,), settings, {"m": 1.0})
    assert grids[-1] == {
        "base": [10, 11, 12, 13],
        "a": [20, 21, 22, 23],
        "b": list(range(30, 36)),
    }
    # Other settings keep nothing: neither runs nor examples.
    run_ablation(plan, tmp_path, ["b"], (0,), {**settings, "steps": 4}, {"m": 1.0})
    assert grids[-1] == {"base": list(range(10, 16)), "b": list(range(30, 36))}


def test_weighted_terms_scale_each_logged_term():
    records = [
        {"step": 1, "loss": 3.0, "fm": 1.0, "geo_dice": 2.0, "geo_area": 5.0},
        {"step": 2, "loss": 2.0, "fm": 0.5, "geo_dice": 1.0, "geo_area": 4.0},
    ]
    curves = weighted_terms(records, {"fm": 1.0, "geo_dice": 0.5, "geo_area": 0.0})
    assert curves == {
        "total": ([1, 2], [3.0, 2.0]),
        "1*fm": ([1, 2], [1.0, 0.5]),
        "0.5*geo_dice": ([1, 2], [1.0, 0.5]),
    }


def test_line_plot_draws_each_series_in_its_colour():
    image = line_plot({"a": ([0, 1], [0.0, 1.0]), "b": ([0, 1], [1.0, 0.0])}, "title")
    pixels = np.asarray(image).reshape(-1, 3)
    for colour in COLOURS[:2]:
        assert (pixels == colour).all(axis=1).sum() > 100
    # Non-finite points are left out rather than breaking the axes.
    assert line_plot({"a": ([0, 1, 2], [1.0, float("nan"), 2.0])}, "t").size == (640, 400)


def test_summary_table_is_mean_and_spread_over_seeds_with_base_and_ceiling_rows():
    def metrics(value: float) -> dict[str, float]:
        return dict.fromkeys(METRICS, value)

    results = {
        "fm": {
            "0": {"0": metrics(0.0), "2": metrics(0.2)},
            "1": {"0": metrics(0.0), "2": metrics(0.4)},
        },
        "starter": {"0": {"0": metrics(0.0), "2": metrics(1.0)}},
    }
    table = summary_table(results, ["fm", "starter"], "2", METRICS, reference=metrics(0.9))
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [row[0] for row in rows] == [
        "| base (no LoRA)",
        "| fm",
        "| starter",
        "| VAE(target): the ceiling",
    ]
    assert rows[0][1] == "0.000 ± 0.000"
    # Population standard deviation of 0.2 and 0.4.
    assert rows[1][1] == "0.300 ± 0.100"
    assert rows[2][1] == "1.000 ± 0.000"
    assert rows[3][1] == "0.900"
    assert all(len(row) == len(METRICS) + 1 for row in rows)
