"""eval / generate / merge / report on a transformers run folder like on a Mini-GPT one; the
config.json dispatch and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import write_data

from minituner.cli import main
from minituner.cli.runfolders import MINIGPT, TRANSFORMERS, model_kind, read_run_folder
from minituner.course.data import completion_sequence, text_sequence
from minituner.hf.inference import run_inference_views

FAST = ["--steps", "2", "--batch-size", "4", "--eval-every", "2", "--checkpoint-every", "2",
        "--rank", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def hf_run(toy_hf_model, tmp_path_factory):
    """A finished transformers LoRA run folder on the toy GPT-2 (validation split included)."""
    root = tmp_path_factory.mktemp("hf_run")
    data = write_data(root / "data.jsonl")
    out = root / "run"
    assert main(["finetune", "--model", f"hf:{toy_hf_model('gpt2')}", "--data", str(data),
                 "--out", str(out), "--val-fraction", "0.25", *FAST]) == 0
    return out


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def copy_run(run, tmp_path, **changes):
    """A run folder holding only a config.json with ``changes`` applied (None deletes)."""
    config = json.loads((run / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    folder = tmp_path / "copy"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_dispatch_reads_config_json(hf_run, tiny_base_run):
    assert read_run_folder(hf_run).model_kind == TRANSFORMERS
    assert read_run_folder(tiny_base_run).model_kind == MINIGPT
    assert model_kind("hf:anything") == TRANSFORMERS  # no folder is read for hf:DIR


def test_eval_of_a_run_is_its_base_plus_adapter_without_probe_warnings(hf_run, toy_hf_model,
                                                                       capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(hf_run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("control perplexity ") and len(captured.out.splitlines()) == 1
    assert "<unk>" not in captured.err and "warning" not in captured.err
    assert main(["eval", "--model", str(hf_run), "--json"]) == 0
    via_run = json.loads(capsys.readouterr().out)
    assert via_run["slices"] == {} and via_run["unk_candidates"] == []
    assert main(["eval", "--model", f"hf:{toy_hf_model('gpt2')}", "--adapter",
                 str(hf_run / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == via_run
    assert main(["eval", "--model", f"hf:{toy_hf_model('gpt2')}", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["control_ppl"] != via_run["control_ppl"]  # the adapter is applied


def test_verb_probes_only_when_asked_and_warnings_on_one_stderr_line(hf_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(hf_run), "--verb-probes"]) == 0
    captured = capsys.readouterr()
    assert "irregular-past" in captured.out and "warning" not in captured.out
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 1 and "probe candidate(s) contain <unk>" in warnings[0]


def test_control_prompt_completion_scores_the_completion_tokens(hf_run, tmp_path, capsys):
    records = [{"prompt": "the cat saw", "completion": " a dog"},
               {"text": "a dog saw the cat"}]
    control = tmp_path / "control.jsonl"
    control.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    assert main(["eval", "--model", str(hf_run), "--control", str(control), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["control_ppl"]
    model, tokenizer = run_inference_views(hf_run)
    sequences = [completion_sequence(tokenizer, "the cat saw", " a dog"),
                 text_sequence(tokenizer, "a dog saw the cat")]
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            logp = torch.log_softmax(model(torch.tensor([seq["ids"]]))[0], dim=-1)
            for i, scored in enumerate(seq["mask"]):
                if scored:
                    total -= float(logp[i, seq["ids"][i + 1]])
                    count += 1
    assert sum(sequences[0]["mask"]) < len(sequences[0]["mask"])  # the prompt is not scored
    assert got == pytest.approx(float(torch.tensor(total / count).exp()), rel=1e-4)
    control.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    code = main(["eval", "--model", str(hf_run), "--control", str(control)])
    assert "control record 1 needs string fields 'prompt' and 'completion'" in \
        one_line_error(capsys, code)


def test_generate_from_a_run_equals_base_plus_adapter(hf_run, toy_hf_model, capsys):
    capsys.readouterr()
    args = ["--prompt", "the cat", "--max-new-tokens", "4"]
    assert main(["generate", "--model", str(hf_run), *args]) == 0
    via_run = capsys.readouterr().out
    assert main(["generate", "--model", f"hf:{toy_hf_model('gpt2')}", "--adapter",
                 str(hf_run / "adapter"), *args]) == 0
    assert via_run.startswith("the cat") and capsys.readouterr().out == via_run


def test_merge_of_a_run_writes_a_transformers_directory(hf_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["merge", "--model", str(hf_run), "--out", str(tmp_path / "merged")]) == 0
    assert "merged 8 layers (dequantized)" in capsys.readouterr().out
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["adapter"] == str(hf_run / "adapter")
    assert report["reloaded_from_directory"]["max_abs_diff"] < 1e-4
    assert main(["eval", "--model", f"hf:{tmp_path / 'merged'}", "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)["control_ppl"]
    assert main(["eval", "--model", str(hf_run), "--json"]) == 0
    assert merged == pytest.approx(json.loads(capsys.readouterr().out)["control_ppl"], rel=1e-4)


def test_report_of_a_transformers_run_beside_a_base(hf_run, tiny_base_run, tmp_path, capsys):
    out = tmp_path / "REPORT.md"
    assert main(["report", str(hf_run), str(tiny_base_run), "--out", str(out)]) == 0
    text = out.read_text()
    results = json.loads((hf_run / "results.json").read_text())
    assert "## Transformers runs" in text and f"{results['final_loss']:.4f}" in text
    assert f"{results['best_val_loss']:.4f} ({results['best_step']})" in text
    assert "minituner finetune --model hf:" in text and "validation perplexity" in text
    assert (tmp_path / "loss_curves.png").is_file()


@pytest.mark.parametrize("command", ["eval", "generate", "merge", "report"])
@pytest.mark.parametrize("change, field", [({"format": 2}, "'format'"),
                                           ({"format": "v1"}, "'format'"),
                                           ({"kind": "finetune-xyz"}, "'kind'"),
                                           ({"kind": None}, "'kind'")])
def test_unknown_run_folders_are_one_line(hf_run, tmp_path, capsys, command, change, field):
    folder = copy_run(hf_run, tmp_path, **change)
    argv = {"eval": ["eval", "--model", str(folder)],
            "generate": ["generate", "--model", str(folder)],
            "merge": ["merge", "--model", str(folder), "--out", str(tmp_path / "m")],
            "report": ["report", str(folder), "--out", str(tmp_path / "R.md")]}[command]
    message = one_line_error(capsys, main(argv))
    assert str(folder / "config.json") in message and f"field {field}" in message


def test_a_flag_the_model_kind_cannot_use_is_one_line(tiny_base_run, tmp_path, capsys):
    for argv in (["eval", "--model", str(tiny_base_run), "--device", "cpu"],
                 ["generate", "--model", str(tiny_base_run), "--device", "cuda"],
                 ["merge", "--model", str(tiny_base_run), "--out", str(tmp_path / "m"),
                  "--device", "cpu"]):
        message = one_line_error(capsys, main(argv))
        assert "--device: not used by a Mini-GPT model" in message, argv
    assert not (tmp_path / "m").exists()


def test_a_run_without_its_adapter_is_one_line(hf_run, tmp_path, capsys):
    folder = copy_run(hf_run, tmp_path)
    message = one_line_error(capsys, main(["eval", "--model", str(folder)]))
    assert str(folder / "adapter" / "adapter_config.json") in message
