"""FSDP2 vs DDP vs one process: per-process memory of QLoRA on the GPT-2-small shape (CPU, gloo).

    python benchmarks/fsdp_memory.py                  # 2 processes, writes fsdp_memory.json
    python benchmarks/fsdp_memory.py --processes 2 --steps 3 --device cpu

Three runs of the same QLoRA fine-tune (a random-init GPT-2-small-shaped transformers model,
``minituner.hf.toy`` size gpt2-small, NF4 on every block Linear, r = 8, fp32): one process,
DDP on N processes, FSDP on N processes (``torchrun ... --fsdp``). Each process first warms
up (imports, the process group, one step of the same kind of run on a tiny GPT-2), records
its RSS, then runs the fine-tune in-process and reports

- ``base_weight_bytes``: the bytes of the frozen base this process holds after a step (its
  FSDP shard: the local part of every frozen parameter, plus buffers), and
- ``peak_rss_growth_bytes``: its peak resident memory (VmHWM) minus the RSS after warm-up
  (CUDA: the run's peak allocated bytes),

beside the planner's per-device prediction (``plan_memory(..., devices=N, fsdp=True)``).
Every configuration runs under the allocator settings of memory_validation.py: minituner's own
(``minituner finetune`` on the CPU fixes glibc's mmap threshold at 1 MiB; the child does too),
glibc's growing threshold (``MINITUNER_MMAP_THRESHOLD=glibc``) and
MALLOC_MMAP_THRESHOLD_=131072. On CUDA (``--device cuda``) the runs use NCCL and one allocator;
``benchmarks/gpu_fsdp.sh`` runs it there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ALLOCATORS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def local_bytes(tensor) -> int:
    """Bytes this process holds of ``tensor`` (its shard when FSDP sharded it)."""
    from minituner.training.fsdp import is_sharded

    local = tensor.to_local() if is_sharded(tensor) else tensor
    return local.numel() * local.element_size()


def base_weight_bytes(model) -> int:
    """Frozen parameters and buffers held by this process."""
    frozen = sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)
    return frozen + sum(local_bytes(b) for b in model.buffers())


def child(args) -> None:
    """One process of a run (under torchrun or alone): warm up, train, write this rank's
    numbers."""
    import torch
    from bench_common import RSSTimeline, vm_hwm_bytes, vm_rss_bytes

    from minituner.hf.finetune import HFBackend
    from minituner.training import pipeline
    from minituner.training.config import FinetuneConfig
    from minituner.util.files import pin_mmap_threshold

    if args.device == "cpu":
        pin_mmap_threshold()  # as `minituner finetune` does on the CPU (unless the env says)
    measured, timeline = {}, RSSTimeline()

    class Measured(HFBackend):
        def build_trainable(self, cfg):
            timeline.mark("step 1")  # the stretch before it: data, loading the base
            return super().build_trainable(cfg)

        def on_step(self, model, record: dict) -> None:
            super().on_step(model, record)
            measured["base_weight_bytes"] = base_weight_bytes(model)
            timeline.mark(f"step {record['step'] + 1}" if record["step"] < args.steps
                          else "after training")

    def config(model, steps: int) -> FinetuneConfig:
        return FinetuneConfig.for_kind("hf", model=f"hf:{model}", train_data=args.data,
                                       method="qlora", rank=8, steps=steps,
                                       batch_size=args.batch, max_len=args.seq, warmup=0.0,
                                       fsdp=args.fsdp or None, checkpoint_every=1000,
                                       eval_every=1000)

    pipeline.run_finetune(HFBackend(args.device), config(args.tiny, 1), f"{args.out}-warm",
                          overwrite=True)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = vm_rss_bytes()
    timeline.start("loading")  # reading the data and loading the base
    results = pipeline.run_finetune(Measured(args.device), config(args.model, args.steps),
                                    args.out, overwrite=True)
    measured["timeline"] = timeline.stop(baseline)
    measured["baseline_rss_bytes"] = baseline
    measured["peak_rss_growth_bytes"] = vm_hwm_bytes() - baseline
    measured["run_measured"] = results["memory"]["measured"]  # growth since the base's load
    measured["target_tokens_per_s"] = results["target_tokens_per_s"]
    if args.device == "cuda":
        measured["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    rank = int(os.environ.get("RANK", "0"))
    Path(args.report, f"rank{rank}.json").write_text(json.dumps(measured))


def launch(args, name: str, processes: int, fsdp: bool, root: Path, env: dict) -> dict:
    """Run one configuration in fresh processes; per-rank numbers."""
    report = root / name
    report.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), **env}
    command = [__file__, "--child", "--model", str(args.model), "--data", str(args.data),
               "--tiny", str(args.tiny), "--out", str(root / f"run-{name}"),
               "--report", str(report), "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--device", args.device] + (["--fsdp"] if fsdp else [])
    if processes > 1 or fsdp:  # --fsdp needs torchrun, also for one process (unsharded)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", *command]
    else:
        command = [sys.executable, *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]
    growth = "cuda_peak_allocated_bytes" if args.device == "cuda" else "peak_rss_growth_bytes"
    return {"processes": processes, "fsdp": fsdp, "ranks": ranks,
            "base_weight_bytes": max(r["base_weight_bytes"] for r in ranks),
            "peak_growth_bytes": max(r[growth] for r in ranks)}


def compare(rows: dict, plan: dict, n: int) -> dict:
    """The goals: FSDP's base is 1/N of one process's, its peak is below DDP's, and the
    planner's per-device prediction is within 15% of FSDP's measured peak."""
    ratio = plan["fsdp"] / max(1, rows["fsdp"]["peak_growth_bytes"])
    return {"fsdp_base_bytes_vs_one_over_n":
            rows["fsdp"]["base_weight_bytes"] / (rows["one"]["base_weight_bytes"] / n),
            "fsdp_peak_below_ddp":
            rows["fsdp"]["peak_growth_bytes"] < rows["ddp"]["peak_growth_bytes"],
            "plan_vs_fsdp_measured": ratio, "plan_within_15_percent": abs(ratio - 1) <= 0.15}


def write_inputs(root: Path, n: int, seq: int) -> tuple:
    """The GPT-2-small-shaped model, a tiny GPT-2 (the warm-up's) and a data file of ``n``
    examples."""
    from minituner.hf.toy import WORDS, write_toy_model

    model = write_toy_model(root / "gpt2-small", arch="gpt2", size="gpt2-small")
    tiny = write_toy_model(root / "tiny", arch="gpt2")
    words = [w for w in WORDS if w.isalpha()]
    lines = [{"prompt": " ".join(words[(i + k) % len(words)] for k in range(seq // 2)),
              "completion": " " + " ".join(words[(3 * i + k) % len(words)]
                                           for k in range(seq // 2))} for i in range(n)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return model, tiny, data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="global rows per step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-json", default=str(RESULTS / "fsdp_memory.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model", "--tiny", "--data", "--out", "--report"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from bench_common import load_average

    from minituner.training.memory import plan_memory

    n, load_before = args.processes, load_average()
    plan = {name: plan_memory("gpt2-small", "qlora", rank=8, batch=args.batch // devices,
                              seq=args.seq, base_dtype="fp32", compute_dtype="fp32",
                              chunked_loss=True, devices=devices, fsdp=devices > 1).total_bytes
            for name, devices in (("one", 1), ("fsdp", n))}
    allocators = ALLOCATORS if args.device == "cpu" else {"cuda": {}}
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(["python", "benchmarks/fsdp_memory.py", *(argv or
                                                                         sys.argv[1:])]),
               "settings": {k: getattr(args, k) for k in ("processes", "steps", "batch", "seq",
                                                          "threads", "device")},
               "planned_total_bytes": plan, "allocators": {}}
    for allocator, env in allocators.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            args.model, args.tiny, args.data = write_inputs(root, n=4 * args.batch,
                                                            seq=args.seq)
            rows = {"one": launch(args, "one", 1, False, root, env),
                    "ddp": launch(args, "ddp", n, False, root, env),
                    "fsdp": launch(args, "fsdp", n, True, root, env)}
        summary["allocators"][allocator] = {"env": env, "runs": rows, **compare(rows, plan, n)}
    summary["load_average"] = {"before": load_before, "after": load_average()}
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"planned per device: one {plan['one'] / 2**20:,.1f} MiB, fsdp "
          f"{plan['fsdp'] / 2**20:,.1f} MiB")
    for allocator, record in summary["allocators"].items():
        for name, row in record["runs"].items():
            print(f"{allocator:>20} {name:>5}: processes {row['processes']}, base weights "
                  f"{row['base_weight_bytes'] / 2**20:,.1f} MiB, peak growth "
                  f"{row['peak_growth_bytes'] / 2**20:,.1f} MiB")
        print(f"{allocator:>20} goals: " + json.dumps({k: v for k, v in record.items()
                                                      if k not in ("env", "runs")}))
        for name, row in record["runs"].items():
            stretches = row["ranks"][0].get("timeline", [])
            print(f"{allocator:>20} {name:>5} rank 0 peak growth by stretch, MiB: " + ", ".join(
                f"{s['stretch']} {s['peak_growth_bytes'] / 2**20:,.1f}" for s in stretches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
