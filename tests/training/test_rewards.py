"""``training.rewards``: built-in scores at analytic values, ``--reward`` parsing, user rewards,
failures that stop training naming the reward, and the CLIP crop score on a tiny random CLIP
saved and loaded with ``from_pretrained``."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from models.tiny import tiny_clip_tokenizer
from training.rewards import (
    ClipCropScore,
    RewardError,
    RewardOptions,
    Rewards,
    RewardTerm,
    background_consistency,
    edge_band,
    mask_box_crops,
    parse_reward_spec,
    seam_smoothness,
)


def images_and_masks(count: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sources = torch.rand(count, 3, size, size, generator=g)
    masks = torch.zeros(count, 1, size, size)
    masks[..., 4:10, 5:12] = 1
    return sources, masks


class TestBackgroundConsistency:
    def test_identical_output_scores_best(self):
        sources, masks = images_and_masks()
        best = background_consistency(sources, ["a", "b"], masks, sources)
        assert torch.equal(best, torch.zeros(2))
        other = background_consistency(1 - sources, ["a", "b"], masks, sources)
        assert (other < 0).all()

    def test_known_value_and_the_mask_is_free(self):
        sources, masks = images_and_masks()
        images = sources + 0.1 * (1 - masks)  # 0.1 off everywhere outside the mask
        images = images + 5.0 * masks  # anything inside
        torch.testing.assert_close(
            background_consistency(images, ["a", "b"], masks, sources), torch.full((2,), -0.01)
        )

    def test_full_mask_has_no_background(self):
        sources, _ = images_and_masks()
        full = torch.ones(2, 1, 16, 16)
        assert torch.equal(
            background_consistency(1 - sources, ["", ""], full, sources), torch.zeros(2)
        )


class TestSeamSmoothness:
    def test_edge_band(self):
        masks = torch.zeros(1, 1, 8, 8)
        masks[..., :, :4] = 1
        band = edge_band(masks, 1)
        assert torch.equal(band[0, 0, 0], torch.tensor([0.0, 0, 0, 1, 1, 0, 0, 0]))
        assert not edge_band(torch.ones(1, 1, 8, 8), 2).any()
        assert not edge_band(torch.zeros(1, 1, 8, 8), 2).any()

    def test_a_step_at_the_mask_edge(self):
        """Left half 0.2, right half 0.6, the mask the left half of 16 columns: one column of
        gradient 0.4, inside a band of 2 x 2 columns -> -0.4 / 4; flat elsewhere."""
        images = torch.full((1, 3, 16, 16), 0.6)
        images[..., :8] = 0.2
        masks = torch.zeros(1, 1, 16, 16)
        masks[..., :8] = 1
        score = seam_smoothness(images, ["a"], masks, images, half_width=2)
        torch.testing.assert_close(score, torch.tensor([-0.1]))

    def test_smooth_continuation_and_no_edge_score_zero(self):
        flat = torch.full((2, 3, 16, 16), 0.3)
        _, masks = images_and_masks()
        assert torch.equal(seam_smoothness(flat, ["", ""], masks, flat), torch.zeros(2))
        noisy = torch.rand(2, 3, 16, 16)
        for mask in (torch.zeros_like(masks), torch.ones_like(masks)):
            assert torch.equal(seam_smoothness(noisy, ["", ""], mask, noisy), torch.zeros(2))


class TestParse:
    def test_names_weights_and_user_functions(self):
        terms = parse_reward_spec("background, seam:0.5,my_rewards.pick:score:2")
        assert terms == [
            RewardTerm("background", 1.0, "background"),
            RewardTerm("seam", 0.5, "seam"),
            RewardTerm("score", 2.0, "my_rewards.pick:score"),
        ]
        assert parse_reward_spec("pkg:fn") == [RewardTerm("fn", 1.0, "pkg:fn")]

    @pytest.mark.parametrize(
        "spec,message",
        [
            ("", "empty item"),
            ("background,,seam", "empty item"),
            ("sharpness", "unknown reward 'sharpness'; built in: background, seam, clip"),
            ("a:b:c:d", "expected name"),
            ("background:inf", "weight must be finite"),
            ("seam,seam:2", "seam given more than once"),
        ],
    )
    def test_refused(self, spec, message):
        with pytest.raises(ValueError, match=message):
            parse_reward_spec(spec)


USER_REWARDS = """
import torch

def brightness(images, prompts, masks, sources):
    return images.mean(dim=(1, 2, 3))

def broken(images, prompts, masks, sources):
    raise ConnectionError("reward server unreachable")

def one_number(images, prompts, masks, sources):
    return torch.tensor(1.0)

def not_a_number(images, prompts, masks, sources):
    return torch.full((images.shape[0],), float("nan"))

def a_list(images, prompts, masks, sources):
    return [0.0] * images.shape[0]
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_for_tests.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards_for_tests"


class TestRewards:
    def test_weighted_total_and_each_term(self, user_module):
        sources, masks = images_and_masks()
        images = sources + 0.1 * (1 - masks)
        rewards = Rewards(f"background:2,{user_module}:brightness:0.5", RewardOptions(), "cpu")
        total, terms = rewards(images, ["a", "b"], masks, sources)
        assert terms.keys() == {"background", "brightness"}
        torch.testing.assert_close(terms["brightness"], images.mean(dim=(1, 2, 3)))
        torch.testing.assert_close(total, 2 * terms["background"] + 0.5 * terms["brightness"])

    @pytest.mark.parametrize(
        "function,message",
        [
            ("broken", r"reward 'broken' \(.*:broken\) failed: ConnectionError: reward server"),
            ("one_number", r"reward 'one_number' .* returned shape \[\] for 2 images"),
            ("not_a_number", r"reward 'not_a_number' .* returned non-finite scores"),
            ("a_list", r"reward 'a_list' .* returned list, not a tensor of 2 scores"),
        ],
    )
    def test_failure_is_an_error_naming_the_reward(self, user_module, function, message):
        sources, masks = images_and_masks()
        rewards = Rewards(f"background,{user_module}:{function}", RewardOptions(), "cpu")
        with pytest.raises(RewardError, match=message):
            rewards(sources, ["a", "b"], masks, sources)

    def test_unknown_module_or_function(self, user_module):
        with pytest.raises(ValueError, match="cannot import 'no_such_reward_module'"):
            Rewards("no_such_reward_module:score", RewardOptions(), "cpu")
        with pytest.raises(ValueError, match=f"{user_module} has no callable 'missing'"):
            Rewards(f"{user_module}:missing", RewardOptions(), "cpu")

    def test_seam_band_option(self):
        images = torch.full((1, 3, 16, 16), 0.6)
        images[..., :8] = 0.2
        masks = torch.zeros(1, 1, 16, 16)
        masks[..., :8] = 1
        _, terms = Rewards("seam", RewardOptions(seam_half_width=1), "cpu")(
            images, ["a"], masks, images
        )
        torch.testing.assert_close(terms["seam"], torch.tensor([-0.2]))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random two-tower CLIP with the suite's tiny tokenizer, 32x32 crops, saved to disk."""
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_clip_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


class TestClipCropScore:
    def test_scores_the_mask_box_crop(self, tiny_clip):
        """The score of an image with a mask box equals the score of the box's contents given
        as a whole image with a full mask; outside the box nothing matters."""
        score = ClipCropScore(tiny_clip)
        g = torch.Generator().manual_seed(0)
        patch = torch.rand(1, 3, 12, 20, generator=g)
        images = torch.rand(1, 3, 48, 48, generator=g)
        images[..., 10:22, 5:25] = patch
        masks = torch.zeros(1, 1, 48, 48)
        masks[..., 10:22, 5:25] = 1
        masks[..., 14, 9] = 0  # a hole inside the box changes nothing
        prompts = ["a red ball"]
        boxed = score(images, prompts, masks, images)
        whole = score(patch, prompts, torch.ones(1, 1, 12, 20), patch)
        torch.testing.assert_close(boxed, whole)
        elsewhere = images.clone()
        elsewhere[..., 30:, 30:] = 0
        torch.testing.assert_close(score(elsewhere, prompts, masks, images), boxed)
        assert boxed.shape == (1,) and -1 <= boxed.item() <= 1

    def test_is_clips_cosine_similarity(self, tiny_clip):
        """Against CLIP's own towers on the crop normalised by hand."""
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        masks = torch.zeros(2, 1, 32, 32)  # empty: the whole image
        prompts = ["a red ball", "a blue box"]
        model = CLIPModel.from_pretrained(tiny_clip).eval()
        processor = CLIPImageProcessor.from_pretrained(tiny_clip)
        mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        pixels = (mask_box_crops(images, masks > 0.5, (32, 32)) - mean) / std
        tokenizer = tiny_clip_tokenizer()
        tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            image_features = model.get_image_features(pixel_values=pixels).pooler_output
            text_features = model.get_text_features(**tokens).pooler_output
        expected = F.cosine_similarity(image_features, text_features, dim=-1)
        torch.testing.assert_close(
            ClipCropScore(tiny_clip)(images, prompts, masks, images), expected
        )

    def test_through_the_reward_flag(self, tiny_clip):
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        masks = torch.ones(2, 1, 32, 32)
        rewards = Rewards("clip:2", RewardOptions(clip_model=str(tiny_clip)), "cpu")
        total, terms = rewards(images, ["a red ball", "a red ball"], masks, images)
        torch.testing.assert_close(total, 2 * terms["clip"])
        assert terms["clip"][0] != terms["clip"][1]
        with pytest.raises(ValueError, match="needs --clip_reward_model"):
            Rewards("clip", RewardOptions(), "cpu")
