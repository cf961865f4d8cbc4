"""Sample packing: several short examples in one full-length row, kept apart.

A packed row concatenates examples; each keeps its own position ids (0, 1, 2, ... from its
first token) and its own segment id, and :func:`block_causal_mask` lets a token attend only to
earlier tokens of the same segment, so every example computes what it computes alone. The loss
mask is the examples' own masks side by side: target i of an example predicts its own
``ids[i + 1]``, so no target crosses from one example into the next (the first token of an
example is an input, never a target of the previous one).

Packing is deterministic first-fit decreasing: examples sorted by length (longest first, ties
by their order in the data), each into the first row with room, rows in the order they were
opened. It runs once over the training set; the sampler then shuffles the packed rows each
epoch. Nothing here knows a model family.
"""

from __future__ import annotations

import torch

__all__ = ["PAD_SEGMENT", "block_causal_mask", "collate_packed", "input_length", "is_packed",
           "pack_lengths", "pack_sequences", "padding_stats", "unpack_rows"]

PAD_SEGMENT = -1  # segment id of the padding at the end of a packed row


def input_length(sequence) -> int:
    """Input tokens of one sequence (a token-id list or {"ids", "mask"}): len(ids) - 1."""
    ids = sequence["ids"] if isinstance(sequence, dict) else sequence
    return len(ids) - 1


def pack_lengths(lengths: list, capacity: int) -> list:
    """First-fit decreasing: lists of indices into ``lengths`` whose sums fit ``capacity``."""
    if capacity < 1:
        raise ValueError(f"packing capacity must be >= 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} input tokens, more "
                         f"than the packed row's {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list = []
    room: list = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_sequences(sequences: list, capacity: int) -> list:
    """Packed rows ({"pack": [sequence, ...]}) of at most ``capacity`` input tokens each."""
    rows = pack_lengths([input_length(s) for s in sequences], capacity)
    return [{"pack": [sequences[i] for i in row]} for row in rows]


def unpack_rows(rows: list) -> list:
    """The examples of ``rows``: each packed row ({"pack": [...]}) gives its sequences back."""
    return [seq for row in rows
            for seq in (row["pack"] if isinstance(row, dict) and "pack" in row else [row])]


def is_packed(batch: dict) -> bool:
    """True for a batch made by :func:`collate_packed` (it carries segment ids)."""
    return "segment_ids" in batch


def _as_dict(sequence) -> dict:
    if isinstance(sequence, dict):
        return sequence
    return {"ids": sequence, "mask": [True] * (len(sequence) - 1)}


def collate_packed(rows: list, pad_id: int, kl_rows: list | None = None) -> dict:
    """Right-padded batch of packed rows: input_ids, targets, target_mask, kl_mask,
    position_ids (restarting at 0 in each example) and segment_ids (the example's index in its
    row; :data:`PAD_SEGMENT` on padding)."""
    packs = [[_as_dict(s) for s in row["pack"]] for row in rows]
    width = max(sum(len(s["ids"]) - 1 for s in pack) for pack in packs)
    shape = (len(packs), width)
    batch = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.long),
        "targets": torch.full(shape, pad_id, dtype=torch.long),
        "target_mask": torch.zeros(shape, dtype=torch.bool),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "segment_ids": torch.full(shape, PAD_SEGMENT, dtype=torch.long),
    }
    for row, pack in enumerate(packs):
        start = 0
        for segment, seq in enumerate(pack):
            n = len(seq["ids"]) - 1
            span = slice(start, start + n)
            batch["input_ids"][row, span] = torch.tensor(seq["ids"][:-1])
            batch["targets"][row, span] = torch.tensor(seq["ids"][1:])
            batch["target_mask"][row, span] = torch.tensor(seq["mask"], dtype=torch.bool)
            batch["position_ids"][row, span] = torch.arange(n)
            batch["segment_ids"][row, span] = segment
            start += n
        batch["position_ids"][row, start:] = torch.arange(width - start)
    flags = torch.tensor(kl_rows or [False] * len(packs), dtype=torch.bool)
    batch["kl_mask"] = batch["target_mask"] & flags[:, None]
    return batch


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    """Additive (batch, 1, seq, seq) attention mask: 0 where query i may read key j (j <= i,
    same segment), the dtype's lowest value elsewhere. Padding reads only padding, so no row of
    scores is empty."""
    seq = segment_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (same & causal)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def padding_stats(widths_and_rows: list) -> dict:
    """Padding of a run's batches from (batch width, [tokens of each row]) pairs:
    {"tokens", "slots", "padding_fraction"} (slots = rows x width summed over batches)."""
    tokens = sum(sum(rows) for _, rows in widths_and_rows)
    slots = sum(width * len(rows) for width, rows in widths_and_rows)
    return {"tokens": tokens, "slots": slots,
            "padding_fraction": 1 - tokens / slots if slots else 0.0}
