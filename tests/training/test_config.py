"""``training.config``: flat flags from a script's config dataclass, YAML files, validation."""

import ast
import dataclasses
import importlib.util
import inspect
import itertools
import textwrap
from dataclasses import dataclass

import pytest

from training.config import (
    EditPairDataConfig,
    FlowMatchingConfig,
    MaskLossSettings,
    RegionLossConfig,
    TrainConfig,
    parse_config,
)


@dataclass(kw_only=True)
class ScriptConfig(EditPairDataConfig, FlowMatchingConfig, TrainConfig):
    """A train script's configuration."""

    extra_weight: float = 0.5
    """Weight of the script's extra loss term."""
    use_extra: bool = False
    """Whether the script's extra loss term is used."""


BASE = ["--pretrained_model_name_or_path", "model", "--train_data_dir", "data"]


def parse(*argv: str) -> ScriptConfig:
    return parse_config(ScriptConfig, list(argv))


def parse_error(capsys, *argv: str, config_cls: type = ScriptConfig) -> str:
    """Parse ``argv`` into ``config_cls``, expecting the argparse exit (status 2); returns
    stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse_config(config_cls, list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def field_docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings of ``cls`` and its bases, read from their source with ``ast``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def squeeze(text: str) -> str:
    """``text`` without any whitespace (help output is wrapped at the terminal width)."""
    return "".join(text.split())


class TestDefaultsAndFlags:
    def test_defaults(self):
        config = parse(*BASE)
        assert isinstance(config, ScriptConfig)
        assert config.pretrained_model_name_or_path == "model"
        assert config.train_data_dir == "data"
        assert config.dataset_name is None
        assert config.resolution == 512
        assert config.rank is None  # 16, or the rank of --init_lora_weights
        # What a real run on a GPU wants; tests and tiny configs set their own.
        assert config.gradient_checkpointing is True and config.cache_latents is True
        assert config.mixed_precision == "auto"  # settled by the machine that trains
        assert config.caption_dropout == 0.0 and config.validation_at_start is True
        assert config.timestep_shift == 1.0
        assert config.weighting_scheme == "none"
        assert config.context_column == "context"
        assert config.extra_weight == 0.5

    def test_flags_of_every_mixin_and_the_script(self):
        config = parse(
            *BASE,
            "--resolution", "256",
            "--learning_rate", "3e-4",
            "--lr_scheduler", "cosine",
            "--rank", "4",
            "--lora_alpha", "8",
            "--lora_layers", "attn.to_q,attn.to_k",
            "--mixed_precision", "bf16",
            "--max_train_steps", "7",
            "--weighting_scheme", "logit_normal",
            "--logit_mean", "-0.5",
            "--mask_column", "edit_mask",
            "--overlay_column", "null",
            "--extra_weight", "0.25",
        )  # fmt: skip
        assert config.resolution == 256
        assert config.learning_rate == pytest.approx(3e-4)
        assert config.lr_scheduler == "cosine"
        assert config.rank == 4
        assert config.lora_alpha == 8.0
        assert config.lora_layers == "attn.to_q,attn.to_k"
        assert config.mixed_precision == "bf16"
        assert config.max_train_steps == 7
        assert config.weighting_scheme == "logit_normal"
        assert config.logit_mean == -0.5
        assert config.mask_column == "edit_mask"
        assert config.overlay_column is None
        assert config.extra_weight == 0.25

    def test_dataset_name_instead_of_folder(self):
        config = parse("--pretrained_model_name_or_path", "m", "--dataset_name", "pairs")
        assert config.dataset_name == "pairs"
        assert config.train_data_dir is None


class TestBooleanFlags:
    @pytest.mark.parametrize(
        "argv",
        [
            [*BASE, "--overwrite_output_dir"],
            ["--overwrite_output_dir", *BASE],
            [*BASE, "--overwrite_output_dir", "true"],
            [*BASE, "--overwrite_output_dir=true"],
        ],
    )
    def test_bare_or_true_means_true(self, argv):
        config = parse(*argv)
        assert config.overwrite_output_dir is True
        assert config.hub_private is False
        assert config.use_extra is False

    def test_false(self):
        assert parse(*BASE, "--gradient_checkpointing", "false").gradient_checkpointing is False
        assert parse(*BASE, "--cache_latents=false").cache_latents is False

    def test_several_bare_flags_in_a_row(self):
        config = parse("--overwrite_output_dir", "--hub_private", "--use_extra", *BASE)
        assert (config.overwrite_output_dir, config.hub_private, config.use_extra) == (
            True,
            True,
            True,
        )
        assert config.pretrained_model_name_or_path == "model"

    def test_bare_flag_before_config_file(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("rank: 3\n")
        config = parse(*BASE, "--cache_latents", "--config", str(path))
        assert config.cache_latents is True
        assert config.rank == 3


class TestConfigFile:
    @pytest.fixture
    def yaml_file(self, tmp_path):
        path = tmp_path / "config.yaml"
        path.write_text(
            "pretrained_model_name_or_path: from-file\n"
            "train_data_dir: file-data\n"
            "resolution: 256\n"
            "learning_rate: 0.5\n"
            "gradient_checkpointing: true\n"
            "timestep_shift: auto\n"
            "extra_weight: 2.0\n"
        )
        return path

    def test_file_values_apply(self, yaml_file):
        config = parse("--config", str(yaml_file))
        assert config.pretrained_model_name_or_path == "from-file"
        assert config.train_data_dir == "file-data"
        assert config.resolution == 256
        assert config.learning_rate == 0.5
        assert config.gradient_checkpointing is True
        assert config.timestep_shift == "auto"
        assert config.extra_weight == 2.0
        assert config.rank is None  # not in the file: the default

    def test_flag_after_config_wins(self, yaml_file):
        config = parse("--config", str(yaml_file), "--resolution", "128", "--extra_weight", "3")
        assert config.resolution == 128
        assert config.extra_weight == 3.0
        assert config.learning_rate == 0.5

    def test_flag_before_config_wins(self, yaml_file):
        config = parse("--resolution", "128", "--extra_weight", "3", "--config", str(yaml_file))
        assert config.resolution == 128
        assert config.extra_weight == 3.0
        assert config.learning_rate == 0.5

    @pytest.mark.parametrize("position", ["before", "after"])
    def test_boolean_flag_false_overrides_file(self, yaml_file, position):
        flags = ["--gradient_checkpointing", "false"]
        config_flag = ["--config", str(yaml_file)]
        argv = flags + config_flag if position == "before" else config_flag + flags
        assert parse(*argv).gradient_checkpointing is False

    def test_flag_before_equals_form_config_wins(self, yaml_file):
        config = parse("--resolution", "128", f"--config={yaml_file}")
        assert config.resolution == 128

    def test_invalid_value_in_file_exits_naming_the_flag(self, tmp_path, capsys):
        path = tmp_path / "bad.yaml"
        path.write_text("resolution: 500\n")
        err = parse_error(capsys, *BASE, "--config", str(path))
        assert "--resolution" in err
        assert "500" in err


class TestTimestepShift:
    @pytest.mark.parametrize(("value", "expected"), [("3", 3.0), ("1.5", 1.5), ("auto", "auto")])
    def test_float_or_auto(self, value, expected):
        shift = parse(*BASE, "--timestep_shift", value).timestep_shift
        assert shift == expected
        assert type(shift) is type(expected)

    def test_other_words_rejected(self, capsys):
        assert "timestep_shift" in parse_error(capsys, *BASE, "--timestep_shift", "automatic")


class TestInvalidValues:
    @pytest.mark.parametrize("resolution", ["500", "8", "1000"])
    def test_resolution_not_multiple_of_16(self, capsys, resolution):
        err = parse_error(capsys, *BASE, "--resolution", resolution)
        assert "--resolution" in err
        assert "multiple of 16" in err

    def test_both_data_sources(self, capsys):
        err = parse_error(capsys, *BASE, "--dataset_name", "pairs")
        assert "--train_data_dir" in err and "--dataset_name" in err

    def test_neither_data_source(self, capsys):
        err = parse_error(capsys, "--pretrained_model_name_or_path", "m")
        assert "--train_data_dir" in err and "--dataset_name" in err

    @pytest.mark.parametrize(
        ("flag", "value"),
        [
            ("lr_scheduler", "exponential"),
            ("mixed_precision", "fp8"),
            ("weighting_scheme", "gaussian"),
        ],
    )
    def test_bad_literal_choice(self, capsys, flag, value):
        err = parse_error(capsys, *BASE, f"--{flag}", value)
        assert flag in err
        assert value in err

    @pytest.mark.parametrize(
        "flag",
        ["train_batch_size", "gradient_accumulation_steps", "rank", "num_train_epochs"],
    )
    def test_counts_below_one(self, capsys, flag):
        err = parse_error(capsys, *BASE, f"--{flag}", "0")
        assert f"--{flag}" in err
        assert ">= 1" in err

    @pytest.mark.parametrize(
        ("flag", "value", "expected"),
        [
            ("resolution", "0", ">= 16"),
            ("learning_rate", "-1", "> 0"),
            ("learning_rate", "0", "> 0"),
            ("seed", "-1", ">= 0"),
            ("lora_dropout", "1.5", "in [0, 1)"),
            ("adam_beta1", "1.5", "in [0, 1)"),
            ("adam_beta2", "1", "in [0, 1)"),
            ("adam_epsilon", "0", "> 0"),
            ("dataloader_num_workers", "-1", ">= 0"),
            ("validation_steps", "0", ">= 1"),
            ("num_validation_images", "-1", ">= 1"),
            ("max_train_steps", "0", ">= 1"),
            ("lora_alpha", "0", "> 0"),
            ("timestep_shift", "0", "> 0"),
            ("logit_std", "-1", "> 0"),
        ],
    )
    def test_values_out_of_range_stop_at_parse_naming_the_flag(self, capsys, flag, value, expected):
        err = parse_error(capsys, *BASE, f"--{flag}", value)
        assert f"--{flag} must be {expected}, got" in err

    def test_range_edges_that_mean_something_are_allowed(self):
        config = parse(*BASE, "--lora_dropout", "0", "--adam_beta1", "0", "--seed", "0")
        assert config.lora_dropout == 0 and config.adam_beta1 == 0
        assert parse(*BASE, "--timestep_shift", "auto").timestep_shift == "auto"

    def test_checkpointing_steps_below_one(self, capsys):
        assert "--checkpointing_steps" in parse_error(capsys, *BASE, "--checkpointing_steps", "0")

    def test_not_a_number(self, capsys):
        assert "learning_rate" in parse_error(capsys, *BASE, "--learning_rate", "fast")

    def test_missing_required(self, capsys):
        err = parse_error(capsys, "--train_data_dir", "data")
        assert "pretrained_model_name_or_path" in err

    def test_unknown_flag(self, capsys):
        assert "--no_such_flag" in parse_error(capsys, *BASE, "--no_such_flag", "1")

    def test_dataclass_validates_on_its_own(self):
        with pytest.raises(ValueError, match="multiple of 16"):
            TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", resolution=100)
        with pytest.raises(ValueError, match="exactly one"):
            TrainConfig(pretrained_model_name_or_path="m")


class TestHelp:
    def test_every_field_is_a_flag_with_its_docstring(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            parse("--help")
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        docs = field_docstrings(ScriptConfig)
        names = [field.name for field in dataclasses.fields(ScriptConfig)]
        assert set(docs) == set(names)  # the reference reader found every field's docstring
        flat = squeeze(out)
        for name in names:
            assert f"--{name}" in out, name
            assert squeeze(docs[name]) in flat, name
        assert "--config" in out

    def test_description_is_the_class_docstring(self, capsys):
        with pytest.raises(SystemExit):
            parse("--help")
        assert "A train script's configuration." in capsys.readouterr().out


class TestTrackers:
    @pytest.mark.parametrize(
        ("report_to", "expected"),
        [
            (None, []),
            ("", []),
            ("tensorboard", ["tensorboard"]),
            ("tensorboard,wandb", ["tensorboard", "wandb"]),
            (" tensorboard , wandb ,", ["tensorboard", "wandb"]),
        ],
    )
    def test_split(self, report_to, expected):
        config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d")
        config.report_to = report_to  # the trackers' packages are not this test's business
        assert config.trackers == expected

    @pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
    def test_a_tracker_without_its_package_is_refused_at_parse(self, capsys, monkeypatch, tracker):
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == tracker else find_spec(n, *a)
        )
        err = parse_error(capsys, *BASE, "--report_to", f"{tracker}")
        assert f"--report_to {tracker} needs the {tracker} package" in err
        assert "'.[tracking]'" in err


@dataclass(kw_only=True)
class RegionConfig(RegionLossConfig, TrainConfig):
    """A script with seed 000's nested mask_loss block."""


class TestNestedMaskLoss:
    def parse(self, *argv: str) -> RegionConfig:
        return parse_config(RegionConfig, [*BASE, *argv])

    def test_seed_defaults(self):
        settings = self.parse().mask_loss
        assert isinstance(settings, MaskLossSettings)
        assert (settings.enabled, settings.weight) == (False, 0.3)
        assert (settings.text_region_weight, settings.background_weight) == (2.0, 1.0)

    @pytest.mark.parametrize(
        ("flag", "value", "expected"),
        [
            ("mask_loss.weight", "-0.5", "in [0, 1]"),
            ("mask_loss.weight", "1.5", "in [0, 1]"),
            ("mask_loss.text_region_weight", "-2", ">= 0"),
            ("mask_loss.background_weight", "-1", ">= 0"),
        ],
    )
    def test_nonsense_weights_are_refused_with_the_dotted_flag(self, capsys, flag, value, expected):
        err = parse_error(capsys, *BASE, f"--{flag}", value, config_cls=RegionConfig)
        assert f"--{flag} must be {expected}, got" in err

    def test_dotted_flags_and_bare_boolean(self):
        config = self.parse("--mask_loss.enabled", "--mask_loss.weight", "0.5")
        assert config.mask_loss.enabled is True and config.mask_loss.weight == 0.5
        assert config.region_loss_weights() == {"alpha": 0.5, "fg_weight": 2.0, "bg_weight": 1.0}

    def test_yaml_nested_as_the_seed_writes_it_and_flags_win(self, tmp_path):
        path = tmp_path / "config.yaml"
        path.write_text(
            "mask_loss:\n  enabled: true\n  weight: 0.3\n  text_region_weight: 3.0\n"
            "  background_weight: 0.5\n"
        )
        config = self.parse("--config", str(path), "--mask_loss.text_region_weight", "4")
        assert config.mask_loss == MaskLossSettings(True, 0.3, 4.0, 0.5)

    def test_help_lists_the_nested_flags(self, capsys):
        with pytest.raises(SystemExit):
            parse_config(RegionConfig, ["--help"])
        text = capsys.readouterr().out
        for name in ("enabled", "weight", "text_region_weight", "background_weight"):
            assert f"--mask_loss.{name}" in text
