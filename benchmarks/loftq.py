"""LoftQ vs plain NF4 at step 0 on a pretrained Mini-GPT base (QLoRA, r = 8, every Linear).

For each start: the weight error ||W - (deq(Q) + s B A)|| / ||W|| of every layer, and the logit
gap of the QLoRA model against the float model on the control set (mean |delta| / mean |logit|
at every real position). Plain NF4 (B = 0), LoftQ after 1..N iterations, and LoftQ with
least-squares block scales (``--refit-scales``: after the codes are chosen, each block's scale is
refit to minimise the block's squared error, codes and scale alternating; the result is still an
ordinary NF4 weight whose absmax is that scale).

    python benchmarks/loftq.py --base runs/demo/base --iters 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from minituner.course.data import control_texts, text_sequence  # noqa: E402
from minituner.course.finetune import control_records  # noqa: E402
from minituner.lora import lora_layers  # noqa: E402
from minituner.quant.loftq import relative_error, wrap_minigpt_loftq  # noqa: E402
from minituner.quant.qlora import wrap_minigpt_qlora  # noqa: E402
from minituner.training.runs import load_base_run  # noqa: E402
from minituner.training.sampling import collate  # noqa: E402
from minituner.util.files import atomic_write_json  # noqa: E402


def probe_logits(model, batch: dict) -> torch.Tensor:
    """Logits at every real (non-padding) position of the control batch."""
    with torch.no_grad():
        return model.eval()(batch["input_ids"])[batch["target_mask"]]


def layer_errors(float_model, model) -> dict:
    """||W - (deq(Q) + s B A)|| / ||W|| per LoRA layer."""
    floats = dict(float_model.named_modules())
    errors = {}
    for name, layer in lora_layers(model):
        weight = floats[name].weight.detach().float()
        approx = layer.base.compute_weight(torch.float32) + layer.delta_weight().detach()
        errors[name] = relative_error(weight, approx)
    return errors


def logit_gap(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """mean |delta| / mean |logit| against the float model."""
    return float((logits - reference).abs().mean() / reference.abs().mean())


def measure(base: Path, rank: int, iters: int, refit: bool) -> dict:
    """The table: plain NF4, then LoftQ after each iteration count."""
    float_model, tokenizer, _ = load_base_run(base)
    batch = collate([text_sequence(tokenizer, t) for t in control_texts(control_records(base))],
                    tokenizer.pad_id)
    reference = probe_logits(float_model, batch)
    plain = wrap_minigpt_qlora(load_base_run(base)[0], r=rank)
    plain_errors = layer_errors(float_model, plain)
    plain_gap = logit_gap(reference, probe_logits(plain, batch))
    rows = [{"start": "nf4", "iters": 0, "errors": plain_errors, "logit_gap": plain_gap}]
    variants = [("loftq", False)] + ([("loftq+refit", True)] if refit else [])
    for label, refit_scales in variants:
        for count in range(1, iters + 1):
            model = load_base_run(base)[0]
            started = time.perf_counter()
            wrap_minigpt_loftq(model, r=rank, iters=count, refit_scales=refit_scales)
            seconds = time.perf_counter() - started
            gap = logit_gap(reference, probe_logits(model, batch))
            rows.append({"start": label, "iters": count, "errors": layer_errors(float_model, model),
                         "logit_gap": gap, "gap_cut": 1 - gap / plain_gap, "init_s": seconds})
    for row in rows:
        values = list(row["errors"].values())
        row["error_min"], row["error_max"] = min(values), max(values)
    return {"base": str(base), "rank": rank, "alpha": 16.0, "quant_scheme": "nf4_per_group_64",
            "rows": rows}


def table(result: dict) -> str:
    """Markdown: one row per start and iteration count."""
    lines = ["| start | iters | weight error min-max | step-0 logit gap | gap cut vs NF4 |",
             "|---|---:|---|---:|---:|"]
    for row in result["rows"]:
        cut = f"{100 * row['gap_cut']:.1f}%" if "gap_cut" in row else "-"
        lines.append(f"| {row['start']} | {row['iters']} | {row['error_min']:.4f}-"
                     f"{row['error_max']:.4f} | {row['logit_gap']:.4f} | {cut} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/demo/base")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-refit", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loftq.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(Path(args.base), args.rank, args.iters, not args.no_refit)
    atomic_write_json(Path(args.out), result)
    print(table(result))


if __name__ == "__main__":
    main()
