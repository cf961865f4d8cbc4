"""Merging a LoRA adapter into its base: time and error, minituner against PEFT, one process.

Model: a random-init GPT-2-small shape (transformers GPT2Config, 768 x 12, vocab 50257). One
adapter (r = 8, alpha 16 on c_attn / c_proj / c_fc; A from minituner's seeded init, B drawn
N(0, 0.02) as after training) is put into minituner's ``apply_lora`` model and copied into a
PEFT ``get_peft_model`` model of the same base. Timed, alternating the two sides, median of
the repeats (min-max kept):

- merge and unmerge in place (minituner ``merge_lora`` / ``unmerge_lora``, PEFT
  ``merge_adapter`` / ``unmerge_adapter``);
- merge and unload (``merge_and_unload`` on both; each repeat on a fresh copy, copying untimed).

Errors: the merged model's logits against the unmerged model's on a fixed batch, the base
weights after merge + unmerge cycles against the original ones, and minituner's merged weights
against PEFT's. With ``--qlora`` (default on; off with --quick) the same adapter over an NF4
base: minituner's "dequantized" and "requantized" merges against PEFT + bitsandbytes
``merge_and_unload`` (which re-quantizes), timed once each, with their logit drift.

    .venv/bin/python benchmarks/merge.py
    .venv/bin/python benchmarks/merge.py --quick     # 3 repeats, float adapter only
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

from bench_common import load_average, median_spread, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "merge.json"
TARGETS = ["c_attn", "c_proj", "c_fc"]
RANK, ALPHA = 8, 16.0


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def base_model():
    """The seeded random-init GPT-2-small model (fp32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    from minituner.hf.toy import toy_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(toy_config("gpt2", "gpt2-small")).eval()


def adapters(base):
    """(minituner model, PEFT model) over copies of ``base`` holding the same adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from minituner.lora import apply_lora, lora_layers

    ours = apply_lora(copy.deepcopy(base), TARGETS, r=RANK, alpha=ALPHA, init="kaiming", seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.02)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
        fan_in_fan_out=True, task_type="CAUSAL_LM"))
    copy_adapter(ours, theirs)
    return ours.eval(), theirs.eval()


def copy_adapter(ours, theirs) -> None:
    """Write minituner's lora_A / lora_B into the PEFT model's default adapter."""
    import torch

    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, tensor in ours.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                stem, kind = name.rsplit(".", 1)
                params[f"base_model.model.{stem}.{kind}.default.weight"].copy_(tensor)


def logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


def drift(reference, other) -> dict:
    diff = (other - reference).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "relative_mean": float(diff.mean() / reference.abs().mean())}


def base_weights(model, peft: bool) -> dict:
    """name -> base weight tensor (live) of every adapted layer."""
    from minituner.lora import lora_layers

    if not peft:
        return {name: layer.base.weight for name, layer in lora_layers(model)}
    return {name.removeprefix("base_model.model."): module.base_layer.weight
            for name, module in model.named_modules() if hasattr(module, "base_layer")
            and hasattr(module, "lora_A")}


def max_weight_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def float_merge(ours, theirs, tokens, repeats: int) -> dict:
    """In-place merge/unmerge timings and errors, then merge_and_unload on fresh copies."""
    from minituner.lora import lora_layers, merge_and_unload, merge_lora, unmerge_lora

    unmerged = logits(ours, tokens)
    out = {"unmerged_logits_minituner_vs_peft": drift(unmerged, logits(theirs, tokens))}
    with_norms = [(float(layer.delta_weight().norm()), float(layer.base.weight.norm()))
                  for _, layer in lora_layers(ours)]
    out["delta_norm_over_weight_norm"] = (sum(d * d for d, _ in with_norms)
                                          / sum(w * w for _, w in with_norms)) ** 0.5
    original = {k: w.detach().clone() for k, w in base_weights(ours, False).items()}
    times = {k: [] for k in ("minituner_merge", "minituner_unmerge", "peft_merge",
                             "peft_unmerge")}
    for i in range(repeats):
        times["minituner_merge"].append(timed(lambda: merge_lora(ours)))
        times["peft_merge"].append(timed(theirs.merge_adapter))
        if i == 0:
            out["merged_logits_vs_unmerged"] = {
                "minituner": drift(unmerged, logits(ours, tokens)),
                "peft": drift(unmerged, logits(theirs, tokens))}
            out["merged_weights_minituner_vs_peft_max_abs"] = max_weight_diff(
                base_weights(ours, False), base_weights(theirs, True))
        times["minituner_unmerge"].append(timed(lambda: unmerge_lora(ours)))
        times["peft_unmerge"].append(timed(theirs.unmerge_adapter))
        if i == 0:
            out["weights_after_1_cycle_max_abs"] = {
                "minituner": max_weight_diff(base_weights(ours, False), original),
                "peft": max_weight_diff(base_weights(theirs, True), original)}
    out[f"weights_after_{repeats}_cycles_max_abs"] = {
        "minituner": max_weight_diff(base_weights(ours, False), original),
        "peft": max_weight_diff(base_weights(theirs, True), original)}
    unload = {"minituner_merge_and_unload": [], "peft_merge_and_unload": []}
    for _ in range(max(2, repeats // 2)):
        mine, peft_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
        unload["minituner_merge_and_unload"].append(timed(lambda m=mine: merge_and_unload(m)))
        unload["peft_merge_and_unload"].append(timed(peft_copy.merge_and_unload))
        if "unloaded_logits_vs_unmerged" not in out:
            out["unloaded_logits_vs_unmerged"] = {
                "minituner": drift(unmerged, logits(mine, tokens)),
                "peft": drift(unmerged, logits(peft_copy, tokens))}
        del mine, peft_copy
    out["timings"] = {k: median_spread(v, "s") for k, v in {**times, **unload}.items()}
    out["ratios_minituner_to_peft"] = {
        op: out["timings"][f"minituner_{op}"]["median_s"] / out["timings"][f"peft_{op}"]["median_s"]
        for op in ("merge", "unmerge", "merge_and_unload")}
    return out


def qlora_merge(base, ours_float, tokens) -> dict:
    """Merging the same adapter over an NF4 base: minituner's two targets vs PEFT + bnb.

    PEFT's merge runs before the bitsandbytes model has made any forward pass (see
    :func:`bnb_cpu_repacking`); its drift is measured against minituner's unmerged QLoRA model,
    which holds the same NF4 bytes and the same adapter.
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from minituner.hf.load import quantize_loaded_model
    from minituner.lora import apply_lora, load_lora_state_dict, lora_state_dict
    from minituner.quant.qlora import merge_quantized_lora

    state = lora_state_dict(ours_float)
    out, unmerged = {}, None
    for target in ("dequantized", "requantized"):
        model = quantize_loaded_model(copy.deepcopy(base), target_modules=TARGETS)
        if unmerged is None:
            out["reference_nf4_base_vs_float_base"] = {
                "seconds": None, "logits_vs_unmerged": drift(logits(base, tokens),
                                                             logits(model, tokens))}
        apply_lora(model, TARGETS, r=RANK, alpha=ALPHA, init="kaiming", seed=0)
        load_lora_state_dict(model, state)
        model.eval()
        unmerged = logits(model, tokens)
        seconds = timed(lambda m=model, t=target: merge_quantized_lora(m, target=t))
        out[f"minituner_{target}"] = {"seconds": seconds,
                                      "logits_vs_unmerged": drift(unmerged, logits(model, tokens))}
        del model
    with tempfile.TemporaryDirectory(prefix="minituner-merge-") as tmp:
        base.save_pretrained(tmp)
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        bnb_model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, device_map={"": "cpu"})
    peft_model = get_peft_model(bnb_model, LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
        task_type="CAUSAL_LM")).eval()
    copy_adapter(ours_float, peft_model)
    merged = {}
    seconds = timed(lambda: merged.setdefault("model", peft_model.merge_and_unload()))
    out["peft_bitsandbytes_merge_and_unload"] = {
        "seconds": seconds, "logits_vs_unmerged": drift(unmerged, logits(merged["model"], tokens)),
        "note": "merged before any forward pass; reference: minituner's unmerged QLoRA logits"}
    return out


def bnb_cpu_repacking() -> dict:
    """Does bitsandbytes' CPU forward rewrite a Linear4bit's packed weight in place?

    If it does, ``dequantize_4bit`` (and so PEFT's merge of a 4-bit base) reads the rewritten
    bytes with the standard layout afterwards. Checked on one 768 -> 2304 layer in eval mode.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    import torch

    weight = torch.randn(2304, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = bnb.nn.Linear4bit(768, 2304, bias=False, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True).to("cpu")
    layer.eval()  # its CPU fast path (eval mode, no input grad) is what repacks
    before = layer.weight.data.clone()
    error_before = float((bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
                          - weight).abs().max())
    with torch.no_grad():
        layer(torch.randn(4, 768))
    error_after = float((bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
                         - weight).abs().max())
    return {"bytes_changed_by_forward": not torch.equal(before, layer.weight.data),
            "dequantize_max_abs_error_before_forward": error_before,
            "dequantize_max_abs_error_after_forward": error_after,
            "weight_max_abs": float(weight.abs().max())}


def markdown(result: dict) -> str:
    f = result["float"]
    t = f["timings"]
    lines = ["| operation | minituner s (median, min-max) | PEFT s (median, min-max) "
             "| minituner / PEFT |", "|---|---|---|---|"]
    for op in ("merge", "unmerge", "merge_and_unload"):
        a, b = t[f"minituner_{op}"], t[f"peft_{op}"]
        lines.append(f"| {op} | {a['median_s']:.3f} ({a['min_s']:.3f}-{a['max_s']:.3f}) "
                     f"| {b['median_s']:.3f} ({b['min_s']:.3f}-{b['max_s']:.3f}) "
                     f"| {f['ratios_minituner_to_peft'][op]:.2f} |")
    cycles = next(k for k in f if k.startswith("weights_after_") and "_cycles_" in k)
    lines += ["", f"adapter size: ||scaling B A|| / ||W|| = {f['delta_norm_over_weight_norm']:.3f}"
              " over the adapted layers", "", "| error | minituner | PEFT |", "|---|---|---|",
              f"| merged logits vs unmerged, max abs "
              f"| {f['merged_logits_vs_unmerged']['minituner']['max_abs']:.2e} "
              f"| {f['merged_logits_vs_unmerged']['peft']['max_abs']:.2e} |",
              f"| merge_and_unload logits vs unmerged, max abs "
              f"| {f['unloaded_logits_vs_unmerged']['minituner']['max_abs']:.2e} "
              f"| {f['unloaded_logits_vs_unmerged']['peft']['max_abs']:.2e} |",
              f"| base weights after 1 merge+unmerge, max abs "
              f"| {f['weights_after_1_cycle_max_abs']['minituner']:.2e} "
              f"| {f['weights_after_1_cycle_max_abs']['peft']:.2e} |",
              f"| base weights after {cycles.split('_')[2]} cycles, max abs "
              f"| {f[cycles]['minituner']:.2e} | {f[cycles]['peft']:.2e} |",
              f"| merged weights, minituner vs PEFT, max abs "
              f"| {f['merged_weights_minituner_vs_peft_max_abs']:.2e} | |"]
    q = result.get("qlora")
    if q:
        lines += ["", "| NF4 base: merge | seconds | merged logits vs unmerged: max abs "
                  "| mean abs | relative mean |", "|---|---|---|---|---|"]
        for name, row in q.items():
            d = row["logits_vs_unmerged"]
            seconds = "" if row["seconds"] is None else f"{row['seconds']:.2f}"
            lines.append(f"| {name} | {seconds} | {d['max_abs']:.2e} "
                         f"| {d['mean_abs']:.2e} | {d['relative_mean']:.2e} |")
    repack = result.get("bitsandbytes_cpu_repacking")
    if repack:
        lines += ["", f"bitsandbytes CPU forward rewrites the packed 4-bit weight in place: "
                  f"{repack['bytes_changed_by_forward']}; dequantize_4bit max abs error "
                  f"{repack['dequantize_max_abs_error_before_forward']:.3g} before a forward, "
                  f"{repack['dequantize_max_abs_error_after_forward']:.3g} after (weights up to "
                  f"{repack['weight_max_abs']:.3g})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 repeats, no NF4 merge")
    parser.add_argument("--no-qlora", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    load_before, started = load_average(), time.perf_counter()
    repeats = 3 if args.quick else args.repeats
    base = base_model()
    ours, theirs = adapters(base)
    tokens = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    result = {"float": float_merge(ours, theirs, tokens, repeats)}
    del theirs
    if not (args.quick or args.no_qlora):
        result["qlora"] = qlora_merge(base, ours, tokens)
        result["bitsandbytes_cpu_repacking"] = bnb_cpu_repacking()
    table = markdown(result)
    write_results(args.out, {
        "benchmark": "LoRA merge / unmerge: minituner vs PEFT, GPT-2-small shape",
        "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "repeats": repeats,
        "threads": args.threads, **result, "markdown": table,
        "load_average_before": load_before, "wall_s": time.perf_counter() - started,
    })
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
