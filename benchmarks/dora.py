"""DoRA training step: minituner DoRA vs minituner LoRA vs PEFT DoRA vs PEFT LoRA.

Model: the GPT-2-small shape of ``gpt2_shape.py`` (random init, seed 0, nn.Linear layers), r = 8,
alpha 16 on c_attn, c_proj and c_fc, AdamW lr 1e-4, batch 2 x 64 random tokens (short on
purpose: the machine is shared). All four models are built from the same seed with the same
lora_A (PEFT's are overwritten with minituner's; B = 0 and m = ||W||_c on both sides), so
their first losses must agree. The four run in one process and alternate step by step (the
order rotates), so load that comes and goes hits all alike; step ratios are medians of the
per-step ratios.

Training-state bytes (tensor accounting, as training/accounting.py): trainable parameters,
their gradients, AdamW's two moments, and the tensors autograd saved for the backward that are
still alive when the forward ends (a saved-tensors hook keeps weak references; PEFT's DoRA
builds a throwaway graph for ``lora_B(lora_A(eye))`` whose saved tensors die with it, so they
are not counted; ``saved_ever_bytes`` counts them too, for reference). "extra" is DoRA minus
LoRA of the same library.

    .venv/bin/python benchmarks/dora.py            # 2 warm-up + 4 timed steps each
    .venv/bin/python benchmarks/dora.py --quick    # 1 + 2

Writes benchmarks/results/dora.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

from bench_common import load_average, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "dora.json"
BATCH, SEQ, RANK, ALPHA, LR = 2, 64, 8, 16.0, 1e-4
NAMES = ("minituner-lora", "minituner-dora", "peft-lora", "peft-dora")
STEP_GOAL, EXTRA_GOAL = 1.0, 0.85


def build(name: str, init: dict | None):
    """A fresh GPT-2-small-shape model with the adapter ``name`` names."""
    import peft
    import torch
    from gpt2_shape import TARGETS, GPT2Shape

    from minituner.lora import apply_lora

    torch.manual_seed(0)
    model = GPT2Shape()
    library, method = name.split("-")
    if library == "minituner":
        return apply_lora(model, TARGETS, r=RANK, alpha=ALPHA, init="kaiming", seed=0,
                          use_dora=method == "dora")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                             use_dora=method == "dora")
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("lora_A.default.weight"):
                path = key.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
                param.copy_(init[path])
    return model


def batches(steps: int) -> list:
    """Seeded random (tokens, targets) batches."""
    import torch

    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50257, (2, BATCH, SEQ), generator=generator) for _ in range(steps)]


def state_bytes(model, optimizer, batch) -> dict:
    """Trainable, gradient, optimizer-state and saved-activation bytes of one step."""
    import torch

    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    live, ever = [], {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            ever[storage.data_ptr()] = storage.nbytes()
            live.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(batch[0], batch[1])
    alive = {}
    for ref in live:
        tensor = ref()
        if tensor is not None:
            alive[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    loss.backward()
    optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    nbytes = sum(p.numel() * p.element_size() for p in trainable)
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                  for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    out = {"trainable_bytes": nbytes, "gradient_bytes": nbytes, "optimizer_state_bytes": moments,
           "saved_activation_bytes": sum(alive.values()), "saved_ever_bytes": sum(ever.values())}
    out["total_bytes"] = sum(out[k] for k in ("trainable_bytes", "gradient_bytes",
                                              "optimizer_state_bytes", "saved_activation_bytes"))
    optimizer.zero_grad(set_to_none=True)
    return out


def measure(warmup: int, timed: int) -> dict:
    """Alternate the four models' steps; times, losses and training-state bytes."""
    import torch

    torch.set_num_threads(1)
    base = build("minituner-lora", None)
    init = {name.removesuffix(".lora_A"): p.detach().clone()
            for name, p in base.named_parameters() if name.endswith("lora_A")}
    models = {name: base if name == "minituner-lora" else build(name, init) for name in NAMES}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
                  for name, m in models.items()}
    data = batches(warmup + timed + 1)
    memory = {name: state_bytes(models[name], optimizers[name], data[0]) for name in NAMES}
    times: dict = {name: [] for name in NAMES}
    losses: dict = {name: [] for name in NAMES}
    for step in range(warmup + timed):
        order = NAMES[step % 4:] + NAMES[:step % 4]
        for name in order:
            tokens, targets = data[step + 1]
            start = time.perf_counter()
            _, loss = models[name](tokens, targets)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
            losses[name].append(float(loss))
    return {"times": times, "losses": losses, "memory": memory}


def summarise(raw: dict) -> dict:
    times, memory = raw["times"], raw["memory"]
    ratio = [a / b for a, b in zip(times["minituner-dora"], times["peft-dora"], strict=True)]
    ours_extra = memory["minituner-dora"]["total_bytes"] - memory["minituner-lora"]["total_bytes"]
    peft_extra = memory["peft-dora"]["total_bytes"] - memory["peft-lora"]["total_bytes"]
    step_ratio = statistics.median(ratio)
    extra_ratio = ours_extra / peft_extra
    return {
        "step_s": {name: statistics.median(v) for name, v in times.items()},
        "step_s_min_max": {name: [min(v), max(v)] for name, v in times.items()},
        "dora_step_ratio_vs_peft_dora": step_ratio,
        "dora_step_ratio_vs_minituner_lora": statistics.median(
            a / b for a, b in zip(times["minituner-dora"], times["minituner-lora"], strict=True)),
        "extra_bytes_over_lora": {"minituner": ours_extra, "peft": peft_extra},
        "extra_ratio": extra_ratio,
        "first_loss_max_diff": max(abs(raw["losses"][n][0] - raw["losses"]["minituner-lora"][0])
                                   for n in NAMES),
        "goals": {"step_ratio": {"goal": STEP_GOAL, "met": step_ratio <= STEP_GOAL},
                  "extra_ratio": {"goal": EXTRA_GOAL, "met": extra_ratio <= EXTRA_GOAL}},
    }


def table(record: dict) -> str:
    s, memory = record["summary"], record["memory"]
    lines = ["| configuration | step (s, median) | trainable + grads + AdamW (MB) | "
             "saved activations (MB) | total (MB) |", "|---|---|---|---|---|"]
    for name in NAMES:
        m = memory[name]
        weights = (m["trainable_bytes"] + m["gradient_bytes"] + m["optimizer_state_bytes"]) / 1e6
        lines.append(f"| {name} | {s['step_s'][name]:.3f} | {weights:.2f} | "
                     f"{m['saved_activation_bytes'] / 1e6:.2f} | {m['total_bytes'] / 1e6:.2f} |")
    lines.append("")
    goals = s["goals"]
    lines.append(f"DoRA step ratio minituner / PEFT: {s['dora_step_ratio_vs_peft_dora']:.2f} "
                 f"(goal <= 1.0: {'met' if goals['step_ratio']['met'] else 'NOT met'}); "
                 f"extra bytes over LoRA: minituner "
                 f"{s['extra_bytes_over_lora']['minituner'] / 1e6:.2f} MB, PEFT "
                 f"{s['extra_bytes_over_lora']['peft'] / 1e6:.2f} MB, ratio "
                 f"{s['extra_ratio']:.2f} (goal <= 0.85: "
                 f"{'met' if goals['extra_ratio']['met'] else 'NOT met'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    before = load_average()
    warmup, timed = (1, 2) if args.quick else (2, 4)
    raw = measure(warmup, timed)
    record = {"shape": {"model": "gpt2-small shape", "batch": BATCH, "seq": SEQ, "rank": RANK,
                        "alpha": ALPHA, "threads": 1, "warmup": warmup, "timed": timed},
              "load_average_before": before, **raw, "summary": summarise(raw)}
    write_results(args.out, record)
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
