"""``minituner count``: the LoRA parameter table of the default Mini-GPT."""

from __future__ import annotations

import json

import pytest

from minituner.cli import main


def run_json(capsys, *args: str) -> dict:
    assert main(["count", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_total_at_rank_8(capsys):
    table = run_json(capsys, "--rank", "8")
    assert table["totals"]["lora_params"] == 18_432
    assert table["totals"]["n_linears"] == 12 and len(table["rows"]) == 12
    assert table["totals"]["model_params"] == 103_680
    row = table["rows"][0]
    assert row == {"name": "blocks.0.attn.q_proj", "shape": [64, 64], "full_params": 4096,
                   "lora_params": 1024, "ratio": 0.25}


@pytest.mark.parametrize("r", [0, 1, 2, 4, 16, 32])
def test_total_is_2304_r(capsys, r):
    assert run_json(capsys, "--rank", str(r))["totals"]["lora_params"] == 2304 * r


def test_targets_and_all_linear(capsys):
    table = run_json(capsys, "--rank", "8", "--targets", "q_proj", "mlp.fc1")
    assert [row["name"] for row in table["rows"]] == [
        "blocks.0.attn.q_proj", "blocks.0.mlp.fc1", "blocks.1.attn.q_proj", "blocks.1.mlp.fc1"]
    assert table["totals"]["lora_params"] == 2 * 1024 + 2 * 2560
    assert run_json(capsys, "--targets", "all-linear")["totals"]["lora_params"] == 18_432


def test_text_table(capsys):
    assert main(["count", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.mlp.fc2" in out and "64x256" in out
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert "18,432" in total_line and "98,304" in total_line and "12 Linears" in total_line


def test_bad_input(capsys):
    assert main(["count", "--targets", "proj"]) == 1
    err = capsys.readouterr().err
    assert "'proj' matches no Linear" in err and "blocks.0.attn.q_proj" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as info:
        main(["count", "--rank", "-1"])
    assert info.value.code == 2
