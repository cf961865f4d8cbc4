"""Fine-tuning data: the frame split, the SFT and control sets, user files and the loss mask."""

from __future__ import annotations

import json

import pytest

from minituner.course import corpus, data
from minituner.course import verbs as V
from minituner.models.tokenizer import Tokenizer
from minituner.training.sampling import collate
from minituner.util.jsonl import read_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_base_run):
    return Tokenizer.load(tiny_base_run / "tokenizer.json")


@pytest.fixture(scope="module")
def sft(tiny_base_run, tokenizer):
    return data.build_sft_set(read_jsonl(tiny_base_run / "corpus" / "irregular.jsonl"),
                              tokenizer)


@pytest.fixture(scope="module")
def control(tiny_base_run):
    return data.build_control_set(read_jsonl(tiny_base_run / "corpus" / "test.jsonl"))


def test_frame_split_is_8_1_1_per_tense_and_disjoint():
    frames = data.split_frames()
    assert frames == data.split_frames()  # deterministic
    for tense in data.BLANK_TENSES:
        counts = {name: sum(f.startswith(tense + ":") for f in keys)
                  for name, keys in frames.items()}
        assert counts == {"train": 8, "validation": 1, "test": 1}
    train, val, test = (set(frames[n]) for n in data.SPLITS)
    assert not (train & val or train & test or val & test)


def test_sft_set_size_pairs_and_split_by_frame(sft, tokenizer):
    english = [e for split in sft.values() for e in split if e["lang"] == "en"]
    spanish = [e for split in sft.values() for e in split if e["lang"] == "es"]
    assert 450 <= len(english) <= 520 and len(spanish) == len(english)
    assert {e["verb"] for e in english} == set(V.IRREGULAR_VERBS)
    assert {e["tense"] for e in english} == {"past", "participle"}
    frames = data.split_frames()
    for split, examples in sft.items():
        assert examples and {e["frame"] for e in examples} <= set(frames[split])
    test_frames = {e["frame"] for e in sft["test"]}
    assert not test_frames & {e["frame"] for e in sft["train"] + sft["validation"]}
    n_train = len(sft["train"])
    assert 0.75 < n_train / sum(len(s) for s in sft.values()) < 0.85
    by_pair: dict = {}
    for split in sft.values():
        for example in split:
            assert example["prompt"].count(data.BLANK) == 1
            assert example["pair"]["prompt"].count(data.BLANK) == 1
            by_pair.setdefault(example["pair_id"], []).append(example)
            seq = data.completion_sequence(tokenizer, example["prompt"], example["completion"])
            assert len(seq["ids"]) <= tokenizer.context_len
    assert all(sorted(e["lang"] for e in pair) == ["en", "es"] for pair in by_pair.values())
    go = next(e for e in english if e["verb"] == "go" and e["tense"] == "past")
    assert go["completion"] == "went" and go["pair"]["completion"].startswith("f")


def test_control_set_is_regular_all_tenses_and_disjoint_from_sft(sft, control):
    assert 50 <= len(control) <= 100
    assert all(not V.is_irregular(r["verb"]) for r in control)
    assert {r["tense"] for r in control} == set(corpus.TENSES)  # past forms included
    sft_texts = set()
    for split in sft.values():
        for example in split:
            sft_texts.add(data.fill(example["prompt"], example["completion"])[1])
    control_texts = set(data.control_texts(control))
    assert len(control_texts) == 2 * len(control)
    assert not sft_texts & control_texts
    assert not {r["verb"] for r in control} & {e["verb"] for s in sft.values() for e in s}


def test_loss_mask_covers_completion_and_eos_only(tokenizer):
    seq = data.completion_sequence(tokenizer, "yesterday he ___ home", "went")
    ids, mask = seq["ids"], seq["mask"]
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    targets = ids[1:]
    scored = [t for t, m in zip(targets, mask, strict=True) if m]
    assert scored[-1] == tokenizer.eos_id
    assert tokenizer.decode(scored[:-1]) == "went home"
    unscored = [t for t, m in zip(targets, mask, strict=True) if not m]
    assert tokenizer.decode(unscored) == "yesterday he "
    appended = data.completion_sequence(tokenizer, "yesterday he ", "went home")
    assert appended["ids"] == ids and appended["mask"] == mask


def test_bpe_merge_across_the_blank_is_scored(tokenizer):
    # "he " is one token: with the space in the candidate it straddles the prefix boundary
    text = "yesterday he went home"
    encoding = tokenizer.engine.encode(text)
    assert "he " in encoding.tokens
    ids, first, _ = data.completion_span(tokenizer, "yesterday he___ home", " went")
    assert tokenizer.engine.id_to_token(ids[first]) == "he "  # the straddling token counts
    assert ids[1:-1] == encoding.ids


def test_collate_pads_and_flags_replay_rows(tokenizer):
    short = data.text_sequence(tokenizer, "he walks")
    long = data.completion_sequence(tokenizer, "yesterday he ___ home", "went")
    batch = collate([long, short], tokenizer.pad_id, kl_rows=[False, True])
    width = len(long["ids"]) - 1
    assert batch["input_ids"].shape == (2, width)
    assert not batch["target_mask"][1, len(short["ids"]) - 1:].any()
    assert not batch["kl_mask"][0].any()
    assert batch["kl_mask"][1].tolist() == batch["target_mask"][1].tolist()


def test_user_examples_and_their_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    rows = [{"prompt": f"p{i} ", "completion": "x", "frame": f"f{i % 5}"} for i in range(40)]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = data.load_user_examples(good)
    split = data.split_user_examples(records, seed=0)
    assert sum(len(v) for v in split.values()) == 40
    frames = {name: {r["frame"] for r in recs} for name, recs in split.items()}
    assert not frames["train"] & frames["test"] and not frames["train"] & frames["validation"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing string field 'completion'"):
        data.load_user_examples(bad)
    with pytest.raises(ValueError, match="more than one"):
        data.fill("a ___ b ___", "x")


@pytest.mark.parametrize("line, kind", [('"hello"', "str"), ("[1, 2]", "list"), ("3", "int")])
def test_control_records_must_be_objects(tmp_path, tiny_base_run, capsys, line, kind):
    with pytest.raises(ValueError, match=f"control set: control record 2 must be a JSON object"
                                         f".*got {kind}"):
        data.control_texts([{"text": "ok"}, json.loads(line)])
    from minituner.cli import main

    control = tmp_path / "control.jsonl"
    control.write_text('{"text": "he walked home"}\n' + line + "\n")
    assert main(["eval", "--model", str(tiny_base_run), "--control", str(control)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "control.jsonl: control record 2 must be a JSON object" in err


def test_unknown_characters_are_counted_per_example_and_character(tokenizer, tmp_path):
    assert tokenizer.unknown_chars("yesterday he went home") == []
    assert tokenizer.unknown_chars("He went 🏠") == ["H", "🏠"]
    rows = [{"prompt": "yesterday he ___ home", "completion": "went"},
            {"prompt": "Yesterday he ___ home", "completion": "went"},
            {"prompt": "yesterday he ___", "completion": "猫猫X"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = data.count_unk(data.load_user_examples(path), tokenizer)
    assert (report.examples, report.characters, report.total_examples) == (2, 4, 3)
    assert report.shown == ["Y", "猫", "X"] and report.first_source == f"{path}:2"
    assert report.mostly_unk == 1
    assert report.first_mostly_unk == f"{path}:3: 3 of 3 completion tokens are <unk>"
    with pytest.raises(ValueError, match="--allow-unk") as refused:
        data.refuse_mostly_unk(report, allow=False)
    assert str(refused.value).startswith(f"{path}:3: ") and "\n" not in str(refused.value)
    data.refuse_mostly_unk(report, allow=True)


def test_a_completion_is_refused_only_when_more_than_half_is_unknown(tokenizer):
    shares = {c: data.completion_unk_share(tokenizer, "he ___ home", c)
              for c in ("went", "Xw", "XYw")}
    assert shares == {"went": (0, 4), "Xw": (1, 2), "XYw": (2, 3)}
    examples = [{"prompt": "he ___ home", "completion": c} for c in shares]
    report = data.count_unk(examples, tokenizer, "training")
    assert (report.examples, report.characters, report.mostly_unk) == (2, 3, 1)
    assert report.first_source == "training example 2"
    assert report.first_mostly_unk.startswith("training example 3: 2 of 3 ")
