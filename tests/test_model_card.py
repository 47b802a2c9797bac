"""``training.model_card``: the README.md of a finished run as the Hub reads it, and
--push_to_hub against a local stand-in for the Hub's HTTP API (the network layer only:
huggingface_hub itself runs unchanged)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants
from lora_helpers import ALPHA, add_random_lora, save_random_lora
from PIL import Image

import train_kontext_lora as kontext
from training.lora.export import detect_family, read_lora
from training.model_card import CARD_FILE, publish_run
from worlds.tiny_models import tiny_flux_kontext_pipeline

KONTEXT_ID = "black-forest-labs/FLUX.1-Kontext-dev"
ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """What a Kontext run leaves before its card: the LoRA (double-block attention only),
    metrics, validation grids, a checkpoint, a half-written one and the latent cache."""
    out = tmp_path_factory.mktemp("run")
    pipe = tiny_flux_kontext_pipeline()
    add_random_lora(pipe.transformer, ATTENTION, seed=0)
    save_random_lora(kontext.FluxKontextPipeline, {"transformer": pipe.transformer}, out)
    records = [
        {"step": 1, "epoch": 0, "lr": 1e-4, "loss": 0.75, "fm": 0.5},
        {"step": 2, "epoch": 1, "lr": 1e-4, "loss": 0.625, "fm": 0.4375, "geo_dice": 0.25},
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in (1, 2):
        (out / "validation").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(out / "validation" / f"step-{step:06d}.png")
    for folder in ("checkpoint-2", ".checkpoint-3.partial", "cache"):
        (out / folder).mkdir()
        (out / folder / "state.safetensors").write_bytes(b"not for the hub")
    return out


def kontext_config(out: Path, **overrides) -> kontext.KontextConfig:
    values = {
        "pretrained_model_name_or_path": KONTEXT_ID,
        "train_data_dir": "my_pairs",
        "output_dir": str(out),
        "resolution": 512,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 3,
        "learning_rate": 5e-5,
        "validation_prompt": "insert a red armchair",
    }
    return kontext.KontextConfig(**{**values, **overrides})


def publish(config, processes: int = 2) -> ModelCard:
    info = kontext.card_info(config)
    path = publish_run(config, info, steps=2, examples=10, processes=processes)
    return ModelCard.load(path)


class TestModelCard:
    def test_front_matter_and_body(self, finished_run):
        card = publish(kontext_config(finished_run))
        data = card.data
        assert data.base_model == KONTEXT_ID and data.library_name == "diffusers"
        assert data.license == "other" and data.license_name == "flux-1-dev-non-commercial-license"
        assert data.pipeline_tag == "image-to-image"
        assert {"flux", "flux-kontext", "lora", "diffusers"} <= set(data.tags)
        text = card.text
        assert f'FluxKontextPipeline.from_pretrained("{KONTEXT_ID}"' in text
        assert f'pipe.load_lora_weights("{finished_run}")' in text
        assert "prompt='insert a red armchair'" in text
        assert "10 examples from the folder `my_pairs`, at `--resolution 512`" in text
        assert "| examples per step | 12 (2 per batch x 3 accumulated x 2 processes) |" in text
        assert "| learning rate | 5e-05, constant, 0 warm-up |" in text
        assert f"| LoRA | 4 modules, rank 4, alpha {ALPHA:g} |" in text
        # every loss term with its weight, the resolved geometry-match default included
        for row in ("| fm | 1 |", "| geo_mse | 1 |", "| geo_dice | 0.9 |", "| emb_overlay | 0.7 |"):
            assert row in text
        assert "| emb_geometry | 0 |" in text
        assert "At step 2" in text and "| loss | 0.625 |" in text and "| geo_dice | 0.25 |" in text
        assert "![validation](validation/step-000002.png)" in text

    @pytest.mark.parametrize(
        "layout,expected",
        [
            ({"train_data_dir": None, "train_data_file": "edits.jsonl"}, "the file `edits.jsonl`"),
            (
                {"control_dirs": ["people", "products"]},
                "the targets in `my_pairs` with references in `people`, `products`",
            ),
        ],
    )
    def test_the_data_layout_and_the_trigger_word(self, finished_run, layout, expected):
        card = publish(kontext_config(finished_run, trigger_word="ohwx", **layout))
        assert f"10 examples from {expected}, at `--resolution 512`" in card.text
        assert "held the trigger word `ohwx`: put it in yours" in card.text

    def test_a_local_base_model_has_no_hub_metadata(self, finished_run, tmp_path):
        card = publish(kontext_config(finished_run, pretrained_model_name_or_path=str(tmp_path)))
        assert card.data.base_model is None and card.data.license is None
        assert f"`{tmp_path}` (local)" in card.text

    def test_the_card_tells_the_exporter_the_family(self, finished_run):
        # Attention alone is named alike in FLUX and Qwen-Image; the run's card settles it.
        publish(kontext_config(finished_run))
        assert detect_family(read_lora(finished_run)) == "flux"

    def test_hub_flags_are_checked_before_training(self, tmp_path):
        with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
            kontext_config(tmp_path, push_to_hub=True)
        with pytest.raises(ValueError, match="send the token to the trackers"):
            kontext_config(tmp_path, hub_token="hf_x", report_to="tensorboard")


class HubStandIn(BaseHTTPRequestHandler):
    """Answers the four calls ``create_repo`` and ``upload_folder`` make (create, YAML check,
    pre-upload, commit) as the Hub does for small files, and records what it was sent in its
    server's ``requests``."""

    def _reply(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply({})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = {"path": self.path, "body": body, "headers": dict(self.headers)}
        self.server.requests.append(request)
        root = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self._reply({"url": f"{root}/{request['organization']}/{request['name']}"})
        elif "/preupload/" in self.path:
            files = [f["path"] for f in json.loads(body)["files"]]
            modes = [{"path": f, "uploadMode": "regular", "shouldIgnore": False} for f in files]
            self._reply({"files": modes})
        elif "/commit/" in self.path:
            self._reply({"commitUrl": f"{root}/user/run/commit/{'0' * 40}", "commitOid": "0" * 40})
        else:
            self._reply({})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(monkeypatch):
    """A local stand-in for the Hub, which huggingface_hub reaches as its endpoint."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server.requests
    server.shutdown()


class TestPushToHub:
    def test_uploads_the_run_without_checkpoints_or_cache(self, finished_run, hub):
        config = kontext_config(
            finished_run,
            push_to_hub=True,
            hub_model_id="user/run",
            hub_token="hf_stand_in",
            hub_private=True,
        )
        publish(config)
        create = json.loads(hub[0]["body"])
        assert hub[0]["path"] == "/api/repos/create"
        assert create == {"name": "run", "organization": "user", "visibility": "private"}
        assert hub[0]["headers"]["authorization"] == "Bearer hf_stand_in"
        commit = [r for r in hub if r["path"] == "/api/models/user/run/commit/main"]
        lines = [json.loads(line) for line in commit[0]["body"].splitlines()]
        files = {
            line["value"]["path"]: base64.b64decode(line["value"]["content"])
            for line in lines
            if line["key"] == "file"
        }
        assert sorted(files) == [
            CARD_FILE,
            "metrics.jsonl",
            "pytorch_lora_weights.safetensors",
            "validation/step-000001.png",
            "validation/step-000002.png",
        ]
        for name, content in files.items():
            assert content == (finished_run / name).read_bytes(), name
        assert b'pipe.load_lora_weights("user/run")' in files[CARD_FILE]

    def test_an_unreachable_hub_keeps_the_outputs_and_says_how_to_upload(self, finished_run):
        config = kontext_config(finished_run, push_to_hub=True, hub_model_id="user/run")
        (finished_run / CARD_FILE).unlink(missing_ok=True)
        with pytest.raises(RuntimeError) as error:  # the tests run with HF_HUB_OFFLINE=1
            publish(config)
        assert "OfflineModeIsEnabled" in str(error.value)
        assert f"hf upload user/run {finished_run} --exclude 'checkpoint-*'" in str(error.value)
        assert (finished_run / CARD_FILE).is_file()
