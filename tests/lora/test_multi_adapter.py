"""Several named adapters on one Mini-GPT: switching, disabling, deleting, mixed-row batches,
weighted combinations and saving, each checked against the adapter loaded alone."""

from __future__ import annotations

import warnings

import pytest
import torch

from minituner.lora import (
    BASE_ROW,
    active_adapter,
    adapter_names,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter_layers,
    enable_adapter_layers,
    forward_with_adapters,
    load_named_adapter,
    lora_layers,
    multi_layers,
    name_adapter,
    save_named_adapter,
    set_adapter,
    use_adapter_rows,
    wrap_minigpt_with_lora,
)
from minituner.lora.adapters import load_adapter, save_adapter
from minituner.models.minigpt import MiniGPT, MiniGPTConfig

TOL = 1e-6


def base_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig()).eval()


def trained_adapter(directory, r: int, seed: int, base_seed: int = 0, **kwargs):
    """Save an adapter of rank ``r`` with nonzero B (as after training) to ``directory``."""
    model = wrap_minigpt_with_lora(base_model(base_seed), r=r, seed=seed, **kwargs)
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    save_adapter(model, directory)
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three adapters of one base: a and b (rank 4), c (rank 2, attention only, alpha 8)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": trained_adapter(root / "a", r=4, seed=1),
        "b": trained_adapter(root / "b", r=4, seed=2),
        "c": trained_adapter(root / "c", r=2, seed=3, alpha=8.0,
                             target_modules=["q_proj", "v_proj"]),
        "other": trained_adapter(root / "other", r=4, seed=4, base_seed=1),
    }


def tokens(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (batch, 12), generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def alone(files, name: str, x: torch.Tensor) -> torch.Tensor:
    """Logits of the base with adapter ``name`` loaded the ordinary way, alone."""
    return load_adapter(base_model(), files[name]).eval()(x)


def multi(files, *names):
    model = base_model()
    for name in names:
        load_named_adapter(model, files[name], name)
    return model


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= TOL


@torch.no_grad()
def test_switching_matches_each_adapter_alone(files):
    model, x = multi(files, "a", "b", "c"), tokens()
    assert adapter_names(model) == ["a", "b", "c"]
    assert active_adapter(model) == "a"  # the first loaded is active
    for name in ("a", "b", "c", "a"):
        set_adapter(model, name)
        assert active_adapter(model) == name
        assert close(model(x), alone(files, name, x))
    assert not close(alone(files, "a", x), alone(files, "b", x))  # the check can fail


@torch.no_grad()
def test_disable_enable_and_delete(files):
    model, x = multi(files, "a", "b"), tokens()
    plain = base_model()(x)
    set_adapter(model, "b")
    disable_adapter_layers(model)
    assert active_adapter(model) is None
    assert torch.equal(model(x), plain)
    enable_adapter_layers(model)
    assert close(model(x), alone(files, "b", x))
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"] and active_adapter(model) == "a"
    assert close(model(x), alone(files, "a", x))
    delete_adapter(model, "a")
    assert not multi_layers(model) and torch.equal(model(x), plain)
    assert type(model.blocks[0].attn.q_proj) is torch.nn.Linear


@torch.no_grad()
def test_mixed_batch_rows_match_each_adapter_alone(files):
    model, x = multi(files, "a", "b", "c"), tokens(5)
    names = ["b", BASE_ROW, "a", "c", "b"]
    out = forward_with_adapters(model, x, names)
    for row, name in enumerate(names):
        expected = base_model()(x) if name == BASE_ROW else alone(files, name, x)
        assert close(out[row], expected[row]), (row, name)
    assert close(model(x), alone(files, "a", x))  # the rows are forgotten after the call


@torch.no_grad()
def test_mixed_batch_generates_like_each_adapter_alone(files):
    model = multi(files, "a", "b")
    prompt = torch.tensor([[1, 5, 9]] * 2)
    with use_adapter_rows(model, ["a", "b"]):
        together = model.generate(prompt, 6, temperature=0.0)
    for row, name in enumerate(["a", "b"]):
        single = load_adapter(base_model(), files[name]).eval()
        assert torch.equal(together[row], single.generate(prompt[:1], 6, temperature=0.0)[0])


def deltas(model, name: str) -> dict:
    """path -> scaling * B @ A of adapter ``name`` ((out, in); zeros where it is absent)."""
    found = {}
    for path, layer in multi_layers(model):
        if name in layer.adapters:
            found[path] = layer.adapters[name].delta()
        else:
            found[path] = torch.zeros(layer.features[1], layer.features[0])
    return found


@torch.no_grad()
def test_cat_is_the_exact_weighted_sum_of_the_deltas(files):
    model = multi(files, "a", "b", "c")
    weights = [0.7, -1.3, 2.0]
    add_weighted_adapter(model, ["a", "b", "c"], weights, "mix", combination_type="cat")
    expected = {path: sum(w * deltas(model, n)[path] for n, w in zip("abc", weights, strict=True))
                for path in deltas(model, "a")}
    for path, delta in deltas(model, "mix").items():
        assert float((delta - expected[path]).abs().max()) <= 1e-6, path
    q = model.blocks[0].attn.q_proj.adapters["mix"]
    assert q.r == 4 + 4 + 2 and q.scaling == 1.0
    assert active_adapter(model) == "a"  # combining does not switch
    set_adapter(model, "mix")  # the new adapter's output is the base plus the summed deltas
    x = tokens()
    logits = model(x)
    for path, layer in multi_layers(model):
        layer.base.weight.add_(expected[path])
    disable_adapter_layers(model)
    assert float((logits - model(x)).abs().max()) <= 1e-5  # merged vs unmerged: fp32 rounding


@torch.no_grad()
def test_svd_at_full_rank_reproduces_the_weighted_sum(files):
    model = multi(files, "a", "c")
    add_weighted_adapter(model, ["a", "c"], [1.0, 0.5], "s", combination_type="svd", rank=6)
    add_weighted_adapter(model, ["a", "c"], [1.0, 0.5], "s4", combination_type="svd")
    for path, delta in deltas(model, "s").items():
        expected = deltas(model, "a")[path] + 0.5 * deltas(model, "c")[path]
        assert float((delta - expected).abs().max()) <= 1e-6, path
        truncated = deltas(model, "s4")[path]  # rank 4 < 6: the best rank-4 approximation
        assert torch.linalg.matrix_rank(truncated) <= 4


def test_bad_names_and_combinations_name_the_adapter(files):
    model = multi(files, "a", "c")
    cases = [
        (lambda: set_adapter(model, "zz"), "adapter 'zz': not loaded"),
        (lambda: load_named_adapter(model, files["b"], "a"), "adapter 'a': the name is already"),
        (lambda: load_named_adapter(model, files["b"], "__base__"), "adapter name '__base__'"),
        (lambda: load_named_adapter(model, files["other"], "o"),
         "adapter 'o': .*fingerprint mismatch"),
        (lambda: add_weighted_adapter(model, ["a", "c"], [1, 1], "l", "linear"),
         "adapter 'c': rank 2 .* 'linear' needs equal ranks"),
        (lambda: add_weighted_adapter(model, ["a", "a"], [1, 1], "d", "cat"),
         "adapter 'a': listed twice"),
        (lambda: add_weighted_adapter(model, ["a", "q"], [1, 1], "d", "cat"),
         "adapter 'q': not loaded"),
        (lambda: add_weighted_adapter(model, ["a"], [1, 1], "d", "cat"), "weights has 2"),
        (lambda: add_weighted_adapter(model, ["a"], [1], "d", "ties"), "combination_type"),
        (lambda: forward_with_adapters(model, tokens(3), ["a", "b", "a"]),
         "adapter 'b': not loaded"),
        (lambda: forward_with_adapters(model, tokens(3), ["a", "c"]),
         "adapter_names has 2 entries, the batch has 3 rows"),
        (lambda: delete_adapter(model, "b"), "adapter 'b': not loaded"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert adapter_names(model) == ["a", "c"]  # nothing was half-loaded


def test_unnamed_lora_layers_are_named_first(files):
    model = load_adapter(base_model(), files["a"])
    with pytest.raises(ValueError, match="name_adapter"):
        load_named_adapter(model, files["b"], "b")
    name_adapter(model, "first")
    load_named_adapter(model, files["b"], "b")
    assert adapter_names(model) == ["first", "b"] and not lora_layers(model)
    x = tokens()
    with torch.no_grad():
        assert close(model(x), alone(files, "a", x))


@torch.no_grad()
def test_a_dora_layer_is_refused_by_name(files):
    model = load_adapter(base_model(), files["a"])
    lora_layers(model)[0][1].use_dora = True
    with pytest.raises(ValueError, match="adapter 'x': DoRA"):
        name_adapter(model, "x")


def test_saved_combination_loads_alone_with_the_same_logits(files, tmp_path):
    model = multi(files, "a", "c")
    add_weighted_adapter(model, ["a", "c"], [0.5, 2.0], "mix", combination_type="cat")
    save_named_adapter(model, "mix", tmp_path / "mix")
    save_named_adapter(model, "c", tmp_path / "c")
    assert adapter_names(model) == ["a", "c", "mix"] and not lora_layers(model)
    x = tokens()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("mix", "c"):
            set_adapter(model, name)
            assert close(load_adapter(base_model(), tmp_path / name).eval()(x), model(x))
