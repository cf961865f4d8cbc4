"""Sample packing vs dynamic pad-to-longest batches: non-pad tokens per second of LoRA training.

Data: a long-tailed length distribution over a context of ``--context`` tokens: 90% of the
examples are shorter than a quarter of the context, 10% reach up to the full context (seeded
random token ids; every token is a target). Model: a small random-init transformers model
(Llama and GPT-2, 256 wide, 4 layers, vocab 512, fp32, CPU), LoRA r = 8 on every Linear, AdamW,
through minituner's own training loss (:func:`minituner.hf.finetune.make_hf_loss_fn`).

Both sides use batches of the same number of rows (``--batch``): unpacked rows are single
examples padded to the longest in the batch (what ``finetune`` does without ``--packing``);
packed rows hold several examples (first-fit decreasing into ``--context`` tokens, block-diagonal
attention, ``--packing``). The two sides alternate steps in one process, so load that comes and
goes on a shared machine hits both alike. Reported per side: non-pad tokens per second (median
over the timed steps) and the padding fraction of its batches; the goal is a ratio >= 1.5.
TRL's SFTTrainer is not compared: TRL is not installed here (it needs datasets, pandas and
pyarrow).

    .venv/bin/python benchmarks/packing.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from bench_common import load_average, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "packing.json"
GOAL = 1.5
ARCHS = ("llama", "gpt2")


def long_tailed_lengths(n: int, context: int, seed: int) -> list:
    """Example lengths (tokens, EOS included): 90% under context / 4, 10% up to the context."""
    rng = random.Random(seed)
    short = context // 4
    return [rng.randint(4, short - 1) if rng.random() < 0.9 else rng.randint(short, context + 1)
            for _ in range(n)]


def make_sequences(lengths: list, vocab: int, seed: int) -> list:
    rng = random.Random(seed + 1)
    return [{"ids": [rng.randrange(7, vocab) for _ in range(n)], "mask": [True] * (n - 1)}
            for n in lengths]


def build_model(arch: str, context: int):
    """A small random-init model with LoRA r = 8 on every Linear."""
    import torch
    from transformers import AutoModelForCausalLM

    from minituner.hf.models import ALL_LINEAR, apply_hf_lora
    from minituner.hf.toy import toy_config

    config = toy_config(arch, "tiny")
    if arch == "gpt2":
        config.n_embd, config.n_layer, config.n_inner, config.n_positions = 256, 4, 1024, context
    else:
        config.hidden_size, config.num_hidden_layers, config.intermediate_size = 256, 4, 512
        config.max_position_embeddings, config.head_dim = context, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    apply_hf_lora(model, ALL_LINEAR, r=8, alpha=16.0, seed=0)
    return model.train()


def run_arch(arch: str, args) -> dict:
    """Alternate packed and unpacked steps on one model; tokens per second and padding."""
    import torch

    from minituner.hf.finetune import make_hf_loss_fn
    from minituner.training.loop import build_optimizer
    from minituner.training.packing import pack_sequences
    from minituner.training.sampling import EpochSampler, collate

    sequences = make_sequences(long_tailed_lengths(args.examples, args.context, args.seed), 512,
                               args.seed)
    layouts = {"unpacked": sequences, "packed": pack_sequences(sequences, args.context)}
    model = build_model(arch, args.context)
    loss_fn = make_hf_loss_fn(model, torch.device("cpu"))
    optimizer = build_optimizer(model, lr=1e-4)
    samplers = {name: EpochSampler(len(rows), args.batch, args.seed)
                for name, rows in layouts.items()}
    record = {name: {"rows": len(rows), "tokens_per_s": [], "tokens": 0, "slots": 0}
              for name, rows in layouts.items()}
    for step in range(args.warmup + args.steps):
        order = list(layouts) if step % 2 == 0 else list(reversed(layouts))
        for name in order:
            batch = collate([layouts[name][i] for i in samplers[name].indices(step)], 0)
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, count = loss_fn(model, batch)
            (loss_sum / count).backward()
            optimizer.step()
            seconds = time.perf_counter() - started
            real = batch["input_ids"].numel() - _padding(batch)
            if step >= args.warmup:
                side = record[name]
                side["tokens_per_s"].append(real / seconds)
                side["tokens"] += real
                side["slots"] += batch["input_ids"].numel()
    out = {}
    for name, side in record.items():
        out[name] = {"rows": side["rows"],
                     "median_tokens_per_s": statistics.median(side["tokens_per_s"]),
                     "padding_fraction": 1 - side["tokens"] / side["slots"],
                     "tokens_timed": side["tokens"]}
    out["ratio"] = out["packed"]["median_tokens_per_s"] / out["unpacked"]["median_tokens_per_s"]
    out["goal_met"] = out["ratio"] >= GOAL
    return out


def _padding(batch: dict) -> int:
    """Padded slots of a batch: after each row's last real token."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] < 0).sum())
    real = batch["target_mask"].flip(-1).cumsum(-1).flip(-1) > 0
    return int((~real).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load_before = load_average()
    lengths = long_tailed_lengths(args.examples, args.context, args.seed)
    results = {}
    for arch in ARCHS:
        results[arch] = run_arch(arch, args)
        print(f"done {arch}", file=sys.stderr, flush=True)
    short = sum(n - 1 < args.context // 4 for n in lengths) / len(lengths)
    write_results(args.out, {
        "benchmark": "sample packing vs dynamic pad-to-longest batches, LoRA training step, CPU",
        "settings": vars(args) | {"out": str(args.out)},
        "share_under_quarter_context": short, "goal_ratio": GOAL, "results": results,
        "trl": "not installed (needs datasets, pandas, pyarrow); not compared",
        "load_average_before": load_before,
    })
    print(f"{args.examples} examples, {100 * short:.0f}% under {args.context // 4} of "
          f"{args.context} tokens; batches of {args.batch} rows; {args.steps} timed steps per "
          f"side; {args.threads} threads, fp32, LoRA r=8")
    print("| model | layout | rows | padding fraction | non-pad tokens/s | packed / unpacked |")
    print("|---|---|---|---|---|---|")
    for arch, result in results.items():
        for name in ("unpacked", "packed"):
            side = result[name]
            ratio = f"**{result['ratio']:.2f}x**" if name == "packed" else ""
            print(f"| {arch} | {name} | {side['rows']} | {side['padding_fraction']:.3f} "
                  f"| {side['median_tokens_per_s']:,.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
