"""One rank of the FSDP2 checkpoint test (``test_sharding.py`` launches two on the CPU, gloo).

accelerate applies FSDP to GPU groups only, so the rank shards the tiny Kontext transformer with
torch's own ``fully_shard`` (what accelerate's FSDP2 plugin calls) inside an accelerate CPU group,
then saves and restores it with the suite's ``Checkpointer``. It writes what the test compares:
``ddp/`` (the unsharded model's LoRA file), ``run/checkpoint-1`` (saved from shards) and
``rank<r>.json`` (losses and checks).

    python -m torch.distributed.run --nproc_per_node 2 tests/training/fsdp_ranks.py OUT
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

import train_kontext_lora as kontext
from benchmarks.real_size import kontext_case
from training.checkpointing.checkpoints import (
    BatchLayout,
    Checkpointer,
    TrainingProgress,
    run_identity,
)
from training.checkpointing.sharding import is_sharded


def sharded_case():
    """The tiny Kontext case with every block and the root sharded across the ranks."""
    torch.manual_seed(0)
    case = kontext_case(True, 1, 32, "cpu", torch.float32)
    for block in [*case.denoiser.transformer_blocks, *case.denoiser.single_transformer_blocks]:
        fully_shard(block)
    fully_shard(case.denoiser)
    return case


def step(case, optimizer) -> float:
    loss, _ = case.loss(case.model, case.batch, torch.Generator().manual_seed(1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def whole(case) -> dict[str, torch.Tensor]:
    return {
        name: param.full_tensor()
        for name, param in case.model.named_parameters()
        if param.requires_grad
    }


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    if rank == 0:
        torch.manual_seed(0)
        plain = kontext_case(True, 1, 32, "cpu", torch.float32)
        kontext.KONTEXT_LORA.save(plain.model, out / "ddp")
    case = sharded_case()
    optimizer = torch.optim.AdamW([p for p in case.model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    config = kontext.KontextConfig(pretrained_model_name_or_path="-", train_data_dir="-")

    def checkpointer(case, optimizer, scheduler):
        return Checkpointer(
            accelerator,
            out / "run",
            None,
            kontext.KONTEXT_LORA.save,
            kontext.KONTEXT_LORA.load,
            BatchLayout(accelerator.num_processes, 1, 1),
            run_identity(config, case.model),
            (case.model, optimizer, scheduler),
        )

    first = step(case, optimizer)
    checkpointer(case, optimizer, scheduler).save(TrainingProgress(1, 0, 1))
    saved = whole(case)
    after_save = step(case, optimizer)

    resumed = sharded_case()  # fresh LoRA weights and an empty optimizer
    resumed_optimizer = torch.optim.AdamW(
        [p for p in resumed.model.parameters() if p.requires_grad]
    )
    resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, lambda _: 1.0)
    progress = checkpointer(resumed, resumed_optimizer, resumed_scheduler).restore(
        out / "run" / "checkpoint-1"
    )
    restored = whole(resumed)
    result = {
        "sharded": is_sharded(case.model),
        "first_loss": first,
        "step": progress.global_step,
        "restored_equal": all(torch.equal(saved[n], restored[n]) for n in saved),
        "after_save": after_save,
        "after_resume": step(resumed, resumed_optimizer),
    }
    # The optimizer state came back too: the step after the save moves the weights alike.
    continued, resumed_after = whole(case), whole(resumed)
    result["next_step_equal"] = all(
        torch.allclose(continued[n], resumed_after[n], rtol=0, atol=1e-7) for n in continued
    )
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
