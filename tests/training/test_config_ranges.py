"""Every setting goes through the same range checks whether it comes from a flag, a --config
file or code: FinetuneConfig.validate and PretrainConfig.validate."""

from __future__ import annotations

import math

import pytest

from minituner.cli import main
from minituner.training.config import FinetuneConfig, PretrainConfig


def run_cli(args: list) -> int:
    """The CLI's exit status, whether it returns one or exits (argparse usage errors)."""
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code)


def one_line_error(capsys, code: int) -> str:
    assert code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


FINETUNE_BAD = [
    ({"grad_clip": -1.0}, "grad_clip (a --config setting) must be a non-negative finite"),
    ({"grad_clip": math.inf}, "grad_clip (a --config setting) must be"),
    ({"seed": -7}, "--seed must be a non-negative int, got -7"),
    ({"lr": math.inf}, "--lr must be a positive finite number, got inf"),
    ({"lr": math.nan}, "--lr must be a positive finite number, got nan"),
    ({"alpha": math.inf}, "--alpha must be a positive finite number"),
    ({"weight_decay": -0.1}, "--weight-decay must be a non-negative finite number"),
    ({"weight_decay": math.inf}, "--weight-decay must be a non-negative finite number"),
    ({"kl": math.inf}, "--kl must be a non-negative finite number"),
    ({"replay_nll": math.inf}, "--replay-nll must be a non-negative finite number"),
    ({"epochs": math.inf, "steps": None}, "--epochs must be a positive finite number"),
]


@pytest.mark.parametrize("values,message", FINETUNE_BAD)
def test_finetune_config_refuses_out_of_range_values(values, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        FinetuneConfig.for_kind("minigpt", **values).validate()
    hf = {"model": "hf:x", **values}
    if "kl" not in values and "replay_nll" not in values:  # replay settings are Mini-GPT's
        with pytest.raises(ValueError, match="must be"):
            FinetuneConfig.for_kind("hf", **hf).validate()


def test_grad_clip_zero_still_means_no_clipping():
    assert FinetuneConfig.for_kind("minigpt", grad_clip=0.0).validate().grad_clip == 0.0
    assert PretrainConfig(grad_clip=0.0).validate().grad_clip == 0.0


PRETRAIN_BAD = [
    ({"seed": -7}, "--seed must be a non-negative int, got -7"),
    ({"lr": math.inf}, "--lr must be a positive finite number, got inf"),
    ({"lr": -1.0}, "--lr must be a positive finite number"),
    ({"steps": 0}, "--steps must be a positive int"),
    ({"batch_size": 0}, "--batch-size must be a positive int"),
    ({"grad_clip": -1.0}, r"grad_clip \(a --config setting\) must be a non-negative finite"),
    ({"weight_decay": math.nan}, r"weight_decay \(a --config setting\) must be"),
    ({"warmup_steps": -1}, r"warmup_steps \(a --config setting\) must be a non-negative int"),
    ({"eval_every": 0}, r"eval_every \(a --config setting\) must be a positive int"),
    ({"steps": 2.5}, "pretrain config: 'steps' must be an integer"),
]


@pytest.mark.parametrize("values,message", PRETRAIN_BAD)
def test_pretrain_config_refuses_out_of_range_values(values, message):
    with pytest.raises(ValueError, match="^" + message):
        PretrainConfig(**values).validate()


@pytest.mark.parametrize("text,field", [
    ("grad_clip: -1.0\n", "grad_clip"),
    ("seed: -7\n", "--seed"),
    ("lr: .inf\n", "--lr"),
    ("weight_decay: -1\n", "--weight-decay"),
])
def test_finetune_config_file_values_are_checked_like_flags(tiny_base_run, tmp_path, capsys,
                                                            text, field):
    config = tmp_path / "ft.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    code = main(["finetune", "--base", str(tiny_base_run), "--config", str(config),
                 "--out", str(out)])
    assert field in one_line_error(capsys, code)
    assert not out.exists()


def test_finetune_lr_flag_inf_is_refused(tiny_base_run, tmp_path, capsys):
    out = tmp_path / "run"
    code = run_cli(["finetune", "--base", str(tiny_base_run), "--lr", "inf", "--out", str(out)])
    err = one_line_error(capsys, code)  # the flag parser refuses it before the config checks
    assert "--lr" in err and "finite number, got inf" in err
    assert not out.exists()


@pytest.mark.parametrize("args,text,field", [
    ([], "grad_clip: -1.0\n", "grad_clip"),
    ([], "seed: -7\n", "--seed"),
    ([], "lr: .inf\n", "--lr"),
    (["--lr", "inf"], "", "--lr"),
])
def test_pretrain_values_are_checked_before_anything_is_written(tmp_path, capsys, args, text,
                                                                field):
    config = tmp_path / "pt.yaml"
    config.write_text(text or "steps: 2\n")
    out = tmp_path / "base"
    code = run_cli(["pretrain", "--config", str(config), "--out", str(out), *args])
    assert field in one_line_error(capsys, code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt.yaml"]


def test_pretrain_batch_larger_than_the_corpus_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "base"
    code = main(["pretrain", "--batch-size", "9047", "--steps", "2", "--out", str(out)])
    err = one_line_error(capsys, code)
    assert "--batch-size 9047 is larger than the corpus's 9046 training lines" in err
    assert list(tmp_path.iterdir()) == []  # no run folder, no staged corpus left behind
