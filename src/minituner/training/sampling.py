"""Data order for training: a stateless, resumable sampler and the batch source built on it.

The sampler maps a step number straight to the rows of that step (each epoch is a seeded
permutation), so resuming at step k needs no saved iterator state and a killed run resumes on
exactly the batches it would have seen. ``rank``/``world_size`` split every global batch into
disjoint per-process slices, which is all a distributed sampler has to add.
"""

from __future__ import annotations

import torch

from minituner.course.data import collate_sequences


class EpochSampler:
    """Indices of the rows of each step: epoch ``e`` is a permutation seeded by (seed, e)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        global_batch = batch_size * world_size
        if n_items < global_batch:
            raise ValueError(
                f"{n_items} training rows cannot fill one batch of {global_batch} "
                f"(batch_size {batch_size} x world_size {world_size})"
            )
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = n_items // global_batch  # the last partial batch is dropped
        self._cache: tuple = (-1, None)

    def _permutation(self, epoch: int) -> list:
        if self._cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n_items, generator=generator).tolist())
        return self._cache[1]

    def indices(self, step: int) -> list:
        """This process's row indices for (0-based) batch number ``step``."""
        epoch, within = divmod(step, self.batches_per_epoch)
        start = (within * self.world_size + self.rank) * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]


class MixedBatches:
    """Batch ``k`` = SFT rows from one sampler plus replay rows (KL-flagged) from another."""

    def __init__(self, sft: list, replay: list, sft_rows: int, replay_rows: int, seed: int,
                 pad_id: int, rank: int = 0, world_size: int = 1):
        self.sft, self.replay, self.pad_id = sft, replay, pad_id
        self.sft_sampler = EpochSampler(len(sft), sft_rows, seed, rank, world_size)
        self.replay_sampler = (
            EpochSampler(len(replay), replay_rows, seed + 1, rank, world_size)
            if replay_rows > 0 else None
        )

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per pass over the SFT rows."""
        return self.sft_sampler.batches_per_epoch

    def __call__(self, micro_step: int) -> dict:
        rows = [self.sft[i] for i in self.sft_sampler.indices(micro_step)]
        flags = [False] * len(rows)
        if self.replay_sampler is not None:
            extra = [self.replay[i] for i in self.replay_sampler.indices(micro_step)]
            rows += extra
            flags += [True] * len(extra)
        return collate_sequences(rows, self.pad_id, flags)
