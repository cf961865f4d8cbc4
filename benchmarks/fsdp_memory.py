"""FSDP2 vs DDP vs one process: per-process memory of QLoRA on the GPT-2-small shape (CPU, gloo).

    python benchmarks/fsdp_memory.py                  # 2 processes, writes fsdp_memory.json
    python benchmarks/fsdp_memory.py --processes 2 --steps 3 --device cpu

Three runs of the same QLoRA fine-tune (a random-init GPT-2-small-shaped transformers model,
``minituner.hf.toy`` size gpt2-small, NF4 on every block Linear, r = 8): one process, DDP on N
processes, FSDP on N processes (``torchrun ... --fsdp``). Each process reports

- ``base_weight_bytes``: the bytes of the frozen base this process holds after a step (its
  FSDP shard: the local part of every frozen parameter, plus buffers), and
- ``peak_rss_growth_bytes``: its peak resident memory minus its RSS before the base was loaded
  (CUDA: peak allocated bytes), as results.json records it,

beside the planner's per-device prediction (``plan_memory(..., devices=N, fsdp=True)``).
On CUDA (``--device cuda``) the runs use NCCL; ``benchmarks/gpu_fsdp.sh`` runs it there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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
    """One process of a run (under torchrun or alone): train, then write this rank's numbers."""
    from minituner.hf.finetune import HFBackend
    from minituner.training import pipeline
    from minituner.training.config import FinetuneConfig

    measured = {}

    class Measured(HFBackend):
        def on_step(self, model, record: dict) -> None:
            super().on_step(model, record)
            measured["base_weight_bytes"] = base_weight_bytes(model)

    cfg = FinetuneConfig.for_kind("hf", model=f"hf:{args.model}", train_data=args.data,
                                  method="qlora", rank=8, steps=args.steps,
                                  batch_size=args.batch, max_len=args.seq, warmup=0.0,
                                  fsdp=args.fsdp or None, checkpoint_every=1000, eval_every=1000)
    results = pipeline.run_finetune(Measured(args.device), cfg, args.out, overwrite=True)
    rank = int(os.environ.get("RANK", "0"))
    measured.update(results["memory"]["measured"])
    Path(args.report, f"rank{rank}.json").write_text(json.dumps(measured))


def launch(args, name: str, processes: int, fsdp: bool, root: Path) -> dict:
    """Run one configuration in fresh processes; per-rank numbers."""
    report = root / name
    report.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    command = [__file__, "--child", "--model", str(args.model), "--data", str(args.data),
               "--out", str(root / f"run-{name}"), "--report", str(report),
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
               "--device", args.device] + (["--fsdp"] if fsdp else [])
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", *command]
    else:
        command = [sys.executable, *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]
    return {"processes": processes, "fsdp": fsdp, "ranks": ranks,
            "base_weight_bytes": max(r["base_weight_bytes"] for r in ranks),
            "peak_rss_growth_bytes": max(r.get("peak_rss_growth_bytes", 0) for r in ranks)}


def write_inputs(root: Path, n: int, seq: int) -> tuple:
    """The GPT-2-small-shaped model and a data file of ``n`` examples."""
    from minituner.hf.toy import WORDS, write_toy_model

    model = write_toy_model(root / "gpt2-small", arch="gpt2", size="gpt2-small")
    words = [w for w in WORDS if w.isalpha()]
    lines = [{"prompt": " ".join(words[(i + k) % len(words)] for k in range(seq // 2)),
              "completion": " " + " ".join(words[(3 * i + k) % len(words)]
                                           for k in range(seq // 2))} for i in range(n)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return model, data


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
    for name in ("--model", "--data", "--out", "--report"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from minituner.training.memory import plan_memory

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args.model, args.data = write_inputs(root, n=4 * args.batch, seq=args.seq)
        n = args.processes
        rows = {"one": launch(args, "one", 1, False, root),
                "ddp": launch(args, "ddp", n, False, root),
                "fsdp": launch(args, "fsdp", n, True, root)}
    plan = {name: plan_memory("gpt2-small", "qlora", rank=8, batch=args.batch // devices,
                              seq=args.seq, base_dtype="fp32", chunked_loss=True,
                              devices=devices, fsdp=devices > 1).total_bytes
            for name, devices in (("one", 1), ("fsdp", n))}
    half = rows["one"]["base_weight_bytes"] / n
    summary = {
        "settings": {k: getattr(args, k) for k in ("processes", "steps", "batch", "seq",
                                                   "threads", "device")},
        "runs": rows, "planned_total_bytes": plan,
        "fsdp_base_bytes_vs_one_over_n": rows["fsdp"]["base_weight_bytes"] / half,
        "fsdp_peak_below_ddp": rows["fsdp"]["peak_rss_growth_bytes"]
        < rows["ddp"]["peak_rss_growth_bytes"],
        "plan_vs_fsdp_measured": plan["fsdp"] / max(1, rows["fsdp"]["peak_rss_growth_bytes"]),
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    for name, row in rows.items():
        print(f"{name:>5}: processes {row['processes']}, base weights "
              f"{row['base_weight_bytes'] / 2**20:,.1f} MiB, peak RSS growth "
              f"{row['peak_rss_growth_bytes'] / 2**20:,.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
