"""FSDP2: a LoRA saved from sharded parameters is the file an unsharded run writes, and a
checkpoint saved from shards resumes exactly (two CPU ranks, gloo)."""

import json
import os
import subprocess
import sys

from safetensors import safe_open
from script_runs import ROOT, free_port


def tensors(path):
    with safe_open(path, "pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}


def test_lora_saved_from_shards_and_resumed(tmp_path):
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_port", str(free_port())),
        *(str(ROOT / "tests" / "training" / "fsdp_ranks.py"), str(tmp_path)),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["sharded"] and rank["step"] == 1 and rank["restored_equal"]
        # The restored LoRA and optimizer state take the same next step as the saved run.
        assert rank["after_resume"] == rank["after_save"]
        assert rank["next_step_equal"]
    assert ranks[0]["first_loss"] == ranks[1]["first_loss"]

    reference = tensors(tmp_path / "ddp" / "pytorch_lora_weights.safetensors")
    checkpoint = tmp_path / "run" / "checkpoint-1"
    from_shards = tensors(checkpoint / "pytorch_lora_weights.safetensors")
    assert from_shards.keys() == reference.keys()
    assert {k: v.shape for k, v in from_shards.items()} == {
        k: v.shape for k, v in reference.items()
    }
    # One optimizer shard per rank; the unsharded layout's single file is absent.
    assert (checkpoint / "optimizer-0.json").is_file() and (
        checkpoint / "optimizer-1.json"
    ).is_file()
    assert not (checkpoint / "optimizer.json").exists()
