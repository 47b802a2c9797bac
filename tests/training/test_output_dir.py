"""``training.checkpointing.output_dir``: one run per folder, and nothing the suite did not write
deleted or overwritten, whatever ``--output_dir`` a user names."""

import json
import os
import socket

import pytest
from script_runs import lock_held_elsewhere

from training.checkpointing.checkpoints import STATE_FILE
from training.checkpointing.output_dir import (
    LOCK_FILE,
    MANIFEST_FILE,
    RUN_OUTPUTS,
    OutputDirError,
    RunLock,
    check_output_dir,
    owned,
    prepare_output_dir,
)


def make_checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "optimizer.json").write_text("{}")
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"global_step": step}))
    return folder


def finished_run(root):
    """What a run leaves: claimed outputs, written."""
    prepare_output_dir(root, False, False, True)
    for name in ("pytorch_lora_weights.safetensors", "metrics.jsonl", "README.md"):
        (root / name).write_text("ours")
    (root / "validation").mkdir()
    (root / "cache" / "entry").mkdir(parents=True)


class TestWhatIsOurs:
    def test_the_names_a_run_writes(self):
        from training.lora.export import LORA_WEIGHTS_NAME
        from training.metrics import METRICS_FILE
        from training.model_card import CARD_FILE
        from training.validation import VALIDATION_DIR

        assert {LORA_WEIGHTS_NAME, METRICS_FILE, CARD_FILE, VALIDATION_DIR} <= set(RUN_OUTPUTS)

    def test_claimed_outputs_and_complete_checkpoints(self, tmp_path):
        (tmp_path / "README.md").write_text("a data set's own")
        make_checkpoint(tmp_path, 3)
        make_checkpoint(tmp_path, 5, complete=False)
        (tmp_path / ".checkpoint-6.partial").mkdir()
        (tmp_path / "checkpoint-notes").mkdir()
        (tmp_path / MANIFEST_FILE).write_text(json.dumps({"owned": ["metrics.jsonl"]}))
        assert owned(tmp_path) == {"metrics.jsonl", "checkpoint-3", ".checkpoint-6.partial"}

    def test_a_run_folder_of_a_version_without_manifest(self, tmp_path):
        make_checkpoint(tmp_path, 3)
        (tmp_path / "metrics.jsonl").write_text("")
        (tmp_path / "notes.txt").write_text("")
        assert owned(tmp_path) == {"checkpoint-3", "metrics.jsonl"}


class TestChecks:
    @pytest.mark.parametrize("name", ["", "  "])
    def test_an_empty_output_dir_is_refused(self, name):
        with pytest.raises(OutputDirError, match="--output_dir is empty"):
            check_output_dir(name, [])

    def test_the_data_folder_is_refused(self, tmp_path):
        with pytest.raises(OutputDirError, match="is the training data folder"):
            check_output_dir(str(tmp_path / "data" / ".." / "data"), [str(tmp_path / "data")])

    def test_a_file_the_run_would_overwrite_is_refused_naming_it(self, tmp_path):
        (tmp_path / "README.md").write_text("my data set")
        with pytest.raises(OutputDirError, match=r"holds README\.md, which this suite did not"):
            check_output_dir(str(tmp_path), [])
        assert (tmp_path / "README.md").read_text() == "my data set"

    def test_the_suites_own_outputs_are_fine(self, tmp_path):
        finished_run(tmp_path)
        check_output_dir(str(tmp_path), [])


class TestPrepare:
    def test_fresh_run_refuses_another_runs_checkpoints(self, tmp_path):
        make_checkpoint(tmp_path, 6)
        with pytest.raises(OutputDirError, match=r"checkpoint-6.*--resume_from_checkpoint latest"):
            prepare_output_dir(tmp_path, False, False, True)
        assert (tmp_path / "checkpoint-6").is_dir()
        prepare_output_dir(tmp_path, True, False, True)  # resuming it
        assert (tmp_path / "checkpoint-6").is_dir()

    def test_a_finished_run_is_not_replaced_silently(self, tmp_path):
        finished_run(tmp_path)
        with pytest.raises(OutputDirError, match=r"a finished run \(pytorch_lora_weights"):
            prepare_output_dir(tmp_path, False, False, True)
        assert (tmp_path / "metrics.jsonl").read_text() == "ours"

    def test_a_killed_run_before_its_first_checkpoint_starts_again(self, tmp_path):
        prepare_output_dir(tmp_path, False, False, True)
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
        prepare_output_dir(tmp_path, False, False, True)

    def test_overwrite_removes_only_what_the_suite_wrote(self, tmp_path):
        finished_run(tmp_path)
        make_checkpoint(tmp_path, 2)
        (tmp_path / ".checkpoint-4.partial").mkdir()
        # A user's data folder, notes, and a link to a folder elsewhere, beside the run.
        (tmp_path / "my_data" / "images").mkdir(parents=True)
        (tmp_path / "my_data" / "images" / "0.png").write_bytes(b"png")
        (tmp_path / "notes.txt").write_text("keep")
        elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
        elsewhere.mkdir()
        (elsewhere / "precious").write_text("keep")
        (tmp_path / "link").symlink_to(elsewhere, target_is_directory=True)
        prepare_output_dir(tmp_path, False, True, True)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == [MANIFEST_FILE, "cache", "link", "my_data", "notes.txt"]
        assert (tmp_path / "my_data" / "images" / "0.png").read_bytes() == b"png"
        assert (elsewhere / "precious").read_text() == "keep"
        assert (tmp_path / "cache" / "entry").is_dir()
        prepare_output_dir(tmp_path, False, False, True)  # a fresh run is now welcome

    def test_other_ranks_delete_nothing(self, tmp_path):
        make_checkpoint(tmp_path, 6)
        prepare_output_dir(tmp_path, False, True, False)
        assert (tmp_path / "checkpoint-6").is_dir()


class TestRunLock:
    def test_a_second_run_is_refused_naming_the_first(self, tmp_path):
        with lock_held_elsewhere(tmp_path) as pid:
            with pytest.raises(OutputDirError) as refused:
                RunLock(tmp_path).acquire()
            assert f"process {pid} on {socket.gethostname()}" in str(refused.value)
        # Its process gone, the lock is taken over.
        lock = RunLock(tmp_path)
        lock.acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.release()
        assert not (tmp_path / LOCK_FILE).exists()

    def test_a_lock_of_another_host_is_respected(self, tmp_path):
        record = {"pid": 1, "host": "elsewhere", "started": "2026-01-01 00:00:00"}
        (tmp_path / LOCK_FILE).write_text(json.dumps(record))
        with pytest.raises(OutputDirError, match=r"process 1 on elsewhere.*delete .*\.lock"):
            RunLock(tmp_path).acquire()
        RunLock(tmp_path).release()  # not ours: stays
        assert (tmp_path / LOCK_FILE).exists()

    def test_this_process_takes_its_own_lock_again(self, tmp_path):
        RunLock(tmp_path).acquire()
        RunLock(tmp_path).acquire()  # an earlier run of this process that stopped with an error
