"""Data order for training: a stateless, resumable sampler and the batch source built on it.

The sampler maps a step number straight to the rows of that step (each epoch is a seeded
permutation), so resuming at step k needs no saved iterator state and a killed run resumes on
exactly the batches it would have seen. ``rank``/``world_size`` split every global batch into
disjoint per-process slices, which is all a distributed sampler has to add.
"""

from __future__ import annotations

import torch

from minituner.training.packing import collate_packed


def collate(sequences: list, pad_id: int, kl_rows: list | None = None) -> dict:
    """Right-padded next-token batch: input_ids, targets, target_mask, kl_mask.

    A sequence is a token-id list (every next token is a target) or ``{"ids", "mask"}`` (only
    the flagged positions are). ``kl_mask`` marks the targets of the rows flagged in
    ``kl_rows``: the replay rows a KL term keeps close to the base. Packed rows
    (``{"pack": [...]}``) go to :func:`minituner.training.packing.collate_packed`.
    """
    if any(isinstance(s, dict) and "pack" in s for s in sequences):
        return collate_packed(sequences, pad_id, kl_rows)
    rows = [s if isinstance(s, dict) else {"ids": s, "mask": [True] * (len(s) - 1)}
            for s in sequences]
    width = max(len(s["ids"]) for s in rows) - 1
    shape = (len(rows), width)
    batch = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.long),
        "targets": torch.full(shape, pad_id, dtype=torch.long),
        "target_mask": torch.zeros(shape, dtype=torch.bool),
    }
    for row, seq in enumerate(rows):
        n = len(seq["ids"]) - 1
        batch["input_ids"][row, :n] = torch.tensor(seq["ids"][:-1])
        batch["targets"][row, :n] = torch.tensor(seq["ids"][1:])
        batch["target_mask"][row, :n] = torch.tensor(seq["mask"], dtype=torch.bool)
    flags = torch.tensor(kl_rows or [False] * len(rows), dtype=torch.bool)
    batch["kl_mask"] = batch["target_mask"] & flags[:, None]
    return batch


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
    """Batch ``k`` = SFT rows from one sampler plus replay rows (KL-flagged) from another.

    Each batch also carries ``micro_step`` (``k``), so a loss can seed what it draws (dropout)
    from the step alone, not from whatever the RNG drew before.
    """

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
        return {**collate(rows, self.pad_id, flags), "micro_step": micro_step}


class StreamEpochSampler(EpochSampler):
    """Pretraining's data order: epoch ``e`` is the (e+1)-th permutation drawn from ONE
    generator seeded with ``seed`` (the order base runs have always used, so the same seed
    keeps giving the same base). Still a function of the step: a permutation is redrawn on
    demand, and the current epoch's is cached."""

    def __init__(self, n_items: int, batch_size: int, seed: int):
        super().__init__(n_items, batch_size, seed)
        self._generator = torch.Generator()

    def _permutation(self, epoch: int) -> list:
        drawn, order = self._cache  # the last epoch drawn from the stream, and its order
        if drawn < 0 or epoch < drawn:  # nothing drawn yet, or an earlier epoch: restart
            self._generator.manual_seed(self.seed)
            drawn = -1
        while drawn < epoch:
            order = torch.randperm(self.n_items, generator=self._generator).tolist()
            drawn += 1
        self._cache = (drawn, order)
        return order


class SequenceBatches:
    """Batch ``k`` of token-id sequences in :class:`StreamEpochSampler` order (pretraining)."""

    def __init__(self, sequences: list, batch_size: int, seed: int, pad_id: int):
        self.sequences, self.pad_id = sequences, pad_id
        self.sampler = StreamEpochSampler(len(sequences), batch_size, seed)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per pass over the sequences (the last partial batch is dropped)."""
        return self.sampler.batches_per_epoch

    def __call__(self, step: int) -> dict:
        return collate([self.sequences[i] for i in self.sampler.indices(step)], self.pad_id)
