"""Training-step time and peak memory: minituner LoRA / QLoRA against PEFT and PEFT + bitsandbytes.

Model: a random-init GPT-2-small shape (transformers GPT2Config, n_embd 768, 12 layers, 12 heads,
vocab 50257, every dropout 0), built once from a seed and saved with ``save_pretrained``; every
configuration loads that directory, so both sides start from the same weights. Batch 4 x 128
random tokens (the same seeded batches on both sides), LoRA r = 8, alpha 16 on every attention
and MLP layer (c_attn, attn.c_proj, c_fc, mlp.c_proj), AdamW lr 1e-4. PEFT's lora_A tensors are
overwritten with minituner's (B starts at zero on both), so the losses of the first steps must
agree.

Each configuration runs in its own process: peak RSS is that process's high-water mark (VmHWM,
imports included; ru_maxrss is recorded too). Two warm-up steps, then the median of the timed
steps with the min-max spread; the same thread count on every side. Then each minituner /
anchor pair runs once more in one process that loads both and alternates their steps (who
goes first alternates too): on a shared machine, load that comes and goes hits both sides of
that run alike, so the median of its per-step ratios is the step ratio the goals are judged
on; the own-process ratio is reported next to it.

    .venv/bin/python benchmarks/train_step.py                 # the 9 configurations (~5 min)
    .venv/bin/python benchmarks/train_step.py --quick         # 3 timed steps
    .venv/bin/python benchmarks/train_step.py --ablations     # each library change switched off
    .venv/bin/python benchmarks/train_step.py --only lora     # LoRA pairs only (or qlora)
    .venv/bin/python benchmarks/train_step.py --device cuda   # on a GPU (benchmarks/gpu.sh)

Writes benchmarks/results/train_step.json (or --out) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (
    load_average,
    run_json_child,
    vm_hwm_bytes,
    vm_rss_bytes,
    write_results,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train_step.json"
PLOT = HERE / "results" / "train_step.png"
TARGETS = ["c_attn", "c_proj", "c_fc"]  # c_proj: attention and MLP
BATCH, SEQ, VOCAB = 4, 128, 50257
RANK, ALPHA, LR = 8, 16.0, 1e-4
WARMUP = 2
LOSS_TOLERANCE = 1e-4
INIT_FILE = "lora_init.safetensors"


def _config(library: str, method: str, dtype: str, **options) -> dict:
    return {"library": library, "method": method, "dtype": dtype, "fused": True,
            "chunked_loss": True, "fused_gelu": True, **options}


CONFIGS = {
    "full-fp32": _config("torch", "full", "fp32"),
    "peft-lora-fp32": _config("peft", "lora", "fp32"),
    "minituner-lora-fp32": _config("minituner", "lora", "fp32"),
    "peft-lora-bf16": _config("peft", "lora", "bf16"),
    "minituner-lora-bf16": _config("minituner", "lora", "bf16"),
    "peft-bnb-qlora-fp32": _config("peft+bitsandbytes", "qlora", "fp32"),
    "minituner-qlora-fp32": _config("minituner", "qlora", "fp32"),
    "peft-bnb-qlora-bf16": _config("peft+bitsandbytes", "qlora", "bf16"),
    "minituner-qlora-bf16": _config("minituner", "qlora", "bf16"),
}
ABLATIONS = {  # one library change switched off at a time, to measure what it brings
    "minituner-lora-fp32-unfused": _config("minituner", "lora", "fp32", fused=False),
    "minituner-lora-fp32-plain-loss": _config("minituner", "lora", "fp32", chunked_loss=False),
    "minituner-qlora-fp32-unfused": _config("minituner", "qlora", "fp32", fused=False),
    "minituner-qlora-fp32-plain-loss": _config("minituner", "qlora", "fp32",
                                               chunked_loss=False),
    "minituner-lora-fp32-plain-gelu": _config("minituner", "lora", "fp32", fused_gelu=False),
    # every change off: the plain path, PEFT's arithmetic in another order (bf16 loss noise)
    "minituner-lora-bf16-plain": _config("minituner", "lora", "bf16", fused=False,
                                         chunked_loss=False, fused_gelu=False),
}
PAIRS = [  # (minituner, anchor, step goal, memory goal)
    ("minituner-lora-fp32", "peft-lora-fp32", 1.0, 0.85),
    ("minituner-lora-bf16", "peft-lora-bf16", 1.0, 0.85),
    ("minituner-qlora-fp32", "peft-bnb-qlora-fp32", 1.0, 0.75),
    ("minituner-qlora-bf16", "peft-bnb-qlora-bf16", 1.0, 0.75),
]


# ----------------------------------------------------------------------------- child side


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def prepare(directory: Path) -> dict:
    """Write the seeded GPT-2-small model and minituner's initial lora_A tensors."""
    import torch

    from minituner.hf import load_hf_model
    from minituner.hf.toy import write_toy_model
    from minituner.lora import apply_lora
    from minituner.util.files import atomic_save_safetensors

    _quiet()
    write_toy_model(directory / "model", "gpt2", "gpt2-small", seed=0, dropout=0.0)
    model = apply_lora(load_hf_model(directory / "model"), TARGETS, r=RANK, alpha=ALPHA,
                       init="kaiming", seed=0)
    init = {name: p.detach().clone() for name, p in model.named_parameters()
            if name.endswith("lora_A")}
    atomic_save_safetensors(directory / INIT_FILE, init)
    return {"n_params": sum(p.numel() for p in model.parameters()), "lora_tensors": len(init),
            "torch_version": torch.__version__}


def _batches(steps: int, device) -> list:
    import torch

    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator).to(device)
            for _ in range(steps)]


def _load_minituner(cfg: dict, directory: Path, dtype, device):
    from minituner.hf import load_hf_model
    from minituner.hf.load import load_quantized_hf_model
    from minituner.lora import apply_lora, lora_layers
    from minituner.util.files import load_safetensors

    if cfg["method"] == "qlora":
        model = load_quantized_hf_model(directory / "model", compute_dtype=dtype,
                                        target_modules=TARGETS, device=device)
    else:
        model = load_hf_model(directory / "model", dtype=dtype, device=device)
    apply_lora(model, TARGETS, r=RANK, alpha=ALPHA, init="kaiming", seed=0)
    init = load_safetensors(directory / INIT_FILE)
    params = dict(model.named_parameters())
    for name, tensor in init.items():
        params[name].data.copy_(tensor)
    for _, layer in lora_layers(model):
        layer.fused = cfg["fused"]
    if not cfg["fused_gelu"]:  # back to transformers' elementwise gelu_new
        from transformers.activations import NewGELUActivation

        from minituner.hf import TanhGELU

        for block in model.transformer.h:
            if isinstance(block.mlp.act, TanhGELU):
                block.mlp.act = NewGELUActivation()
    return model


def _load_peft(cfg: dict, directory: Path, dtype, device):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from minituner.util.files import load_safetensors

    kwargs = {"dtype": dtype}
    if cfg["method"] == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory / "model"), **kwargs)
    if cfg["method"] != "qlora":
        model = model.to(device)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                        fan_in_fan_out=cfg["method"] != "qlora", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_safetensors(directory / INIT_FILE).items():
            key = "base_model.model." + name.removesuffix("lora_A") + "lora_A.default.weight"
            params[key].copy_(tensor)
    return model


def _loss_fn(cfg: dict):
    if cfg["library"] == "minituner" and cfg["chunked_loss"]:
        from minituner.training.losses import causal_lm_loss

        return lambda model, tokens: causal_lm_loss(model, tokens)
    return lambda model, tokens: model(input_ids=tokens, labels=tokens, use_cache=False).loss


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _load(cfg: dict, directory: Path, device: str):
    """The configuration's model in training mode, its optimizer and its loss function."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    if cfg["library"] == "minituner":
        model = _load_minituner(cfg, directory, dtype, device)
    elif cfg["library"] == "torch":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory / "model"), dtype=dtype).to(device)
    else:
        model = _load_peft(cfg, directory, dtype, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, optimizer, _loss_fn(cfg)


def _step(model, optimizer, loss_fn, tokens, device) -> tuple:
    """One AdamW step: (wall seconds, process CPU seconds, loss)."""
    _sync(device)
    begin, begin_cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, tokens)
    loss.backward()
    optimizer.step()
    _sync(device)
    return time.perf_counter() - begin, time.process_time() - begin_cpu, float(loss)


def child(name: str, directory: Path, timed_steps: int, threads: int, device: str) -> dict:
    """Load, train and measure one configuration in this process."""
    import torch

    from minituner.util.files import peak_rss_bytes

    torch.set_num_threads(threads)
    _quiet()
    cfg = {**CONFIGS, **ABLATIONS}[name]
    rss_imports = vm_rss_bytes()
    started = time.perf_counter()
    model, optimizer, loss_fn = _load(cfg, directory, device)
    load_s = time.perf_counter() - started
    hwm_load, rss_load = vm_hwm_bytes(), vm_rss_bytes()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, losses, hwm = [], [], [], []
    for tokens in _batches(WARMUP + timed_steps, device):
        seconds, cpu_seconds, loss = _step(model, optimizer, loss_fn, tokens, device)
        times.append(seconds)
        cpu_times.append(cpu_seconds)
        losses.append(loss)
        hwm.append(vm_hwm_bytes())
    timed = times[WARMUP:]
    trainable = [p for p in model.parameters() if p.requires_grad]
    row = {
        "config": name, **cfg, "device": device, "threads": threads,
        "batch": BATCH, "seq": SEQ, "rank": RANK, "alpha": ALPHA,
        "warmup_steps": WARMUP, "timed_steps": timed_steps,
        "step_s_median": statistics.median(timed), "step_s_min": min(timed),
        "step_s_max": max(timed), "step_s_all": times,
        "step_cpu_s_median": statistics.median(cpu_times[WARMUP:]), "losses": losses,
        "load_s": load_s, "rss_after_imports_bytes": rss_imports,
        "rss_after_load_bytes": rss_load, "peak_rss_after_load_bytes": hwm_load,
        "peak_rss_after_step_bytes": hwm, "peak_rss_bytes": vm_hwm_bytes(),
        "ru_maxrss_bytes": peak_rss_bytes(),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
    if device.startswith("cuda"):
        row["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["gpu"] = torch.cuda.get_device_name(0)
    return row


def paired_child(ours: str, anchor: str, directory: Path, timed_steps: int, threads: int,
                 device: str) -> dict:
    """Both sides of a pair in one process, taking turns step by step (who goes first
    alternates), so a change in machine load hits both alike. Time only: memory is shared."""
    import torch

    torch.set_num_threads(threads)
    _quiet()
    sides = {name: _load({**CONFIGS, **ABLATIONS}[name], directory, device)
             for name in (ours, anchor)}
    times = {ours: [], anchor: []}
    for index, tokens in enumerate(_batches(WARMUP + timed_steps, device)):
        for name in ((ours, anchor) if index % 2 == 0 else (anchor, ours)):
            times[name].append(_step(*sides[name], tokens, device)[0])
    mine, theirs = times[ours][WARMUP:], times[anchor][WARMUP:]
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    return {"numerator": ours, "denominator": anchor, "step_s": times,
            "per_step_ratios": ratios, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_of_medians": statistics.median(mine) / statistics.median(theirs)}


# ----------------------------------------------------------------------------- parent side


def compare(rows: dict, paired: dict) -> list:
    """Ratios minituner / anchor per pair, goals and the loss agreement.

    The step goal is judged on the paired run (both sides in one process, taking turns) when
    there is one: on a shared machine it is the ratio that load changes disturb least.
    """
    out = []
    for ours_name, anchor_name, step_goal, memory_goal in PAIRS:
        ours, anchor = rows.get(ours_name), rows.get(anchor_name)
        if ours is None or anchor is None:
            continue
        own_ratio = ours["step_s_median"] / anchor["step_s_median"]
        pair = paired.get((ours_name, anchor_name))
        step_ratio = own_ratio if pair is None else pair["ratio_median"]
        memory_key = ("cuda_peak_allocated_bytes" if "cuda_peak_allocated_bytes" in ours
                      else "peak_rss_bytes")  # on a GPU the goal is about GPU memory
        memory_ratio = ours[memory_key] / anchor[memory_key]
        n = min(len(ours["losses"]), len(anchor["losses"]))
        diffs = [abs(a - b) for a, b in zip(ours["losses"][:n], anchor["losses"][:n], strict=True)]
        entry = {
            "minituner": ours_name, "anchor": anchor_name,
            "step_ratio": step_ratio, "step_ratio_from": "own processes" if pair is None
            else "paired run (median of per-step ratios)",
            "step_ratio_own_processes": own_ratio,
            "step_ratio_paired": None if pair is None else pair["ratio_median"],
            "step_ratio_paired_min_max": None if pair is None else [pair["ratio_min"],
                                                                    pair["ratio_max"]],
            "step_cpu_ratio_own_processes": ours["step_cpu_s_median"]
            / anchor["step_cpu_s_median"],
            "step_goal": step_goal,
            "step_goal_met": step_ratio <= step_goal,
            "memory_measure": memory_key,
            "peak_rss_ratio": memory_ratio, "peak_rss_goal": memory_goal,
            "peak_rss_goal_met": memory_ratio <= memory_goal,
            "loss_max_abs_diff_first_steps": max(diffs[:3]),
            "loss_max_abs_diff_all_steps": max(diffs),
            "loss_tolerance": LOSS_TOLERANCE,
            "loss_goal_met": max(diffs[:3]) <= LOSS_TOLERANCE,
        }
        entry["loss_abs_diff_step_1"] = diffs[0]  # the same weights on both sides
        twins = [rows.get(name.removesuffix("-bf16") + "-fp32") if name.endswith("-bf16")
                 else None for name in (ours_name, anchor_name)]
        if None not in twins:  # bf16: each side's distance from its own fp32 run
            entry["loss_max_abs_diff_from_own_fp32_first_steps"] = {
                side: _max_diff(run["losses"][:3], twin["losses"][:3])
                for side, run, twin in zip(("minituner", "anchor"), (ours, anchor), twins,
                                           strict=True)}
        plain = rows.get(ours_name + "-plain")
        if plain is not None:  # the plain path's own distance to the anchor: the noise floor
            entry["loss_max_abs_diff_plain_path_first_steps"] = _max_diff(
                plain["losses"][:3], anchor["losses"][:3])
        if memory_key != "peak_rss_bytes":
            entry["host_peak_rss_ratio"] = ours["peak_rss_bytes"] / anchor["peak_rss_bytes"]
        out.append(entry)
    return out


def _max_diff(first: list, second: list) -> float:
    return max(abs(a - b) for a, b in zip(first, second, strict=False))


def _ablation_base(cfg: dict) -> str:
    return f"minituner-{cfg['method']}-{cfg['dtype']}"


def pairs_to_time(rows: dict) -> list:
    """(minituner, other) pairs present in ``rows``: the anchors' pairs, then the ablations."""
    pairs = [(ours, anchor) for ours, anchor, _, _ in PAIRS]
    pairs += [(_ablation_base(cfg), name) for name, cfg in ABLATIONS.items()]
    return [(a, b) for a, b in pairs if a in rows and b in rows]


def ablations(rows: dict, paired: dict) -> list:
    """Each switched-off change against the full minituner configuration of the same dtype;
    the step ratio from the paired run when there is one."""
    out = []
    for name, cfg in ABLATIONS.items():
        against = _ablation_base(cfg)
        if name not in rows or against not in rows:
            continue
        off, on = rows[name], rows[against]
        pair = paired.get((against, name))
        own = on["step_s_median"] / off["step_s_median"]
        out.append({"config": name, "against": against,
                    "step_ratio_with_change": own if pair is None else pair["ratio_median"],
                    "step_ratio_with_change_own_processes": own,
                    "peak_rss_ratio_with_change": on["peak_rss_bytes"] / off["peak_rss_bytes"]})
    return out


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f}"


def markdown(rows: dict, comparisons: list, ablation_rows: list) -> str:
    """The result tables."""
    first = next(iter(rows.values()))
    lines = [f"GPT-2-small shape (random init), batch {BATCH} x {SEQ}, r = {RANK}, "
             f"{first['threads']} threads, device {first['device']}, "
             f"median of {first['timed_steps']} steps after {WARMUP} warm-up",
             "",
             "| configuration | step s (median, min-max) | peak RSS MB | after load MB "
             "| load s | trainable params |",
             "|---|---|---|---|---|---|"]
    def cuda_note(r):
        peak = r.get("cuda_peak_allocated_bytes")
        return "" if peak is None else f" (GPU peak allocated {_mb(peak)})"

    for name, r in rows.items():
        lines.append(f"| {name} | {r['step_s_median']:.3f} ({r['step_s_min']:.3f}-"
                     f"{r['step_s_max']:.3f}) | {_mb(r['peak_rss_bytes'])}{cuda_note(r)} "
                     f"| {_mb(r['peak_rss_after_load_bytes'])} | {r['load_s']:.1f} "
                     f"| {r['trainable_params']:,} |")
    lines += ["", "| minituner vs anchor | step ratio, paired (goal) | step ratio, own "
              "processes | peak memory ratio (goal) | loss diff, first 3 steps (goal) "
              "[step 1; all steps] |",
              "|---|---|---|---|---|"]

    def verdict(met):
        return "met" if met else "NOT met"

    def floor_note(c):
        floor = c.get("loss_max_abs_diff_plain_path_first_steps")
        note = "" if floor is None else f"; plain path: {floor:.1e}"
        from_fp32 = c.get("loss_max_abs_diff_from_own_fp32_first_steps")
        if from_fp32:
            note += (f"; from own fp32 run: minituner {from_fp32['minituner']:.1e}, "
                     f"anchor {from_fp32['anchor']:.1e}")
        return note

    for c in comparisons:
        paired_range = c["step_ratio_paired_min_max"]
        spread = "" if paired_range is None else (
            f", per-step {paired_range[0]:.2f}-{paired_range[1]:.2f}")
        lines.append(
            f"| {c['minituner']} / {c['anchor']} | {c['step_ratio']:.2f}{spread} (<= "
            f"{c['step_goal']}, {verdict(c['step_goal_met'])}) "
            f"| {c['step_ratio_own_processes']:.2f} | {c['peak_rss_ratio']:.2f} "
            f"(<= {c['peak_rss_goal']}, {verdict(c['peak_rss_goal_met'])}) "
            f"| {c['loss_max_abs_diff_first_steps']:.1e} (<= {c['loss_tolerance']:.0e}, "
            f"{verdict(c['loss_goal_met'])}) [{c['loss_abs_diff_step_1']:.1e}; "
            f"{c['loss_max_abs_diff_all_steps']:.1e}]{floor_note(c)} |")
    if ablation_rows:
        lines += ["", "| change switched off | step ratio with / without (paired; own "
                  "processes) | peak RSS ratio with / without |", "|---|---|---|"]
        for a in ablation_rows:
            lines.append(f"| {a['config']} | {a['step_ratio_with_change']:.3f} "
                         f"({a['step_ratio_with_change_own_processes']:.3f}) "
                         f"| {a['peak_rss_ratio_with_change']:.3f} |")
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    """Bar charts of the median step time (min-max whiskers) and peak RSS per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minituner.util.files import atomic_write

    names = [n for n in rows if n in CONFIGS]
    colors = ["tab:blue" if rows[n]["library"] == "minituner" else
              "tab:gray" if rows[n]["library"] == "torch" else "tab:orange" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    medians = [rows[n]["step_s_median"] for n in names]
    errors = [[m - rows[n]["step_s_min"] for n, m in zip(names, medians, strict=True)],
              [rows[n]["step_s_max"] - m for n, m in zip(names, medians, strict=True)]]
    left.barh(names, medians, xerr=errors, color=colors)
    left.set_xlabel("step time, s (median, min-max)")
    right.barh(names, [rows[n]["peak_rss_bytes"] / 1e9 for n in names], color=colors)
    right.set_xlabel("peak RSS, GB (whole process)")
    for ax in (left, right):
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    right.set_yticklabels([])
    first = rows[names[0]]
    fig.suptitle(f"GPT-2-small shape, batch {BATCH} x {SEQ}, r = {RANK}, {first['threads']} "
                 f"threads, {first['device']} (blue: minituner, orange: PEFT / bitsandbytes)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pair", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-paired", dest="paired", action="store_false",
                        help="skip the paired runs (both sides of a pair in one process, "
                             "taking turns step by step) that the step goal is judged on")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="3 timed steps")
    parser.add_argument("--only", choices=("lora", "qlora"), help="one method's pairs only")
    parser.add_argument("--ablations", action="store_true",
                        help="run the ablations (each library change off) and the minituner "
                             "and PEFT configurations they are compared with; writes "
                             "train_step_ablations.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    if args.prepare:
        print(json.dumps(prepare(args.prepare)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.steps, args.threads, args.device)))
        return 0
    if args.pair:
        print(json.dumps(paired_child(*args.pair, args.dir, args.steps, args.threads,
                                      args.device)))
        return 0
    steps = 3 if args.quick else args.steps
    names = list(CONFIGS)
    if args.ablations:
        names = ["peft-lora-bf16", "minituner-lora-bf16", *ABLATIONS,
                 *(f"minituner-{m}-fp32" for m in ("lora", "qlora"))]
        if args.out == RESULTS:
            args.out = RESULTS.with_name("train_step_ablations.json")
        if args.plot == PLOT:
            args.plot = None
    if args.only:
        names = [n for n in names if f"-{args.only}-" in n]
    load_before, started = load_average(), time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="minituner-bench-") as tmp:
        prepared = run_json_child([__file__, "--prepare", tmp])
        for name in names:
            rows[name] = run_json_child([__file__, "--child", name, "--dir", tmp, "--steps",
                                         str(steps), "--threads", str(args.threads),
                                         "--device", args.device])
            print(f"done {name}: {rows[name]['step_s_median']:.3f} s, "
                  f"{rows[name]['peak_rss_bytes'] / 1e6:.0f} MB", file=sys.stderr, flush=True)
        paired = {}
        for ours, anchor in pairs_to_time(rows) if args.paired else []:
            paired[(ours, anchor)] = run_json_child([
                __file__, "--pair", ours, anchor, "--dir", tmp, "--steps", str(steps),
                "--threads", str(args.threads), "--device", args.device])
            print(f"done paired {ours} / {anchor}: "
                  f"{paired[(ours, anchor)]['ratio_median']:.3f}", file=sys.stderr, flush=True)
    comparisons, ablation_rows = compare(rows, paired), ablations(rows, paired)
    table = markdown(rows, comparisons, ablation_rows)
    if args.plot is not None:
        plot(rows, args.plot)
    write_results(args.out, {
        "benchmark": "GPT-2-small-shape training step: minituner vs PEFT / PEFT + bitsandbytes",
        "model": prepared, "targets": TARGETS, "lr": LR, "rows": list(rows.values()),
        "paired": list(paired.values()), "comparisons": comparisons,
        "ablations": ablation_rows, "markdown": table,
        "load_average_before": load_before, "wall_s": time.perf_counter() - started,
    })
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
