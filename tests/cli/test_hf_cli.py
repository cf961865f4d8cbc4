"""The command line on transformers models: finetune / eval / generate with hf:DIR, bad input."""

from __future__ import annotations

import json

import pytest
from hf_helpers import write_data

from minituner.cli import build_parser, main
from minituner.cli.trainflags import config_from_args

FAST = ["--steps", "2", "--batch-size", "4", "--eval-every", "2", "--checkpoint-every", "2",
        "--rank", "2", "--device", "cpu"]


def finetune(model_dir, data, out, *extra) -> int:
    return main(["finetune", "--model", f"hf:{model_dir}", "--data", str(data), "--out",
                 str(out), *FAST, *extra])


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_finetune_then_eval_and_generate(tmp_path, toy_hf_model, capsys):
    model_dir = toy_hf_model("gpt2")
    data = write_data(tmp_path / "data.jsonl")
    assert finetune(model_dir, data, tmp_path / "run", "--val-fraction", "0.25") == 0
    out = capsys.readouterr().out
    assert "device cpu (--device cpu), dtype fp32 (--dtype auto), processes 1" in out
    assert "-> " in out and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert main(["eval", "--model", f"hf:{model_dir}", "--adapter", str(tmp_path / "run" /
                 "adapter"), "--verb-probes", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["control_ppl"] > 1 and "irregular-past" in result["slices"]
    assert main(["generate", "--model", f"hf:{model_dir}", "--prompt", "the cat",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("the cat")


def test_long_examples_warn_or_refuse(tmp_path, toy_hf_model, capsys):
    model_dir = toy_hf_model("gpt2")
    data = write_data(tmp_path / "data.jsonl")
    with data.open("a") as handle:
        handle.write(json.dumps({"text": " ".join(["the cat saw a dog"] * 6)}) + "\n")
    assert finetune(model_dir, data, tmp_path / "cut", "--max-len", "16") == 0
    assert "1 training example(s) longer than 16 tokens were truncated (lines [25])" in \
        capsys.readouterr().err
    code = finetune(model_dir, data, tmp_path / "refused", "--max-len", "16", "--strict-len")
    assert "data.jsonl:25: 31 tokens with EOS" in one_line_error(capsys, code)
    code = finetune(model_dir, data, tmp_path / "huge", "--max-len", "4096")
    assert "exceeds the model's context of 128" in one_line_error(capsys, code)


def test_bad_input_is_one_line(tmp_path, toy_hf_model, capsys):
    model_dir = toy_hf_model("gpt2")
    data = write_data(tmp_path / "data.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(data.read_text() + '{"prompt": "a", "completion": \n')
    code = finetune(model_dir, broken, tmp_path / "x")
    assert "broken.jsonl:25: invalid JSON" in one_line_error(capsys, code)
    code = finetune(model_dir, data, tmp_path / "x", "--targets", "q_proj")
    message = one_line_error(capsys, code)
    assert "'q_proj' matches no Linear" in message and "transformer.h.0.attn.c_attn" in message
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code = finetune(bert, data, tmp_path / "x")
    assert "supports model_type gpt2, llama, mistral, qwen2, qwen3" in one_line_error(capsys,
                                                                                       code)


def test_adapter_from_another_base_is_refused(tmp_path, toy_hf_model, capsys):
    data = write_data(tmp_path / "data.jsonl")
    validation = write_data(tmp_path / "validation.jsonl", n=4, seed=9)
    assert finetune(toy_hf_model("gpt2"), data, tmp_path / "run", "--val-data",
                    str(validation)) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["validation_examples"] == 4 and results["train_examples"] == 24
    assert results["best_val_loss"] is not None
    code = main(["eval", "--model", f"hf:{toy_hf_model('gpt2', seed=1)}", "--adapter",
                 str(tmp_path / "run" / "adapter")])
    assert "base model fingerprint mismatch" in one_line_error(capsys, code)


def test_config_file_settings_reach_the_run(tmp_path):
    def settings(values: dict, *flags):
        path = tmp_path / "settings.json"
        path.write_text(json.dumps(values))
        args = build_parser().parse_args(["finetune", "--model", "hf:m", "--data", "d.jsonl",
                                          "--out", "o", "--config", str(path), *flags])
        return config_from_args(args)

    cfg = settings({"dtype": "bf16", "lr": 0.001})
    assert cfg.dtype == "bf16" and cfg.lr == 0.001 and cfg.steps == 100 and cfg.rank == 8
    assert settings({"dtype": "bf16"}, "--dtype", "fp32").dtype == "fp32"
    assert settings({}).dtype == "auto"
    cfg = settings({"epochs": 2})
    assert cfg.epochs == 2 and cfg.steps is None
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['replay_rows'\]"):
        settings({"replay_rows": 3})


def test_config_file_of_the_wrong_type_is_one_line(tmp_path, toy_hf_model, capsys):
    data = write_data(tmp_path / "data.jsonl")
    path = tmp_path / "settings.json"
    for field, value in (("lr", "abc"), ("max_len", "x")):
        path.write_text(json.dumps({field: value}))
        code = main(["finetune", "--model", f"hf:{toy_hf_model('gpt2')}", "--data", str(data),
                     "--out", str(tmp_path / "run"), "--config", str(path)])
        assert f"'{field}' must be" in one_line_error(capsys, code)


def test_unknown_device_is_one_line(tmp_path, toy_hf_model, capsys):
    code = main(["eval", "--model", f"hf:{toy_hf_model('gpt2')}", "--device", "gpu"])
    assert "--device must be auto, cpu or cuda[:N], got 'gpu'" in one_line_error(capsys, code)


@pytest.mark.parametrize("flags, message", [
    (["--replay", "0.5"], "--replay cannot be used with transformers (hf:) models"),
    (["--kl", "1"], "--kl cannot be used with transformers (hf:) models"),
    (["--replay", "0.5", "--kl", "1"], "--replay cannot be used with transformers (hf:) models"),
    (["--method", "full"],
     "--method must be one of ['lora', 'qlora', 'dora', 'qdora'] for transformers"),
    (["--dropout", "1.5"], "--dropout"),
])
def test_a_setting_the_model_kind_cannot_use_is_one_line(tmp_path, capsys, flags, message):
    argv = ["finetune", "--model", "hf:m", "--data", "d.jsonl", "--out", str(tmp_path / "x"),
            *flags]
    try:
        code = main(argv)
    except SystemExit as exit_:  # an argparse range check (--dropout 1.5)
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) == 1 and message in err[0], err
    assert "--lora-dropout" not in err[0]
    assert not (tmp_path / "x").exists()


def test_dropout_out_of_range_from_a_config_file_names_dropout(tmp_path, capsys):
    path = tmp_path / "settings.yaml"
    path.write_text("dropout: 1.5\n")
    code = main(["finetune", "--model", "hf:m", "--data", "d.jsonl", "--out",
                 str(tmp_path / "x"), "--config", str(path)])
    assert "--dropout must be a fraction in [0, 1), got 1.5" in one_line_error(capsys, code)


def test_a_config_file_describes_a_whole_transformers_run(tmp_path, toy_hf_model, monkeypatch):
    import torch

    data = write_data(tmp_path / "data.jsonl")
    path = tmp_path / "run.yaml"
    path.write_text(f"model: hf:{toy_hf_model('gpt2')}\ndata: {data}\nval_fraction: 0.25\n"
                    "lr: 1e-3\nsteps: 2\nbatch_size: 4\nrank: 2\neval_every: 2\nthreads: 2\n")
    seen: list = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(path), "--out", str(out), "--device", "cpu"]) == 0
    config = json.loads((out / "config.json").read_text())
    settings = config["finetune"]
    assert (settings["lr"], settings["val_fraction"], settings["threads"]) == (0.001, 0.25, 2)
    assert settings["model"].startswith("hf:") and settings["train_data"] == str(data)
    assert config["format"] == 1 and config["model_kind"] == "hf" and seen == [2]
    results = json.loads((out / "results.json").read_text())
    assert results["validation_examples"] == 6 and results["steps"] == 2


def test_config_file_unknown_keys_list_the_known_ones(tmp_path, capsys):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"lrate": 1, "rnak": 2}))
    code = main(["finetune", "--model", "hf:m", "--data", "d.jsonl", "--out",
                 str(tmp_path / "x"), "--config", str(path)])
    err = one_line_error(capsys, code)
    assert "unknown key(s) ['lrate', 'rnak']; known keys: [" in err and "'val_fraction'" in err
