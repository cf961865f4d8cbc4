import json
import subprocess
import sys

import pytest
import torch

from minituner.models.minigpt import MiniGPT
from minituner.models.tokenizer import Tokenizer
from minituner.training.runs import load_model, prepare_run_dir, publish_run, save_model
from minituner.util.files import read_json


def test_run_folder_layout(tiny_base_run):
    for name in ("config.json", "manifest.json", "train_log.jsonl", "loss.png",
                 "model.safetensors", "tokenizer.json", "results.json", "corpus/manifest.json"):
        assert (tiny_base_run / name).is_file(), name
    manifest = read_json(tiny_base_run / "manifest.json")
    assert manifest["seed"] == 0
    assert manifest["versions"]["torch"]
    assert "train.jsonl" in manifest["data_sha256"]
    assert (tiny_base_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_short_pretraining_lowers_the_loss(tiny_base_run):
    lines = (tiny_base_run / "train_log.jsonl").read_text().splitlines()
    log = [json.loads(line) for line in lines]
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < first - 0.3


def test_checkpoint_round_trip_is_bitwise(tiny_base_run, tmp_path):
    model, tokenizer, _ = load_model(tiny_base_run)
    save_model(tmp_path, model, tokenizer)
    (tmp_path / "config.json").write_text((tiny_base_run / "config.json").read_text())
    again, _, _ = load_model(tmp_path)
    pairs = zip(model.state_dict().items(), again.state_dict().items(), strict=True)
    for (name, a), (_, b) in pairs:
        assert torch.equal(a, b), name


def test_missing_and_corrupt_checkpoints(tiny_base_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a run folder"):
        load_model(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((tiny_base_run / name).read_bytes())
    data = (tiny_base_run / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(broken)


def test_bad_model_config_in_run(tiny_base_run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = read_json(tiny_base_run / "config.json")
    config["model"]["n_heads"] = 5
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="divisible"):
        load_model(bad)


def test_refuses_to_overwrite_a_different_run(tmp_path):
    prepare_run_dir(tmp_path / "r", {"kind": "pretrain", "model": {"d_model": 64}})
    (tmp_path / "r" / "config.json").write_text(json.dumps({"kind": "pretrain", "model": {}}))
    (tmp_path / "r" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="different run"):
        prepare_run_dir(tmp_path / "r", {"kind": "pretrain", "model": {"d_model": 32}})
    assert (tmp_path / "r" / "keep.txt").read_text() == "precious"
    work = prepare_run_dir(tmp_path / "r", {"kind": "pretrain"}, overwrite=True)
    assert work != tmp_path / "r" and (tmp_path / "r" / "keep.txt").exists()  # until published
    publish_run(work, tmp_path / "r")
    assert not (tmp_path / "r" / "keep.txt").exists()


def test_same_seed_gives_same_weights(tmp_path):
    from minituner.course.pretraining import run_pretraining
    from minituner.training.loop import PretrainConfig

    cfg = PretrainConfig(steps=5, eval_every=5, batch_size=8, seed=3)
    run_pretraining(tmp_path / "a", cfg)
    run_pretraining(tmp_path / "b", cfg)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b


def interrupt_at(run, step: int) -> None:
    """Make ``run`` look killed right after its checkpoint at ``step``."""
    for path in (run / "checkpoints").glob("step-*.pt"):
        if int(path.stem.split("-")[1]) > step:
            path.unlink()
    for name in ("results.json", "model.safetensors", "manifest.json"):
        (run / name).unlink()


def test_unfinished_run_is_refused_then_resumed_to_the_same_bytes(tmp_path):
    from minituner.course.pretraining import run_pretraining
    from minituner.training.loop import PretrainConfig

    cfg = PretrainConfig(steps=6, eval_every=3, batch_size=8, seed=1)
    out = tmp_path / "base"
    first = run_pretraining(out, cfg)
    assert first["resumed_from_step"] is None
    whole = (out / "model.safetensors").read_bytes()
    interrupt_at(out, 3)
    with pytest.raises(FileExistsError, match="unfinished run .*step-000003.*--resume"):
        run_pretraining(out, cfg)
    assert (out / "checkpoints" / "step-000003.pt").is_file()  # the refusal touched nothing
    with pytest.raises(ValueError, match=r"cannot change train.lr: run 0.003, now 0.01"):
        run_pretraining(out, PretrainConfig(steps=6, eval_every=3, batch_size=8, seed=1, lr=0.01),
                        resume=True)
    resumed = run_pretraining(out, cfg, resume=True)
    assert resumed["resumed_from_step"] == 3
    assert (out / "model.safetensors").read_bytes() == whole
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 6
    interrupt_at(out, 3)  # the demo's cache (reuse) continues an unfinished base
    cached = run_pretraining(out, cfg, reuse=True)
    assert (cached["reused"], cached["resumed_from_step"]) == (False, 3)
    assert (out / "model.safetensors").read_bytes() == whole
    assert run_pretraining(out, cfg, reuse=True)["reused"] is True
    assert not list(tmp_path.glob(".*corpus.tmp"))


def test_cli_help_and_bad_arguments():
    run = [sys.executable, "-m", "minituner"]
    out = subprocess.run(run + ["--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("corpus", "pretrain", "generate", "demo"):
        assert command in out.stdout
    bad = subprocess.run(run + ["pretrain", "--steps", "-3"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "--steps" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_generate_and_missing_run(tiny_base_run, tmp_path):
    run = [sys.executable, "-m", "minituner", "generate"]
    ok = subprocess.run(run + ["--model", str(tiny_base_run), "--prompt", "he can"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("he can")
    missing = subprocess.run(run + ["--model", str(tmp_path / "none")], capture_output=True,
                             text=True)
    assert missing.returncode == 1
    assert "not found" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_config_file_with_flag_override(tmp_path):
    from minituner.cli import build_parser
    from minituner.cli.pretrain import pretrain_config_from_args

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 7\nlr: 0.01\n")
    args = build_parser().parse_args(["pretrain", "--config", str(cfg_file), "--steps", "9"])
    cfg = pretrain_config_from_args(args)
    assert (cfg.steps, cfg.lr) == (9, 0.01)
    cfg_file.write_text("stepz: 7\n")
    args = build_parser().parse_args(["pretrain", "--config", str(cfg_file)])
    with pytest.raises(ValueError, match="stepz"):
        pretrain_config_from_args(args)


def test_tokenizer_matches_model(tiny_base_run):
    tok = Tokenizer.load(tiny_base_run / "tokenizer.json")
    assert tok.vocab_size == MiniGPT().config.vocab_size
