"""Fine-tuning end to end on a tiny base (plumbing, not accuracy), the eval/report/generate
commands on its run folder, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from minituner.cli import main
from minituner.util.files import atomic_save_safetensors, load_safetensors, read_json

TINY = ["--steps", "4", "--batch-size", "8", "--eval-every", "2", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def lora_run(tiny_base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "lora"
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), *TINY]) == 0
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_run_folder_layout_and_results(lora_run):
    for name in ("config.json", "manifest.json", "results.json", "train_log.jsonl", "loss.png",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "data/sft_train.jsonl", "data/control.jsonl"):
        assert (lora_run / name).is_file(), name
    assert list((lora_run / "checkpoints").glob("step-*.pt"))
    res = read_json(lora_run / "results.json")
    for key in ("irregular_accuracy_base", "irregular_accuracy_tuned", "regular_accuracy_base",
                "regular_accuracy_tuned"):
        assert 0 <= res[key] <= 1, key
    assert res["control_ppl_tuned"] > 1 and res["control_ppl_base"] > 1
    assert res["trainable_params"] == 2304 * 8
    assert set(res["control_ppl_by_tense_tuned"]) == {
        "infinitive", "present", "past", "participle", "future"}
    assert res["peak_rss_bytes"] > 0 and "every import included" in res["peak_rss_note"]
    tb = res["tensor_bytes"]
    assert tb["parameters_trainable_bytes"] == 4 * 2304 * 8
    assert tb["gradient_bytes"] == tb["parameters_trainable_bytes"]
    assert tb["optimizer_state_bytes"] >= 2 * tb["parameters_trainable_bytes"]
    assert tb["saved_activation_bytes"] > 0
    log = [json.loads(line) for line in (lora_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "val_loss" in log[1]
    assert read_json(lora_run / "manifest.json")["seed"] == 0


def test_eval_json_and_adapter_paths_agree(lora_run, tiny_base_run, capsys):
    assert main(["eval", "--model", str(lora_run), "--json"]) == 0
    via_run = json.loads(capsys.readouterr().out)
    assert set(via_run) == {"slices", "unk_candidates", "control_ppl"}
    assert via_run["slices"]["irregular-past"]["n"] == 96
    assert main(["eval", "--model", str(tiny_base_run), "--adapter", str(lora_run / "adapter"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == via_run
    res = read_json(lora_run / "results.json")
    assert via_run["control_ppl"] == pytest.approx(res["control_ppl_tuned"], rel=1e-6)


def test_generate_with_the_adapter(lora_run, capsys):
    assert main(["generate", "--model", str(lora_run), "--prompt", "yesterday he ",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("yesterday he ")


def test_report_from_run_files(lora_run, tmp_path, capsys):
    out = tmp_path / "REPORT.md"
    assert main(["report", str(lora_run), "--out", str(out)]) == 0
    text = out.read_text()
    res = read_json(lora_run / "results.json")
    assert f"{res['irregular_accuracy_tuned']:.3f}" in text
    assert f"{res['control_ppl_tuned']:.4f}" in text
    assert "minituner finetune --base" in text and (tmp_path / "loss_curves.png").is_file()


@pytest.mark.slow
def test_full_and_qlora_runs(tiny_base_run, tmp_path, capsys):
    full = tmp_path / "full"
    assert main(["finetune", "--base", str(tiny_base_run), "--method", "full",
                 "--out", str(full), *TINY]) == 0
    assert (full / "model.safetensors").is_file() and not (full / "adapter").exists()
    res = read_json(full / "results.json")
    assert res["trainable_params"] == 103_680 and res["tensor_bytes"]["kl_reference_bytes"] > 0
    assert main(["eval", "--model", str(full), "--json"]) == 0
    qlora = tmp_path / "qlora"
    assert main(["finetune", "--base", str(tiny_base_run), "--method", "qlora", "--epochs",
                 "0.05", "--batch-size", "8", "--out", str(qlora)]) == 0
    q = read_json(qlora / "results.json")["qlora"]
    assert 0 < q["logit_difference"]["relative"] < 1
    setups = [row["setup"] for row in q["memory_table"]]
    assert setups == ["full-precision base + LoRA", "NF4 base + LoRA (QLoRA)"]
    lora_row, qlora_row = q["memory_table"]
    assert qlora_row["measured"]["weights"] < lora_row["measured"]["weights"]
    capsys.readouterr()
    assert main(["eval", "--model", str(qlora), "--json"]) == 0  # NF4 base rebuilt from the adapter
    assert json.loads(capsys.readouterr().out)["control_ppl"] > 1


def test_bad_inputs_are_one_line_errors(lora_run, tiny_base_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--rank", "-1", "--out", str(tmp_path / "x")])
    assert info.value.code == 2 and "--rank" in one_line_error(capsys)
    assert main(["finetune", "--method", "bogus", "--base", str(tiny_base_run),
                 "--out", str(tmp_path / "x")]) == 1
    assert "--method must be one of" in one_line_error(capsys)
    assert main(["finetune", "--rank", "0", "--base", str(tiny_base_run),
                 "--out", str(tmp_path / "r0"), *TINY]) == 1
    assert "nothing is trainable" in one_line_error(capsys)
    assert main(["eval", "--model", str(tmp_path)]) == 1
    assert "not a run folder" in one_line_error(capsys)
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "he ___", "candidates": ["a", "b"], "answer": "a", '
                      '"slice": "s"}\n{"prompt": "he ___", "candidates": ["a", "b"], '
                      '"answer": "c", "slice": "s"}\n')
    assert main(["eval", "--model", str(tiny_base_run), "--probes", str(probes)]) == 1
    assert "probes.jsonl:2: answer 'c' is not among" in one_line_error(capsys)
    other = tmp_path / "other_base"
    shutil.copytree(tiny_base_run, other)
    weights = load_safetensors(other / "model.safetensors")
    weights["ln_f.bias"] = weights["ln_f.bias"] + 0.01
    atomic_save_safetensors(other / "model.safetensors", weights)
    assert main(["eval", "--model", str(other), "--adapter", str(lora_run / "adapter")]) == 1
    assert "trained on another base" in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["finetune", "--base", str(tmp_path / "empty"), "--out", str(tmp_path / "y")]) == 1
    assert "not a model run folder" in one_line_error(capsys)


def test_config_file_then_flags(tiny_base_run, tmp_path, capsys):
    config = tmp_path / "ft.yaml"
    config.write_text("rank: 2\nsteps: 2\nbatch-size: 8\nreplay: 0.25\nkl: 0\n")
    out = tmp_path / "cfg"
    assert main(["finetune", "--base", str(tiny_base_run), "--config", str(config),
                 "--steps", "3", "--out", str(out)]) == 0
    res = read_json(out / "results.json")
    assert (res["rank"], res["steps"], res["replay"], res["kl"]) == (2, 3, 0.25, 0.0)
    capsys.readouterr()
    config.write_text("rnak: 2\n")
    assert main(["finetune", "--base", str(tiny_base_run), "--config", str(config),
                 "--out", str(tmp_path / "bad")]) == 1
    err = one_line_error(capsys)
    assert "unknown key(s) ['rnak']" in err and "known keys: [" in err and "'rank'" in err


def test_config_file_reads_numbers_written_as_text(tiny_base_run, tmp_path):
    config = tmp_path / "ft.yaml"  # PyYAML reads 1e-3 (no dot) as the text "1e-3"
    config.write_text(f"model: {tiny_base_run}\nlr: 1e-3\nsteps: 2\nbatch_size: 8\n"
                      "replay: 0.25\nkl: 0\n")
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(config), "--out", str(out)]) == 0
    recorded = read_json(out / "config.json")
    assert recorded["finetune"]["lr"] == 0.001 and recorded["finetune"]["model"] == str(
        tiny_base_run)
    assert recorded["format"] == 1 and recorded["model_kind"] == "minigpt"


def test_threads_take_effect_and_are_recorded(tiny_base_run, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    seen: list = []
    out = tmp_path / "run"
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), "--threads", "2",
                 *TINY]) == 0
    assert seen == [2] and read_json(out / "config.json")["finetune"]["threads"] == 2
    # threads do not decide results: a resume on another thread count is accepted
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), "--threads", "1",
                 "--resume", *TINY]) == 0


def test_resume_names_the_settings_that_differ(tiny_base_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), "--resume",
                 "--lr", "0.5", *TINY]) == 1
    assert "finetune.lr" in one_line_error(capsys)


def test_a_newer_run_folder_format_is_refused(lora_run, tiny_base_run, tmp_path, capsys):
    newer = tmp_path / "newer"
    shutil.copytree(lora_run, newer)
    config = read_json(newer / "config.json")
    (newer / "config.json").write_text(json.dumps({**config, "format": 99}))
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(newer), "--resume",
                 *TINY]) == 1
    err = one_line_error(capsys)
    assert "config.json" in err and "'format'" in err
    assert main(["eval", "--model", str(newer)]) == 1
    assert "'format'" in one_line_error(capsys)


@pytest.mark.parametrize("flags, message", [
    (["--max-len", "16"], "--max-len cannot be used with Mini-GPT models"),
    (["--use-rslora"], "--use-rslora cannot be used with Mini-GPT models"),
    (["--dtype", "bf16"], "--dtype cannot be used with Mini-GPT models"),
    (["--val-fraction", "0.2"], "--val-fraction cannot be used with Mini-GPT models"),
    (["--device", "cpu"], "--device cannot be used with Mini-GPT models"),
])
def test_a_flag_the_model_kind_cannot_use_is_one_line(tiny_base_run, tmp_path, capsys, flags,
                                                      message):
    out = tmp_path / "x"
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), *flags]) == 1
    assert message in one_line_error(capsys) and not out.exists()


def test_help_shows_the_defaults_of_each_model_kind(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("optimizer steps (default 600; hf: models 100)",
                  "peak learning rate (default 0.01; hf: models 0.0002)",
                  "(default 32; hf: models 8)", "LoRA dropout (default 0.2; hf: models 0)"):
        assert shown in text, shown


def test_user_training_file(tiny_base_run, tmp_path, capsys):
    rows = [{"prompt": f"{s} ___ home", "completion": "went"} for s in
            ("yesterday he", "yesterday she", "then i", "once we", "last night they")] * 6
    train = tmp_path / "mine.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mine"
    assert main(["finetune", "--base", str(tiny_base_run), "--train-data", str(train),
                 "--out", str(out), "--steps", "2", "--batch-size", "4"]) == 0
    kept = [json.loads(line) for name in ("train", "validation", "test")
            for line in (out / "data" / f"sft_{name}.jsonl").read_text().splitlines()]
    assert len(kept) == 30 and all(r["completion"] == "went" for r in kept)


@pytest.mark.parametrize("line, message", [
    ("lr: abc\n", "'lr' must be a number, got 'abc'"),
    ("batch_size: \"8x\"\n", "'batch_size' must be an integer, got '8x'"),
    ("kl: true\n", "'kl' must be a number, got True"),
    ("steps: 2.5\n", "'steps' must be an integer or null, got 2.5"),
    ("targets: attn\n", "'targets' must be a list of strings or null, got 'attn'"),
])
def test_config_file_values_are_type_checked(tiny_base_run, tmp_path, capsys, line, message):
    config = tmp_path / "ft.yaml"
    config.write_text(line)
    out = tmp_path / "run"
    assert main(["finetune", "--base", str(tiny_base_run), "--config", str(config),
                 "--out", str(out)]) == 1
    err = one_line_error(capsys)
    assert message in err and "ft.yaml" in err
    assert not out.exists()


def test_config_types_in_the_library():
    from minituner.course.finetune import FinetuneConfig

    assert FinetuneConfig.from_dict({"alpha": 16, "lr": 1}).validate().alpha == 16  # int ok
    with pytest.raises(ValueError, match="finetune config: 'rank' must be an integer"):
        FinetuneConfig.from_dict({"rank": True})
    with pytest.raises(ValueError, match="'method' must be a string"):
        FinetuneConfig(method=3).validate()


def test_bad_settings_leave_no_run_folder_and_keep_an_old_one(lora_run, tiny_base_run, tmp_path,
                                                              capsys):
    fresh = tmp_path / "fresh"
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(fresh), "--targets",
                 "bogus", *TINY]) == 1
    assert "bogus" in one_line_error(capsys) and not fresh.exists()
    old = tmp_path / "old"
    shutil.copytree(lora_run, old)
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(old), "--overwrite",
                 "--targets", "bogus", *TINY]) == 1
    one_line_error(capsys)
    assert (old / "results.json").is_file() and (old / "adapter").is_dir()
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(old), "--overwrite",
                 "--rank", "0", *TINY]) == 1
    assert "nothing is trainable" in one_line_error(capsys)
    assert (old / "results.json").is_file()


def test_batch_split_is_checked_before_anything_runs(tiny_base_run, tmp_path, capsys):
    out = tmp_path / "x"
    base = ["finetune", "--base", str(tiny_base_run), "--out", str(out)]
    assert main([*base, "--batch-size", "2", "--replay", "0.9"]) == 1
    err = one_line_error(capsys)
    assert "--batch-size 2 with --replay 0.9 leaves no fine-tuning rows" in err
    assert main([*base, "--batch-size", "1", "--replay", "0.3"]) == 1  # kl 3 by default
    assert "--kl needs replay rows" in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv, flag", [
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["count", "--rank", "-1"], "--rank"),
    (["memory", "--batch", "0"], "--batch"),
    (["experiment", "--out", "x", "--qlora-epochs", "0"], "--qlora-epochs"),
    (["experiment", "--out", "x", "--qlora-batch-size", "-2"], "--qlora-batch-size"),
    (["quiz", "bogus-subcommand"], "invalid choice"),
    (["quiz", "take", "--lang", "fr"], "--lang"),  # a nested subcommand
])
def test_usage_errors_are_one_line_in_every_subcommand(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and flag in one_line_error(capsys)


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from minituner.cli import build_parser; p = build_parser(); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_run_with_progress_closes_the_bar_when_the_run_fails(monkeypatch):
    from minituner.course import finetune

    events = []

    class Bar:
        def start(self, total):
            events.append(("start", total))

        def on_step(self, record):
            events.append("step")

        def close(self):
            events.append("close")

    def failing(base, out, cfg, resume, overwrite, on_start, on_step):
        on_start({"steps": 3})
        on_step({})
        raise ValueError("boom")

    monkeypatch.setattr(finetune, "run_finetune", failing)
    with pytest.raises(ValueError, match="boom"):
        finetune.run_with_progress("base", "out", finetune.FinetuneConfig(), Bar())
    assert events == [("start", 3), "step", "close"]
