"""Aspect-ratio buckets, fitting an image to its bucket, and a bucketed batch sampler.

Sizes are ``(height, width)`` throughout. Bucket sides are multiples of 16: the VAE downsamples
by 8 and FLUX packs 2x2 latent patches, so the latent grid must have even sides.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Sampler


def make_buckets(
    resolution: int, multiple: int = 16, max_aspect: float = 2.0
) -> list[tuple[int, int]]:
    """``(height, width)`` buckets of area just under ``resolution**2``, sorted, no duplicates.

    For every short side ``s`` (a multiple of ``multiple``, up to ``resolution``) the long side is
    the largest multiple of ``multiple`` keeping the area at most ``resolution**2``, so each
    bucket's area is within one ``multiple``-wide strip of it (``area > R**2 * (1 - multiple/R)``).
    Landscape buckets and their transposes are both included, so portrait and landscape images are
    treated alike; aspect ratios lie in ``[1 / max_aspect, max_aspect]``; ``(R, R)`` is included.

    Raises:
        ValueError: ``resolution`` is not a positive multiple of ``multiple`` or ``max_aspect < 1``.
    """
    if multiple <= 0 or resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple}, got {resolution}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    area = resolution * resolution
    buckets = set()
    for short in range(multiple, resolution + 1, multiple):
        long = area // short // multiple * multiple
        if long / short <= max_aspect:
            buckets.update({(short, long), (long, short)})
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``height / width`` in log scale.

    Log scale makes 2:1 and 1:2 equally far from 1:1; ties go to the first bucket listed.
    """
    aspect = math.log(height / width)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))


def fit_to_bucket(
    image: Image.Image,
    size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """Scale ``image`` to cover ``size = (h, w)`` and centre-crop it to exactly ``(h, w)``.

    The scale is ``max(h / H, w / W)``. The centred source region is cropped and resized in one
    call (PIL's ``box``), so no intermediate size is rounded and any two images of one size get
    exactly the same geometric transform whatever ``resample`` is. Use LANCZOS for images
    (diffusers' ``VaeImageProcessor`` default) and BILINEAR for 0..255 masks, thresholded after.
    """
    height, width = size
    source_width, source_height = image.size
    scale = max(height / source_height, width / source_width)
    crop_width, crop_height = width / scale, height / scale
    left = (source_width - crop_width) / 2
    top = (source_height - crop_height) / 2
    box = (left, top, left + crop_width, top + crop_height)
    return image.resize((width, height), resample, box=box)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices from one bucket each, deterministic, sharded and resumable.

    Args:
        buckets_of_items: bucket id of every dataset item (``EditPairDataset.bucket_of_items``).
        batch_size: items per batch (per rank).
        seed: with the epoch, the only source of randomness; the order is a pure function of
            ``(seed, epoch)`` drawn from a local NumPy generator, so torch's and NumPy's global
            RNG states are never touched and every rank computes the same global order.
        num_replicas, rank: data-parallel world size and this process's rank.
        gradient_accumulation_steps: each rank's batch count is made a multiple of it, so an
            epoch never ends in the middle of an accumulation.
        shuffle: shuffle items within buckets and batches across buckets each epoch.
        drop_last: drop each bucket's last partial batch instead of keeping it.
        repeats: how many times each item is drawn per epoch (several data sets, each with its
            repeats); None: once each.

    Batches are dealt round-robin to ranks. When their count is not a multiple of
    ``num_replicas * gradient_accumulation_steps``, batches from the start of the epoch's order
    are repeated, so every rank runs ``len(self)`` steps and no rank waits on a collective the
    others never reach; ``repeated_batches`` says how many (40 items, batch 1, 8 ranks,
    accumulation 4: 24).
    """

    def __init__(
        self,
        buckets_of_items: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        gradient_accumulation_steps: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        repeats: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        if gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not buckets_of_items:
            raise ValueError("no items to sample")
        if repeats is None:
            repeats = [1] * len(buckets_of_items)
        if len(repeats) != len(buckets_of_items) or min(repeats) < 1:
            raise ValueError("repeats needs a count >= 1 for every item")
        members: dict[int, list[int]] = {}
        for index, (bucket, count) in enumerate(zip(buckets_of_items, repeats, strict=True)):
            members.setdefault(int(bucket), []).extend([index] * count)
        self._members = [members[bucket] for bucket in sorted(members)]
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.drop_last = drop_last
        rounding = math.floor if drop_last else math.ceil
        total = sum(rounding(len(group) / batch_size) for group in self._members)
        if total == 0:
            raise ValueError(
                f"no batches: {len(buckets_of_items)} items, and no bucket holds a full batch of "
                f"{batch_size} (drop_last=True); lower batch_size or set drop_last=False"
            )
        group = num_replicas * gradient_accumulation_steps
        self._batches_per_rank = math.ceil(total / group) * gradient_accumulation_steps
        self.repeated_batches = self._batches_per_rank * num_replicas - total
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; start this rank at its ``start_batch``-th batch (to resume).

        ``len(self)`` then counts the batches left. The next ``set_epoch`` call resets it.
        """
        if not 0 <= start_batch <= self._batches_per_rank:
            raise ValueError(
                f"start_batch must be in [0, {self._batches_per_rank}], got {start_batch}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def _global_batches(self) -> list[list[int]]:
        """Every rank's batches for the current epoch, padded to ``len * num_replicas``."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for group in self._members:
            order = rng.permutation(group).tolist() if self.shuffle else group
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        shortfall = self._batches_per_rank * self.num_replicas - len(batches)
        return batches + [batches[j % len(batches)] for j in range(shortfall)]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._global_batches()[self.rank :: self.num_replicas]
        yield from mine[self.start_batch :]

    def __len__(self) -> int:
        return self._batches_per_rank - self.start_batch

    @property
    def batches_per_epoch(self) -> int:
        """This rank's batches in a whole epoch, whatever ``start_batch`` is."""
        return self._batches_per_rank
