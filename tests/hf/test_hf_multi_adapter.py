"""Several named adapters on a tiny transformers model: switching and mixed-row batches against
each adapter alone, and add_weighted_adapter ("linear", "svd", "cat") against PEFT's result."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import logits_of, randomize_lora_b, token_batch

from minituner.hf import apply_hf_lora, load_hf_model
from minituner.hf.inference import load_named_adapters
from minituner.lora import (
    BASE_ROW,
    add_weighted_adapter,
    forward_with_adapters,
    load_named_adapter,
    multi_layers,
    save_named_adapter,
    set_adapter,
)
from minituner.lora.adapters import load_adapter, save_adapter

peft = pytest.importorskip("peft")
TARGETS = {"gpt2": ("all-linear", ["c_attn"]),
           "llama": (["q_proj", "v_proj", "down_proj"], ["q_proj", "down_proj"])}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def world(request, toy_hf_model, tmp_path_factory):
    """A toy model and three adapters on it: a, b (rank 4) and c (rank 2, fewer targets)."""
    arch = request.param
    directory, root = toy_hf_model(arch), tmp_path_factory.mktemp(f"multi-{arch}")
    wide, narrow = TARGETS[arch]
    specs = {"a": (wide, 4, 8.0, 1), "b": (wide, 4, 16.0, 2), "c": (narrow, 2, 4.0, 3)}
    for name, (targets, r, alpha, seed) in specs.items():
        model = apply_hf_lora(load_hf_model(directory), targets, r=r, alpha=alpha, seed=seed)
        randomize_lora_b(model, seed=seed, scale=0.2)
        save_adapter(model, root / name, base_model_name_or_path=str(directory))
    return {"arch": arch, "model": directory, **{name: root / name for name in specs}}


def ours(world, *names):
    model = load_hf_model(world["model"]).eval()
    for name in names:
        load_named_adapter(model, world[name], name)
    return model


def theirs(world, *names):
    """A PEFT model holding the same adapter folders under the same names."""
    model = peft.PeftModel.from_pretrained(load_hf_model(world["model"]), world[names[0]],
                                           adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(world[name]), adapter_name=name)
    return model.eval()


def alone(world, name, ids):
    return logits_of(load_adapter(load_hf_model(world["model"]), world[name]), ids)


def test_switching_and_mixed_rows_match_each_adapter_alone(world):
    model, ids = ours(world, "a", "b", "c"), token_batch(batch=4)
    for name in ("c", "a", "b"):
        set_adapter(model, name)
        assert (logits_of(model, ids) - alone(world, name, ids)).abs().max() <= 1e-6
    names = ["b", "c", BASE_ROW, "a"]
    with torch.no_grad():
        mixed = forward_with_adapters(model, ids, names, use_cache=False).logits
    plain = logits_of(load_hf_model(world["model"]), ids)
    for row, name in enumerate(names):
        expected = plain if name == BASE_ROW else alone(world, name, ids)
        assert (mixed[row] - expected[row]).abs().max() <= 1e-6, (row, name)
    peft_model = theirs(world, "a", "b", "c")  # PEFT's own mixed batch agrees
    with torch.no_grad():
        peft_mixed = peft_model(input_ids=ids, adapter_names=names, use_cache=False).logits
    assert (peft_mixed - mixed).abs().max() <= 1e-5


def peft_delta(peft_model, path: str, name: str) -> torch.Tensor:
    """scaling * B @ A of PEFT's adapter ``name`` at ``path`` ((out, in))."""
    layer = peft_model.base_model.model.get_submodule(path)
    return layer.scaling[name] * (layer.lora_B[name].weight @ layer.lora_A[name].weight)


@pytest.mark.parametrize("kind, names, weights, rank", [
    ("linear", ["a", "b"], [0.6, -0.4], None),
    ("svd", ["a", "b", "c"], [1.0, 0.5, -2.0], None),
    ("svd", ["a", "c"], [0.3, 1.5], 3),
    ("cat", ["a", "b", "c"], [0.7, 1.0, -0.5], None),
])
def test_weighted_adapter_matches_peft(world, kind, names, weights, rank):
    model, peft_model = ours(world, *names), theirs(world, *names)
    add_weighted_adapter(model, names, weights, "mix", combination_type=kind, rank=rank)
    peft_model.add_weighted_adapter(names, weights, "mix", combination_type=kind, svd_rank=rank)
    compared = 0
    for path, layer in multi_layers(model):
        ours_delta, their_delta = layer.adapters["mix"].delta(), peft_delta(peft_model, path, "mix")
        scale = float(their_delta.abs().max())
        assert scale > 1e-3  # nonzero deltas: the check can fail
        assert float((ours_delta - their_delta).abs().max()) <= 1e-5 * max(1.0, scale), path
        compared += 1
    assert compared == len(multi_layers(model))
    set_adapter(model, "mix")
    peft_model.set_adapter("mix")
    ids = token_batch()
    assert (logits_of(model, ids) - logits_of(peft_model, ids)).abs().max() <= 1e-4


def test_load_named_adapters_on_one_base(world, toy_hf_model, tmp_path):
    spec = f"hf:{world['model']}"
    model, path = load_named_adapters(spec, {"x": world["a"], "y": world["c"]})
    assert path == spec
    set_adapter(model, "y")
    ids = token_batch()
    assert (logits_of(model, ids) - alone(world, "c", ids)).abs().max() <= 1e-6
    other = apply_hf_lora(load_hf_model(toy_hf_model(world["arch"], seed=1)), "all-linear", r=2)
    save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match="adapter 'z': .*fingerprint mismatch"):
        load_named_adapters(spec, {"x": world["a"], "z": tmp_path / "other"})


def test_saved_combination_loads_in_peft(world, tmp_path):
    model = ours(world, "a", "c")
    add_weighted_adapter(model, ["a", "c"], [0.5, 2.0], "mix", combination_type="cat")
    save_named_adapter(model, "mix", tmp_path / "mix", base_model_name_or_path=str(world["model"]))
    set_adapter(model, "mix")
    ids = token_batch()
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(world["model"]), tmp_path / "mix")
    assert (logits_of(peft_model, ids) - logits_of(model, ids)).abs().max() <= 1e-5
