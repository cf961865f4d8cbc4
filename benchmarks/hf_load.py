"""Peak memory and time of loading a GPT-2-small-shape model: float, QLoRA quantize-while-loading,
and transformers + bitsandbytes 4-bit loading. Each way runs in its own process (peak RSS =
VmHWM of that process, imports included); "imports only" is the floor every process pays.
After loading, each process runs one forward pass on 8 tokens, so every weight is resident
(transformers maps the file lazily).

    .venv/bin/python benchmarks/hf_load.py                 # random-init GPT-2 small, written once
    .venv/bin/python benchmarks/hf_load.py --model DIR     # any local transformers directory

Writes benchmarks/results/hf_load.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results" / "hf_load.json"

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
import transformers
from minituner.hf import load_hf_model
from minituner.hf_load import load_quantized_hf_model
mode, directory = sys.argv[1], sys.argv[2]
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
start = time.perf_counter()
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
seconds = time.perf_counter() - start
if model is not None:  # one forward touches every weight (a lazily mapped file counts only then)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
held = 0 if model is None else sum(
    t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
# VmHWM (this process image's high-water mark); ru_maxrss would carry the parent's over exec
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
peak = int(status[0]) * 1024
print(json.dumps({"mode": mode, "load_s": seconds, "peak_rss_bytes": peak,
                  "model_tensor_bytes": held}))
"""

MODES = ("imports-only", "float", "minituner-qlora", "transformers-bnb")


def measure(mode: str, directory: Path) -> dict:
    """One loading mode in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(directory)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run every mode and write the results."""
    from minituner.files import atomic_write_json, hardware_info, package_versions
    from minituner.hf_toy import write_toy_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="transformers directory (default: random GPT-2 small)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.model) if args.model else write_toy_model(
            Path(tmp) / "gpt2-small", "gpt2", "gpt2-small")
        started = time.perf_counter()
        rows = [measure(mode, directory) for mode in MODES]
    atomic_write_json(RESULTS, {
        "model": str(args.model or "random-init GPT-2 small shape (768 x 12, vocab 50257)"),
        "rows": rows, "wall_s": time.perf_counter() - started,
        "versions": package_versions(), "hardware": hardware_info(),
        "note": "peak RSS includes imports; compare each row with 'imports-only'",
    })
    print("| mode | load s | peak RSS MB | over imports MB | model tensors MB |")
    print("|---|---|---|---|---|")
    floor = rows[0]["peak_rss_bytes"]
    for row in rows:
        print(f"| {row['mode']} | {row['load_s']:.2f} | {row['peak_rss_bytes'] / 1e6:.0f} | "
              f"{(row['peak_rss_bytes'] - floor) / 1e6:.0f} | "
              f"{row['model_tensor_bytes'] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
