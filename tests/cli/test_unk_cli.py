"""Mini-GPT fine-tuning on text its 64-token tokenizer cannot spell: counted, warned about,
and refused when a completion is mostly <unk> unless --allow-unk."""

from __future__ import annotations

import json

from minituner.cli import main
from minituner.util.files import read_json

FRAMES = ("yesterday he", "yesterday she", "then i", "once we", "last night they")
SHORT = ["--steps", "2", "--batch-size", "4"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def warnings(err: str) -> list:
    return [line for line in err.splitlines() if "warning:" in line]


def test_mostly_unknown_completions_are_refused_naming_the_line_and_flag(tiny_base_run,
                                                                         tmp_path, capsys):
    rows = [{"prompt": f"{s} ___ home", "completion": "went"} for s in FRAMES] * 2
    rows[3] = {"prompt": "yesterday he ___ home", "completion": "😀🏠"}
    rows[6] = {"prompt": "yesterday she ___ home", "completion": "回家"}
    rows[8] = {"prompt": "then i ___ home", "completion": "WENT"}
    train = write_rows(tmp_path / "odd.jsonl", rows)
    out = tmp_path / "odd"
    assert main(["finetune", "--base", str(tiny_base_run), "--train-data", str(train),
                 "--out", str(out), *SHORT]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{train}:4: 2 of 2 completion tokens are <unk>" in err
    assert "3 completion(s) like it" in err and "--allow-unk" in err
    assert not out.exists()

    assert main(["finetune", "--base", str(tiny_base_run), "--train-data", str(train),
                 "--out", str(out), *SHORT, "--allow-unk"]) == 0
    err = capsys.readouterr().err
    assert len(warnings(err)) == 1 and f"first at {train}:4" in warnings(err)[0]
    unk = read_json(out / "results.json")["unk"]
    assert (unk["examples"], unk["characters"], unk["mostly_unk"]) == (3, 8, 3)
    assert unk["total_examples"] == 10
    assert read_json(out / "config.json")["finetune"]["allow_unk"] is True


def test_a_few_unknown_prompt_characters_warn_once_with_the_counts(tiny_base_run, tmp_path,
                                                                  capsys):
    rows = [{"prompt": f"{s} ___ home", "completion": "went"} for s in FRAMES] * 2
    rows[1] = {"prompt": "Yesterday she ___ home!", "completion": "went"}
    train = write_rows(tmp_path / "few.jsonl", rows)
    out = tmp_path / "few"
    assert main(["finetune", "--base", str(tiny_base_run), "--train-data", str(train),
                 "--out", str(out), *SHORT]) == 0
    found = warnings(capsys.readouterr().err)
    assert len(found) == 1, found
    assert "1 of 10 example(s)" in found[0] and "2 character(s) map to <unk>" in found[0]
    assert f"first at {train}:2" in found[0]
    unk = read_json(out / "results.json")["unk"]
    assert (unk["examples"], unk["characters"], unk["mostly_unk"]) == (1, 2, 0)


def test_clean_data_prints_no_warning(tiny_base_run, tmp_path, capsys):
    rows = [{"prompt": f"{s} ___ home", "completion": "went"} for s in FRAMES] * 2
    train = write_rows(tmp_path / "clean.jsonl", rows)
    assert main(["finetune", "--base", str(tiny_base_run), "--train-data", str(train),
                 "--out", str(tmp_path / "clean"), *SHORT]) == 0
    assert warnings(capsys.readouterr().err) == []
    assert read_json(tmp_path / "clean" / "results.json")["unk"]["examples"] == 0


def test_allow_unk_is_refused_for_transformers_models(tmp_path, capsys):
    assert main(["finetune", "--model", f"hf:{tmp_path}", "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "out"), "--allow-unk"]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--allow-unk cannot be used with transformers (hf:) models" in err
