"""``training.metrics``: metrics.jsonl written once per step, trimmed on resume."""

import json

import pytest

from training.metrics import METRICS_FILE, MetricsLog, read_metrics


def write_lines(folder, steps):
    lines = [json.dumps({"step": step, "loss": step / 10, "lr": 1e-4}) for step in steps]
    (folder / METRICS_FILE).write_text("".join(f"{line}\n" for line in lines))


class TestMetricsLog:
    def test_writes_one_line_per_record(self, tmp_path):
        log = MetricsLog(tmp_path, resume_step=0, enabled=True)
        records = [
            {"step": 1, "loss": 0.5, "lr": 1e-4, "dice": 0.25},
            {"step": 2, "loss": 0.25, "lr": 2e-4, "dice": 0.125},
        ]
        for record in records:
            log.write(record)
        lines = (tmp_path / METRICS_FILE).read_text().splitlines()
        assert [json.loads(line) for line in lines] == records
        assert read_metrics(tmp_path) == records

    def test_resume_drops_later_steps(self, tmp_path):
        write_lines(tmp_path, [1, 2, 3, 4, 5])
        log = MetricsLog(tmp_path, resume_step=3, enabled=True)
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        assert read_metrics(tmp_path)[2] == {"step": 3, "loss": 0.3, "lr": 1e-4}
        log.write({"step": 4, "loss": 9.0, "lr": 0.0})
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
        assert read_metrics(tmp_path)[-1]["loss"] == 9.0
        assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no partial file

    def test_resume_keeps_every_earlier_line_and_skips_blank_ones(self, tmp_path):
        lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2)]
        (tmp_path / METRICS_FILE).write_text(f"{lines[0]}\n\n{lines[1]}\n   \n")
        MetricsLog(tmp_path, resume_step=10, enabled=True)
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    def test_fresh_run_in_old_output_dir_starts_over(self, tmp_path):
        write_lines(tmp_path, [1, 2, 3])
        MetricsLog(tmp_path, resume_step=0, enabled=True)
        assert read_metrics(tmp_path) == []

    def test_resume_without_file(self, tmp_path):
        log = MetricsLog(tmp_path, resume_step=5, enabled=True)
        assert not (tmp_path / METRICS_FILE).exists()
        log.write({"step": 6, "loss": 1.0})
        assert read_metrics(tmp_path) == [{"step": 6, "loss": 1.0}]

    def test_disabled_writes_nothing(self, tmp_path):
        log = MetricsLog(tmp_path, resume_step=0, enabled=False)
        log.write({"step": 1, "loss": 1.0})
        assert not (tmp_path / METRICS_FILE).exists()

    def test_disabled_leaves_existing_file_alone(self, tmp_path):
        write_lines(tmp_path, [1, 2, 3, 4])
        before = (tmp_path / METRICS_FILE).read_bytes()
        log = MetricsLog(tmp_path, resume_step=2, enabled=False)  # a non-main rank
        log.write({"step": 3, "loss": 1.0})
        assert (tmp_path / METRICS_FILE).read_bytes() == before

    def test_resume_after_a_line_cut_short(self, tmp_path):
        write_lines(tmp_path, [1, 2, 3])
        with open(tmp_path / METRICS_FILE, "a") as handle:
            handle.write('{"step": 4, "lo')
        MetricsLog(tmp_path, resume_step=3, enabled=True)
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


class TestReadMetrics:
    def test_in_order(self, tmp_path):
        write_lines(tmp_path, [3, 1, 2])
        assert [r["step"] for r in read_metrics(tmp_path)] == [3, 1, 2]

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            read_metrics(tmp_path)
