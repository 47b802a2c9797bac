"""``training.grpo.rewards``: built-in scores at analytic values, ``--reward`` parsing, user
rewards, failures that stop training naming the reward, and the CLIP crop score on a tiny random
CLIP saved and loaded with ``from_pretrained``."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from training.grpo.config import (
    BUILTIN_REWARD_NAMES,
    DEFAULT_REWARD,
    RewardTerm,
    parse_reward_spec,
)
from training.grpo.policy import group_advantages
from training.grpo.rewards import (
    BUILTIN_REWARDS,
    ClipCropScore,
    RewardError,
    RewardOptions,
    Rewards,
    background_consistency,
    edge_band,
    fill_statistics,
    mask_box_crops,
    seam_smoothness,
)
from worlds.tiny_models import tiny_clip_tokenizer


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


def texture(size: int = 64, seed: int = 0) -> torch.Tensor:
    """``[1, 3, size, size]`` in [0, 1]: a stationary texture (random waves of 3 to 10 pixels
    plus a little pixel noise), alike in every part of the image, as a background to fill."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    image = torch.full((3, size, size), 0.5)
    for _ in range(6):
        period = 3 + 7 * torch.rand(1, generator=g)
        angle, phase = 3.1416 * torch.rand(2, generator=g)
        wave = torch.sin(2 * 3.1416 * (x * angle.cos() + y * angle.sin()) / period + 6 * phase)
        image = image + 0.06 * torch.rand(3, 1, 1, generator=g) * wave
    image = image + 0.02 * torch.randn(3, size, size, generator=g)
    return image.clamp(0, 1)[None]


def fills(source: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The source with its masked square filled in the ways GRPO must not prefer to it."""
    g = torch.Generator().manual_seed(1)
    inside = mask.bool().expand_as(source)

    def filled(values: torch.Tensor) -> torch.Tensor:
        return torch.where(inside, values, source)

    mean_colour = (source * mask).sum(dim=(2, 3), keepdim=True) / mask.sum()
    return {
        "perfect": source,
        "grey hole": filled(torch.full_like(source, 0.5)),
        "noise": filled((source + 0.2 * (torch.rand(source.shape, generator=g) - 0.5)).clamp(0, 1)),
        "blur": filled(F.avg_pool2d(source, 7, stride=1, padding=3, count_include_pad=False)),
        "flat mean colour": filled(mean_colour.expand_as(source)),
    }


def shipped_reward_mixes() -> set[str]:
    """--reward of every shipped GRPO config, and the flag's default."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    mixes = {yaml.safe_load(path.read_text())["reward"] for path in configs.glob("*grpo*.yaml")}
    return mixes | {DEFAULT_REWARD}


@pytest.fixture(scope="module")
def case():
    """A 64x64 texture, a 24x24 square mask in its middle, and the candidate fills."""
    source = texture()
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:44, 20:44] = 1
    return source, mask, fills(source, mask)


class TestTheFillIsJudged:
    """Constructed fills of a square hole in a stationary texture: every shipped mix of rewards
    ranks the true continuation above a grey hole, noise, a blur and a flat fill."""

    @pytest.mark.parametrize("mix", sorted(shipped_reward_mixes()))
    def test_every_shipped_mix_prefers_the_true_fill(self, case, mix):
        source, mask, candidates = case
        rewards = Rewards(mix, RewardOptions(), "cpu")
        scores = {
            name: float(rewards(image, ["fill the hole"], mask, source)[0])
            for name, image in candidates.items()
        }
        worse = {name: score for name, score in scores.items() if name != "perfect"}
        assert all(score < scores["perfect"] for score in worse.values()), scores

    @pytest.mark.parametrize("reward", ["seam", "fill"])
    def test_each_fill_reward_alone_prefers_the_true_fill(self, case, reward):
        source, mask, candidates = case
        score = {
            name: float(Rewards(reward, RewardOptions(), "cpu")(image, [""], mask, source)[0])
            for name, image in candidates.items()
        }
        assert max(score, key=score.get) == "perfect", score

    def test_more_noise_in_the_fill_gets_lower_advantages(self, case):
        """A group differing only in the fill's noise amplitude (0, 0.05, 0.1, 0.2): the
        advantages fall as the noise grows (the old seam reward rose with it)."""
        source, mask, _ = case
        g = torch.Generator().manual_seed(2)
        noise = torch.rand(source.shape, generator=g) - 0.5
        group = torch.cat([(source + a * noise * mask).clamp(0, 1) for a in (0.0, 0.05, 0.1, 0.2)])
        total, _ = Rewards(DEFAULT_REWARD, RewardOptions(), "cpu")(
            group, [""] * 4, mask.expand(4, -1, -1, -1), source.expand(4, -1, -1, -1)
        )
        advantages = group_advantages(total, 4, clip=5.0)
        assert (advantages.diff() < 0).all(), advantages

    def test_fill_statistics_known_values(self):
        """Ring and fill of constant colours: the distance of the means alone, per channel."""
        source = torch.full((1, 3, 16, 16), 0.2)
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., 6:10, 6:10] = 1
        image = torch.where(mask.bool(), 0.5, source)
        score = fill_statistics(image, [""], mask, source, ring_width=2)
        # Means differ by 0.3 in 3 channels; flat regions, but the fill's edge pixels see the
        # step to the source in their forward differences: 2 of 4 columns and rows.
        gradient = torch.zeros(1, 1, 16, 16)
        gradient[..., 6:10, 9] = 0.3
        gradient[..., 9, 6:10] = 0.3
        gradient[..., 9, 9] = 0.3 * 2**0.5
        texture_of_fill = float((gradient * mask).sum() / mask.sum())
        expected = -(3 * 0.3**2 + texture_of_fill**2)
        torch.testing.assert_close(score, torch.tensor([expected]))
        empty, full = torch.zeros_like(mask), torch.ones_like(mask)
        for other in (empty, full):
            assert fill_statistics(image, [""], other, source).item() == 0


class TestParse:
    def test_the_flag_grammar_knows_every_built_in_reward(self):
        # The grammar lives apart from the rewards, so --help loads without torch.
        assert list(BUILTIN_REWARD_NAMES) == list(BUILTIN_REWARDS)

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
            (
                "sharpness",
                "unknown reward 'sharpness'; built in: background, seam, fill, clip, preference",
            ),
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


class TestPreferenceScore:
    def test_logit_scale_times_the_whole_images_clip_similarity(self, tiny_clip):
        """A PickScore-style folder (CLIP weights and processor): the whole image is scored,
        whatever the mask, at the model's logit scale."""
        images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))
        prompts = ["a red ball", "a blue box"]
        masks = torch.zeros(2, 1, 48, 40)
        masks[..., 5:9, 5:9] = 1
        options = RewardOptions(preference_model=str(tiny_clip))
        total, terms = Rewards("preference", options, "cpu")(images, prompts, masks, images)
        model = CLIPModel.from_pretrained(tiny_clip).eval()
        whole = ClipCropScore(tiny_clip)(images, prompts, torch.zeros_like(masks), images)
        expected = model.logit_scale.exp().item() * whole
        torch.testing.assert_close(terms["preference"], expected)
        torch.testing.assert_close(total, expected)
        with pytest.raises(ValueError, match="needs --preference_reward_model"):
            Rewards("preference", RewardOptions(), "cpu")
