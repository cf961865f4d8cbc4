"""--add-tokens: new special tokens, a grown vocabulary whose new rows train, the extended
tokenizer saved with the adapter; PEFT loads the run (resize, then PeftModel.from_pretrained)
with the same logits, and a merged model keeps its untied head."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import logits_of

from minituner.cli import main
from minituner.hf.inference import load_adapted_model
from minituner.hf.models import load_hf_model, load_hf_tokenizer
from minituner.hf.tokens import add_new_tokens, resize_for_tokens, token_modules_to_save
from minituner.lora.adapters import base_fingerprint
from minituner.training.config import FinetuneConfig
from minituner.util.files import load_safetensors

peft = pytest.importorskip("peft")
NEW = ["<tool>", "<end_tool>"]
EMBED = {"gpt2": "transformer.wte", "llama": "model.embed_tokens"}


def write_tool_data(path):
    lines = [{"prompt": "what is the name of the cat ?",
              "completion": " <tool> the cat <end_tool> ."},
             {"prompt": "who went to the house ?", "completion": " <tool> he went <end_tool>"},
             {"text": "she saw <tool> a big dog <end_tool> today"}] * 4
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def full_vocab_model(source, out):
    """A copy of a toy model whose embedding has exactly one row per tokenizer entry (as GPT-2
    and Llama 3 ship), so new tokens must grow it."""
    model, tokenizer = load_hf_model(source), load_hf_tokenizer(source)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def runs(toy_hf_model, tmp_path_factory):
    """(arch, vocab) -> (base dir, run dir): GPT-2 with a full vocabulary (it grows) and Llama
    with spare rows (the new tokens take two of them)."""
    root = tmp_path_factory.mktemp("add_tokens")
    data = write_tool_data(root / "train.jsonl")
    made = {}
    for arch, vocab in (("gpt2", "full"), ("llama", "spare")):
        base = toy_hf_model(arch)
        if vocab == "full":
            base = full_vocab_model(base, root / f"{arch}-full")
        run = root / f"run-{arch}-{vocab}"
        assert main(["finetune", "--model", f"hf:{base}", "--data", str(data), "--out", str(run),
                     "--steps", "4", "--batch-size", "4", "--rank", "2", "--lr", "0.05",
                     "--add-tokens", *NEW]) == 0
        made[(arch, vocab)] = (base, run)
    return made


def tool_batch(ids: list) -> torch.Tensor:
    """Token ids that use the new tokens (and some ordinary ones)."""
    return torch.tensor([[9, ids[0], 40, 41, ids[1], 12], [ids[1], 30, ids[0], 31, 32, 33]])


@pytest.mark.parametrize("key", [("gpt2", "full"), ("llama", "spare")], ids="-".join)
def test_new_tokens_train_and_load_in_peft(runs, key):
    base_dir, run = runs[key]
    arch, vocab = key
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    record = config["minituner"]["base"]["added_tokens"]
    tokenizer = load_hf_tokenizer(adapter)
    base_tokenizer = load_hf_tokenizer(base_dir)
    ids = tokenizer.convert_tokens_to_ids(NEW)
    assert record["tokens"] == NEW and record["ids"] == ids
    assert ids == [len(base_tokenizer), len(base_tokenizer) + 1]
    word = tokenizer.convert_tokens_to_ids
    assert tokenizer("he <tool> went").input_ids == [word("he"), ids[0], word("went")]
    base = load_hf_model(base_dir)
    old_rows = base.get_input_embeddings().weight.shape[0]
    assert record["vocab_size"] == (len(tokenizer) if vocab == "full" else old_rows)
    assert (record["vocab_size"] > old_rows) == (vocab == "full")
    # the embedding and the head were trained in full, new rows included
    assert config["modules_to_save"] == [EMBED[arch], "lm_head"]
    saved = load_safetensors(adapter / "adapter_model.safetensors")
    start = base.get_input_embeddings().weight[:record["mean_of_rows"]].mean(dim=0)
    for module in config["modules_to_save"]:
        rows = saved[f"base_model.model.{module}.weight"][ids]
        assert rows.shape[0] == 2 and (rows - start).abs().amax() > 1e-3
    # the fingerprint still describes the original base
    run_config = json.loads((run / "config.json").read_text())
    assert run_config["base"]["fingerprint"] == base_fingerprint(base)
    # minituner's loader and PEFT's (resize, then PeftModel.from_pretrained) agree
    tuned, _ = load_adapted_model(None, adapter)
    batch = tool_batch(ids)
    expected = logits_of(tuned, batch)
    assert expected.shape[-1] == record["vocab_size"]
    peft_base = load_hf_model(base_dir)
    peft_base.resize_token_embeddings(len(tokenizer) if vocab == "full" else record["vocab_size"])
    peft_model = peft.PeftModel.from_pretrained(peft_base, adapter)
    assert torch.allclose(logits_of(peft_model, batch), expected, atol=1e-5)


@pytest.mark.parametrize("key", [("gpt2", "full"), ("llama", "spare")], ids="-".join)
def test_plan_counts_the_grown_modules_the_run_trains(runs, key):
    """The run's recorded plan counts the embedding and head copies at the grown vocabulary:
    exactly the run's trainable parameters that are not LoRA's."""
    run = runs[key][1]
    results = json.loads((run / "results.json").read_text())
    saved = load_safetensors(run / "adapter" / "adapter_model.safetensors")
    lora = sum(t.numel() for name, t in saved.items() if ".lora_" in name)
    predicted = results["memory"]["predicted"]
    assert predicted["trained_modules_params"] == results["trainable_params"] - lora > 0


def test_merged_run_keeps_its_trained_head(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, run = runs[("gpt2", "full")]
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(run), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer.convert_tokens_to_ids(NEW)
    assert config["vocab_size"] == len(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    tuned, _ = load_adapted_model(None, run / "adapter")
    batch = tool_batch(ids)
    assert torch.allclose(logits_of(merged, batch), logits_of(tuned, batch), atol=1e-5)


def test_generate_and_eval_use_the_extended_tokenizer(runs, tmp_path, capsys):
    _, run = runs[("llama", "spare")]
    data = write_tool_data(tmp_path / "eval.jsonl")
    assert main(["eval", "--model", str(run), "--data", str(data)]) == 0
    assert main(["generate", "--model", str(run), "--prompt", "he <tool>",
                 "--max-new-tokens", "3"]) == 0
    assert "he" in capsys.readouterr().out


def test_resize_sets_new_rows_to_the_mean(toy_hf_model):
    for arch in ("gpt2", "llama"):
        directory = toy_hf_model(arch)
        model, tokenizer = load_hf_model(directory), load_hf_tokenizer(directory)
        before = model.get_input_embeddings().weight.detach().clone()
        head_before = model.get_output_embeddings().weight.detach().clone()
        record = add_new_tokens(tokenizer, NEW, model.config.vocab_size, str(directory))
        record = {**record, "vocab_size": 600}  # make it grow
        resize_for_tokens(model, record)
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        assert embed.shape[0] == head.shape[0] == model.config.vocab_size == 600
        rows = record["mean_of_rows"]
        assert torch.allclose(embed[record["ids"]], before[:rows].mean(0).expand(2, -1))
        assert torch.allclose(head[record["ids"]], head_before[:rows].mean(0).expand(2, -1))
        assert (head is embed) == (arch == "gpt2")
        assert torch.equal(embed[:rows], before[:rows])


def test_existing_or_empty_tokens_are_refused(toy_hf_model):
    tokenizer = load_hf_tokenizer(toy_hf_model("gpt2"))
    with pytest.raises(ValueError, match="token 'the' is already in the tokenizer"):
        add_new_tokens(tokenizer, ["<new>", "the"], 512, "toy")
    with pytest.raises(ValueError, match="non-empty"):
        add_new_tokens(tokenizer, [" "], 512, "toy")
    with pytest.raises(ValueError, match="given twice"):
        FinetuneConfig.for_kind("hf", model="hf:x", train_data="d.jsonl",
                                add_tokens=["<a>", "<a>"]).validate()


def test_embedding_and_head_join_modules_to_save(toy_hf_model):
    model = load_hf_model(toy_hf_model("llama"))
    assert token_modules_to_save(model, None) == ["model.embed_tokens", "lm_head"]
    assert token_modules_to_save(model, ["embed_tokens"]) == ["embed_tokens", "lm_head"]
    gpt2 = load_hf_model(toy_hf_model("gpt2"))
    assert token_modules_to_save(gpt2, ["lm_head", "wte"]) == ["lm_head", "wte"]
