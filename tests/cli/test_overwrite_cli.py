"""--out and --overwrite from the command line: only minituner's own folders are replaced, an
--out overlapping the inputs is refused before anything happens, and a merge --overwrite killed
at any moment leaves the old or the new output whole."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minituner.cli import main
from minituner.lora import lora_layers, wrap_minigpt_with_lora
from minituner.lora.adapters import save_adapter
from minituner.training.runs import load_model
from minituner.util.files import recover_directory, sha256_file

TINY = ["--steps", "2", "--batch-size", "8"]


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def adapters(tiny_base_run, tmp_path_factory):
    """Two different LoRA adapters of the tiny base (so old and new merges differ)."""
    root = tmp_path_factory.mktemp("adapters")
    made = []
    for seed in (1, 2):
        model, _, _ = load_model(tiny_base_run)
        model = wrap_minigpt_with_lora(model, r=4, seed=0)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        save_adapter(model, root / f"adapter{seed}")
        made.append(root / f"adapter{seed}")
    return made


def test_overwrite_refuses_a_folder_minituner_did_not_write(tiny_base_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("three years of work")
    code = main(["finetune", "--base", str(tiny_base_run), "--out", str(mine), "--overwrite",
                 *TINY])
    assert "holds thesis.txt, not a run, adapter or merged model" in one_line_error(capsys, code)
    code = main(["finetune", "--base", str(tiny_base_run), "--out", str(mine), *TINY])
    assert "holds thesis.txt" in one_line_error(capsys, code)  # no hint to use --overwrite
    code = main(["pretrain", "--out", str(mine), "--overwrite", "--steps", "2"])
    assert "holds thesis.txt" in one_line_error(capsys, code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (mine / "thesis.txt").read_text() == "three years of work"


@pytest.mark.parametrize("where", ["base", "inside-base", "data", "contains-data"])
def test_out_overlapping_the_base_or_the_data_is_refused(where, tiny_base_run, tmp_path,
                                                         capsys):
    rows = [{"prompt": f"{s} ___ home", "completion": "went"} for s in
            ("yesterday he", "yesterday she", "then i", "once we", "last night they")] * 4
    data = tmp_path / "data" / "mine.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {"base": tiny_base_run, "inside-base": tiny_base_run / "tuned", "data": data,
           "contains-data": data.parent}[where]
    flag = "--train-data" if "data" in where else "--base"
    before_base, before_data = snapshot(tiny_base_run), snapshot(data.parent)
    code = main(["finetune", "--base", str(tiny_base_run), "--train-data", str(data), "--out",
                 str(out), "--overwrite", *TINY])
    assert f" {flag} " in one_line_error(capsys, code)
    assert snapshot(tiny_base_run) == before_base and snapshot(data.parent) == before_data


def test_merge_out_overlapping_its_inputs_or_a_user_folder_is_refused(tiny_base_run, adapters,
                                                                       tmp_path, capsys):
    before = snapshot(tiny_base_run)
    for out, flag in ((tiny_base_run, "--model"), (adapters[0] / "m", "--adapter")):
        code = main(["merge", "--model", str(tiny_base_run), "--adapter", str(adapters[0]),
                     "--out", str(out), "--overwrite"])
        assert f"{flag} " in one_line_error(capsys, code)
    assert snapshot(tiny_base_run) == before and not (adapters[0] / "m").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep")
    code = main(["merge", "--model", str(tiny_base_run), "--adapter", str(adapters[0]),
                 "--out", str(mine), "--overwrite"])
    assert "holds notes.md" in one_line_error(capsys, code)
    assert (mine / "notes.md").read_text() == "keep"


def merge_command(base, adapter, out) -> list:
    return ["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out),
            "--overwrite"]


def test_merge_overwrite_killed_at_random_moments_leaves_old_or_new(tiny_base_run, adapters,
                                                                    tmp_path, capsys):
    outputs = {}
    for adapter in adapters:  # the two complete outputs a kill may leave
        out = tmp_path / f"whole-{adapter.name}"
        assert main(merge_command(tiny_base_run, adapter, out)) == 0
        outputs[adapter.name] = snapshot(out)
    assert outputs["adapter1"] != outputs["adapter2"]
    out = tmp_path / "merged"
    assert main(merge_command(tiny_base_run, adapters[0], out)) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rng = random.Random(0)
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "minituner",
             *merge_command(tiny_base_run, adapters[attempt % 2 == 0], out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(1.0, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover_directory(out)  # the next command's first step
        assert snapshot(out) in outputs.values()
        load_model(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("kind", ["minigpt", "hf"])
@pytest.mark.parametrize("bad", [["--batch-size", "100000"], ["--targets", "nothing_here"],
                                 ["--rank", "0"]])
def test_a_refused_run_leaves_no_folder_and_the_corrected_command_runs(kind, bad, tiny_base_run,
                                                                       toy_hf_model, tmp_path,
                                                                       capsys):
    from hf_helpers import write_data

    if kind == "hf":
        model = ["--model", f"hf:{toy_hf_model('gpt2')}", "--data",
                 str(write_data(tmp_path / "data.jsonl"))]
    else:
        model = ["--base", str(tiny_base_run)]
    out = tmp_path / "run"
    command = ["finetune", *model, "--out", str(out), "--steps", "2", "--batch-size", "4",
               "--eval-every", "2", "--checkpoint-every", "2"]
    code = main([*command, *bad])
    one_line_error(capsys, code)
    assert not out.exists()
    assert main(command) == 0


def test_hf_merge_overwrite_replaces_only_its_own_output(tmp_path, toy_hf_model, capsys):
    from hf_helpers import randomize_lora_b

    from minituner.hf.load import base_record, load_quantized_hf_model
    from minituner.lora import apply_lora

    directory = toy_hf_model("llama")
    model = apply_lora(load_quantized_hf_model(directory), "all-linear", r=4, alpha=8, seed=0)
    randomize_lora_b(model)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, extra=base_record(directory, "qlora", torch.float32))
    before = snapshot(Path(directory))
    command = ["merge", "--adapter", str(adapter), "--target", "requantized", "--overwrite"]
    for out, flag in ((Path(directory), "--model"), (Path(directory) / "m", "--model"),
                      (tmp_path, "--adapter")):
        code = main([*command, "--out", str(out)])
        assert f"{flag} " in one_line_error(capsys, code)
    assert snapshot(Path(directory)) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep")
    assert "holds thesis.txt" in one_line_error(capsys, main([*command, "--out", str(mine)]))
    merged = tmp_path / "merged"
    assert main([*command, "--out", str(merged)]) == 0
    first = snapshot(merged)
    assert main([*command, "--out", str(merged)]) == 0  # its own output: replaced
    assert snapshot(merged) == first and "merge_report.json" in first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def kill_at_random(command: list, seconds: tuple, rng: random.Random) -> None:
    """Run ``minituner COMMAND`` in a subprocess and SIGKILL it after a random time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "minituner", *command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        proc.wait(timeout=rng.uniform(*seconds))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_finetune_overwrite_killed_at_random_moments_leaves_old_or_new(tiny_base_run, tmp_path,
                                                                       capsys):
    from minituner.training.runs import run_status

    out = tmp_path / "run"
    command = ["finetune", "--base", str(tiny_base_run), "--out", str(out), "--steps", "12",
               "--batch-size", "8", "--eval-every", "6", "--checkpoint-every", "4"]
    assert main([*command, "--seed", "1"]) == 0
    capsys.readouterr()
    old = snapshot(out)
    rng = random.Random(0)
    for _ in range(4):
        kill_at_random([*command, "--seed", "2", "--overwrite"], (1.0, 8.0), rng)
        recover_directory(out)  # the next command's first step
        if snapshot(out) != old:  # the new run made it in: it is whole and finished
            assert run_status(out) == "finished"
            assert json.loads((out / "config.json").read_text())["finetune"]["seed"] == 2
            assert (out / "adapter" / "adapter_model.safetensors").is_file()
            break
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_hf_merge_overwrite_killed_at_random_moments_leaves_old_or_new(tmp_path, toy_hf_model,
                                                                       capsys):
    from hf_helpers import randomize_lora_b

    from minituner.hf.load import base_record, load_hf_model
    from minituner.lora import apply_lora

    directory = toy_hf_model("llama")
    adapters = []
    for seed in (1, 2):
        model = apply_lora(load_hf_model(directory), "all-linear", r=4, alpha=8, seed=0)
        randomize_lora_b(model, seed=seed)
        save_adapter(model, tmp_path / f"adapter{seed}",
                     extra=base_record(directory, "lora", torch.float32))
        adapters.append(tmp_path / f"adapter{seed}")
    out = tmp_path / "merged"
    outputs = {}  # the two whole outputs a kill may leave (merge_report.json names --out)
    for adapter in reversed(adapters):
        assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 0
        outputs[adapter.name] = snapshot(out)
    assert outputs["adapter1"] != outputs["adapter2"]
    capsys.readouterr()
    rng = random.Random(1)
    for attempt in range(3):
        adapter = adapters[attempt % 2 == 0]
        kill_at_random(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite"],
                       (2.0, 9.0), rng)
        recover_directory(out)
        assert snapshot(out) in outputs.values()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
