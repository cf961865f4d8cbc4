"""Peak memory and time of loading a GPT-2-small-shape model: float, QLoRA quantize-while-loading,
and transformers + bitsandbytes 4-bit loading. Each way runs in its own process (peak RSS =
VmHWM of that process, imports included); "imports only" is the floor every process pays.
After loading, each process runs one forward pass on 8 tokens, so every weight is resident
(transformers maps the file lazily).

    .venv/bin/python benchmarks/hf_load.py                 # random-init GPT-2 small, written once
    .venv/bin/python benchmarks/hf_load.py --model DIR     # any local transformers directory

Writes benchmarks/results/hf_load.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_common import load_average, run_json_child, vm_hwm_bytes, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "hf_load.json"
MODES = ("imports-only", "float", "minituner-qlora", "transformers-bnb")


def child(mode: str, directory: str) -> dict:
    """Load the model one way in this process (every mode pays the same imports first)."""
    import warnings

    warnings.simplefilter("ignore")
    import torch
    import transformers

    from minituner.hf import load_hf_model
    from minituner.hf.load import load_quantized_hf_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        if mode == "float":
            model = load_hf_model(directory)
        elif mode == "minituner-qlora":
            model = load_quantized_hf_model(directory)
        elif mode == "transformers-bnb":
            config = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory, quantization_config=config, device_map="cpu")
        else:
            model = None
    except (OSError, ValueError, KeyError) as exc:  # a bad model directory: one line, no trace
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"cannot load the model ({mode}): {message}") from None
    seconds = time.perf_counter() - start
    if model is not None:  # one forward touches every weight (a lazily mapped file counts then)
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    held = 0 if model is None else sum(
        t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    # VmHWM (this process image's high-water mark); ru_maxrss would carry the parent's over exec
    return {"mode": mode, "load_s": seconds, "peak_rss_bytes": vm_hwm_bytes(),
            "model_tensor_bytes": held}


def main(argv=None) -> int:
    """Run every mode and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="transformers directory (default: random GPT-2 small)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.child:
        mode, directory = args.child
        if mode not in MODES:
            parser.error(f"--child: unknown mode {mode!r} (one of {', '.join(MODES)})")
        print(json.dumps(child(mode, directory)))
        return 0
    if args.model and not Path(args.model).is_dir():
        raise SystemExit(f"hf_load.py: --model {args.model}: not a directory")
    from minituner.hf.toy import write_toy_model

    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.model) if args.model else write_toy_model(
            Path(tmp) / "gpt2-small", "gpt2", "gpt2-small")
        started = time.perf_counter()
        rows = [run_json_child([__file__, "--child", mode, directory]) for mode in MODES]
    write_results(args.out, {
        "model": str(args.model or "random-init GPT-2 small shape (768 x 12, vocab 50257)"),
        "rows": rows, "wall_s": time.perf_counter() - started,
        "note": "peak RSS includes imports; compare each row with 'imports-only'",
        "load_average_before": load_before,
    })
    print("| mode | load s | peak RSS MB | over imports MB | model tensors MB |")
    print("|---|---|---|---|---|")
    floor = rows[0]["peak_rss_bytes"]
    for row in rows:
        print(f"| {row['mode']} | {row['load_s']:.2f} | {row['peak_rss_bytes'] / 1e6:.0f} | "
              f"{(row['peak_rss_bytes'] - floor) / 1e6:.0f} | "
              f"{row['model_tensor_bytes'] / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
