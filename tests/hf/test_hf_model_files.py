"""Model folders are read only inside themselves: index file names that escape the folder are
refused, and pickle weights (pytorch_model.bin) need an explicit opt-in."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_helpers import write_data

from minituner.cli import main
from minituner.hf import load_hf_model
from minituner.hf.load import TensorSource, load_quantized_hf_model

pytest.importorskip("transformers")


def sharded_copy(model_dir, dest, shard_name: str):
    """A copy of the toy model whose weights sit behind a model.safetensors.index.json."""
    shutil.copytree(model_dir, dest)
    single = dest / "model.safetensors"
    keys = TensorSource(single.parent).keys()
    target = dest / "shard-1.safetensors"
    single.rename(target)
    index = {"metadata": {}, "weight_map": {key: shard_name for key in keys}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


def test_index_inside_the_folder_loads(tmp_path, toy_hf_model):
    model_dir = sharded_copy(toy_hf_model("gpt2"), tmp_path / "m", "shard-1.safetensors")
    assert load_quantized_hf_model(model_dir) is not None


@pytest.mark.parametrize("name", ["../outside/x.safetensors", "sub/../../x.safetensors",
                                  "/etc/passwd", "", 7])
def test_index_file_names_outside_the_folder_are_refused(tmp_path, toy_hf_model, name):
    model_dir = sharded_copy(toy_hf_model("gpt2"), tmp_path / "m", "shard-1.safetensors")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(model_dir / "shard-1.safetensors", outside / "x.safetensors")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = name
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        TensorSource(model_dir)


def test_symlink_out_of_the_folder_is_refused(tmp_path, toy_hf_model):
    outside = tmp_path / "outside"
    outside.mkdir()
    model_dir = sharded_copy(toy_hf_model("gpt2"), tmp_path / "m", "link.safetensors")
    (model_dir / "shard-1.safetensors").rename(outside / "x.safetensors")
    (model_dir / "link.safetensors").symlink_to(outside / "x.safetensors")
    with pytest.raises(ValueError, match="resolves outside the model folder"):
        TensorSource(model_dir)


def test_qlora_run_on_an_escaping_index_exits_with_one_line(tmp_path, toy_hf_model, capsys):
    model_dir = sharded_copy(toy_hf_model("gpt2"), tmp_path / "m", "../outside/x.safetensors")
    (tmp_path / "outside").mkdir()
    shutil.copy(model_dir / "shard-1.safetensors", tmp_path / "outside" / "x.safetensors")
    data = write_data(tmp_path / "data.jsonl")
    code = main(["finetune", "--model", f"hf:{model_dir}", "--method", "qlora", "--data",
                 str(data), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
                 "--rank", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0]
    assert "outside the model folder" in err[0]


def pickle_copy(model_dir, dest):
    """A copy of the toy model with its weights as pytorch_model.bin only."""
    from safetensors.torch import load_file

    shutil.copytree(model_dir, dest)
    torch.save(load_file(dest / "model.safetensors"), dest / "pytorch_model.bin")
    (dest / "model.safetensors").unlink()
    return dest


def test_float_loader_reads_safetensors_only(tmp_path, toy_hf_model, monkeypatch):
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_hf_model(toy_hf_model("gpt2"))
    assert seen["use_safetensors"] is True


def test_pickle_only_folder_is_refused_unless_allowed(tmp_path, toy_hf_model):
    model_dir = pickle_copy(toy_hf_model("gpt2"), tmp_path / "m")
    with pytest.raises(ValueError, match="pytorch_model.bin.*--allow-pickle"):
        load_hf_model(f"hf:{model_dir}")
    allowed = load_hf_model(f"hf:{model_dir}", allow_pickle=True)
    reference = load_hf_model(f"hf:{toy_hf_model('gpt2')}")
    expected = reference.state_dict()
    assert allowed.state_dict().keys() == expected.keys()
    for name, tensor in allowed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_folder_without_weights_names_the_files(tmp_path, toy_hf_model):
    model_dir = tmp_path / "m"
    shutil.copytree(toy_hf_model("gpt2"), model_dir)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model weights"):
        load_hf_model(model_dir)


def test_cli_refuses_pickle_weights_and_allow_pickle_reads_them(tmp_path, toy_hf_model, capsys):
    model_dir = pickle_copy(toy_hf_model("gpt2"), tmp_path / "m")
    argv = ["generate", "--model", f"hf:{model_dir}", "--prompt", "the cat",
            "--max-new-tokens", "3", "--device", "cpu"]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--allow-pickle" in err[0]
    assert main([*argv, "--allow-pickle"]) == 0
    assert capsys.readouterr().out.strip()


def test_allow_pickle_is_refused_for_a_minigpt_run(tiny_base_run, capsys):
    code = main(["generate", "--model", str(tiny_base_run), "--allow-pickle"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--allow-pickle" in err[0]


def test_merge_refuses_pickle_base_unless_allowed(tmp_path, toy_hf_model, capsys):
    from hf_helpers import randomize_lora_b

    from minituner.hf import apply_hf_lora
    from minituner.hf.load import base_record
    from minituner.lora.adapters import save_adapter

    model_dir = pickle_copy(toy_hf_model("gpt2"), tmp_path / "m")
    model = apply_hf_lora(load_hf_model(model_dir, allow_pickle=True), r=2)
    randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter", extra=base_record(model_dir, "lora", torch.float32))
    argv = ["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"),
            "--device", "cpu"]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("minituner")]
    assert len(err) == 1 and "--allow-pickle" in err[0]
    assert not (tmp_path / "merged").exists()
    assert main([*argv, "--allow-pickle"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_finetune_refuses_pickle_weights_and_allow_pickle_trains(tmp_path, toy_hf_model, capsys):
    from hf_helpers import write_data

    model_dir = pickle_copy(toy_hf_model("gpt2"), tmp_path / "m")
    argv = ["finetune", "--model", f"hf:{model_dir}", "--data",
            str(write_data(tmp_path / "data.jsonl")), "--out", str(tmp_path / "run"),
            "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1 and "--allow-pickle" in err[0]
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--allow-pickle"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # a resume may drop or add --allow-pickle: it does not decide results
    assert main([*argv, "--allow-pickle", "--resume"]) == 0
