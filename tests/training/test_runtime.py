"""``training.runtime``: the accelerator on CPU, its process-group guard, dtypes and the
per-micro-batch generator."""

import itertools
import random
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from data.images import DataError
from training.config import TrainConfig
from training.runtime import build_accelerator, run_main, step_generator, weight_dtype

CPU = torch.device("cpu")


def make_config(tmp_path, **overrides) -> TrainConfig:
    values = {
        "pretrained_model_name_or_path": "m",
        "train_data_dir": "d",
        "output_dir": str(tmp_path / "out"),
        **overrides,
    }
    return TrainConfig(**values)


def draws(generator: torch.Generator) -> torch.Tensor:
    return torch.cat([torch.randn(8, generator=generator), torch.rand(8, generator=generator)])


class TestStepGenerator:
    def test_same_inputs_same_draws(self):
        first = draws(step_generator(3, 1, 17, CPU))
        torch.randn(100)  # whatever else consumes random numbers in between
        np.random.rand(10)  # noqa: NPY002 (the legacy global RNG is the point)
        second = draws(step_generator(3, 1, 17, CPU))
        assert torch.equal(first, second)

    def test_any_change_gives_different_draws(self):
        seeds, ranks, steps = range(3), range(3), range(40)
        seen = {}
        for seed, rank, step in itertools.product(seeds, ranks, steps):
            key = tuple(draws(step_generator(seed, rank, step, CPU)).tolist())
            assert key not in seen, f"{(seed, rank, step)} draws what {seen.get(key)} drew"
            seen[key] = (seed, rank, step)
        assert len(seen) == 3 * 3 * 40

    def test_arguments_are_not_interchangeable(self):
        # (seed, rank, step) = (1, 2, 3) and its permutations are six different streams.
        streams = {
            tuple(draws(step_generator(*args, CPU)).tolist())
            for args in itertools.permutations((1, 2, 3))
        }
        assert len(streams) == 6

    def test_large_values(self):
        for seed in (0, 2**31 - 1, 2**32, 2**40 + 7):
            generator = step_generator(seed, 7, 10**9, CPU)
            assert generator.device.type == "cpu"
            assert torch.isfinite(draws(generator)).all()

    def test_leaves_global_rngs_alone(self):
        torch_state = torch.get_rng_state()
        numpy_state = np.random.get_state()  # noqa: NPY002
        python_state = random.getstate()
        for step in range(5):
            draws(step_generator(0, 0, step, CPU))
        assert torch.equal(torch.get_rng_state(), torch_state)
        assert all(
            np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
            for a, b in zip(np.random.get_state(), numpy_state, strict=True)  # noqa: NPY002
        )
        assert random.getstate() == python_state

    def test_independent_of_global_seed(self):
        torch.manual_seed(1)
        first = draws(step_generator(5, 0, 2, CPU))
        torch.manual_seed(2)
        assert torch.equal(draws(step_generator(5, 0, 2, CPU)), first)


class TestWeightDtype:
    @pytest.mark.parametrize(
        ("precision", "dtype"),
        [("no", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)],
    )
    def test_mapping(self, tmp_path, precision, dtype):
        assert weight_dtype(make_config(tmp_path, mixed_precision=precision)) is dtype


@pytest.mark.usefixtures("clean_accelerate_state")
class TestBuildAccelerator:
    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
    def test_cpu_single_process(self, tmp_path):
        config = make_config(tmp_path, gradient_accumulation_steps=3, seed=123)
        accelerator = build_accelerator(config)
        assert accelerator.device.type == "cpu"
        assert accelerator.num_processes == 1
        assert accelerator.process_index == 0
        assert accelerator.is_main_process
        assert accelerator.gradient_accumulation_steps == 3
        assert accelerator.mixed_precision == "no"
        assert accelerator.log_with == []
        assert accelerator.project_dir == config.output_dir
        assert accelerator.logging_dir == f"{config.output_dir}/logs"

    def test_seeds_torch_with_the_config_seed(self, tmp_path):
        build_accelerator(make_config(tmp_path, seed=123))
        after_build = torch.rand(4)
        torch.manual_seed(123)
        assert torch.equal(after_build, torch.rand(4))

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
    def test_world_size_mismatch_raises(self, tmp_path, monkeypatch):
        """The launcher says two processes, but the group has one: a real world-size-1 gloo
        group exists already, so accelerate joins it instead of forming the launcher's."""
        threads = torch.get_num_threads()
        for name, value in {
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "RANK": "0",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
            "OMP_NUM_THREADS": str(threads),  # else accelerate changes torch's thread count
        }.items():
            monkeypatch.setenv(name, value)
        store = tmp_path / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        try:
            with pytest.raises(RuntimeError, match=r"started 2 processes .* group of 1"):
                build_accelerator(make_config(tmp_path))
        finally:
            dist.destroy_process_group()
            torch.set_num_threads(threads)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal off GPUs")
    def test_fsdp_that_accelerate_did_not_apply_is_refused(self, tmp_path, monkeypatch):
        """What `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets; on CPUs
        accelerate keeps plain data parallel, which must not pass for sharding."""
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(RuntimeError, match=r"asks for FSDP .* GPU groups only"):
            build_accelerator(make_config(tmp_path))


class TestRunMain:
    def fail(self):
        raise DataError("'data/metadata.jsonl' line 3: missing key 'prompt'")

    def test_a_refusal_is_one_line_and_exit_status_2(self, capsys, monkeypatch):
        monkeypatch.setattr(sys, "argv", ["train_x.py", "--train_data_dir", "data"])
        with pytest.raises(SystemExit) as stopped:
            run_main(self.fail)
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("train_x.py: error: 'data/metadata.jsonl' line 3: missing key")
        assert "Traceback" not in err and err.count("\n") == 1

    def test_debug_shows_the_traceback(self, monkeypatch):
        monkeypatch.setattr(sys, "argv", ["train_x.py", "--debug"])
        with pytest.raises(DataError):
            run_main(self.fail)

    def test_other_errors_keep_their_traceback(self, monkeypatch):
        def broken():
            raise KeyError("a bug")

        with pytest.raises(KeyError):
            run_main(broken)
