"""--lr-scheduler cosine|linear|constant with --warmup-steps or --warmup-ratio (TRL's names)."""

from __future__ import annotations

import pytest
import torch

from minituner.cli import build_parser
from minituner.cli.trainflags import config_from_args
from minituner.training.config import FinetuneConfig
from minituner.training.loop import build_scheduler, warmup_cosine, warmup_steps_of


def _lrs(kind: str, total: int = 10, warmup: int = 2) -> list:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, total, warmup, kind=kind)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_is_the_default_schedule_unchanged():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, 10, 2)
    assert scheduler.get_last_lr()[0] == warmup_cosine(0, 10, 2)
    assert _lrs("cosine") == [warmup_cosine(s, 10, 2) for s in range(10)]


def test_linear_decays_to_zero_after_warmup():
    lrs = _lrs("linear", total=10, warmup=2)
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert lrs[-1] == pytest.approx(1 / 8)


def test_constant_holds_after_warmup():
    assert _lrs("constant", total=6, warmup=2) == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="--lr-scheduler"):
        _lrs("step")
    with pytest.raises(ValueError, match="--lr-scheduler"):
        FinetuneConfig(lr_scheduler="step").validate()


def test_warmup_steps_win_over_the_ratio_and_are_capped():
    assert warmup_steps_of(FinetuneConfig(warmup=0.5), 10) == 5
    assert warmup_steps_of(FinetuneConfig(warmup_steps=3), 10) == 3
    assert warmup_steps_of(FinetuneConfig(warmup_steps=30), 10) == 10


def _args(*flags):
    return build_parser().parse_args(["finetune", "--out", "x", *flags])


def test_trl_names_are_aliases():
    cfg = config_from_args(_args("--learning-rate", "0.003", "--warmup-ratio", "0.2",
                                 "--lr-scheduler", "linear"))
    assert (cfg.lr, cfg.warmup, cfg.lr_scheduler) == (0.003, 0.2, "linear")
    assert config_from_args(_args("--warmup", "0.3")).warmup == 0.3
    assert config_from_args(_args("--warmup-steps", "7")).warmup_steps == 7


def test_warmup_steps_and_ratio_together_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        _args("--warmup-steps", "3", "--warmup-ratio", "0.1")
    config = tmp_path / "ft.json"
    config.write_text('{"warmup_steps": 3}')
    with pytest.raises(ValueError, match="--warmup-steps or --warmup-ratio"):
        config_from_args(_args("--warmup", "0.1", "--config", str(config)))
