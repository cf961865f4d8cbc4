"""PiSSA: the SVD start, the residual base, PEFT's convention, and the converted adapter file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from minituner.lora import apply_lora, lora_layers, lora_state_dict, model_lora_config
from minituner.lora.adapters import (
    base_fingerprint,
    base_tensor_stats,
    load_adapter,
    save_adapter,
)
from minituner.lora.init import converted_pair, pissa_init_, svd_factors
from minituner.models.minigpt import MiniGPT, MiniGPTConfig


def base_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig())


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(seed))


def train_a_little(model, steps: int = 5) -> None:
    """A few real AdamW steps, so the adapter differs from its initial value."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = ids(7)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(batch)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()


def test_svd_factors_give_the_best_rank_r_part():
    torch.manual_seed(0)
    matrix = torch.randn(12, 9)
    lora_a, lora_b = svd_factors(matrix, 3, scaling=2.0)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    principal = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    assert lora_a.shape == (3, 9) and lora_b.shape == (12, 3)
    assert torch.allclose(2.0 * lora_b @ lora_a, principal, atol=1e-5)


def test_pissa_model_computes_the_base_at_step_zero_and_the_base_holds_the_residual():
    model = base_model()
    expected = model(ids())
    weight = model.blocks[0].mlp.fc1.weight.detach().clone()
    apply_lora(model, ["q_proj", "fc1", "fc2"], r=4, alpha=8.0, init="pissa")
    assert (model(ids()) - expected).abs().max() < 1e-5
    layer = model.blocks[0].mlp.fc1
    residual = layer.base.weight.detach()
    assert torch.allclose(residual + layer.scaling * layer.lora_B @ layer.lora_A, weight,
                          atol=1e-6)
    # the residual lost exactly the top-4 singular values
    s_w, s_res = torch.linalg.svdvals(weight), torch.linalg.svdvals(residual)
    assert torch.allclose(s_res[:10], s_w[4:14], atol=1e-5)
    assert model_lora_config(model).init == "pissa"
    assert all(p.requires_grad == n.endswith(("lora_A", "lora_B"))
               for n, p in model.named_parameters())


def test_pissa_is_deterministic():
    first = apply_lora(base_model(), ["fc1"], r=4, init="pissa")
    second = apply_lora(base_model(), ["fc1"], r=4, init="pissa")
    for (_, a), (_, b) in zip(lora_layers(first), lora_layers(second), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.base.weight, b.base.weight)


def test_pissa_matches_peft_convention():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(20, 16))
    reference = peft.get_peft_model(
        nn.Sequential(nn.Linear(20, 16)).requires_grad_(False),
        peft.LoraConfig(r=4, lora_alpha=6, target_modules=["0"], init_lora_weights="pissa"))
    reference.base_model.model[0].base_layer.load_state_dict(plain[0].state_dict())
    reference.base_model.model[0].pissa_init("default", "pissa")
    ours = apply_lora(plain, ["0"], r=4, alpha=6.0, init="pissa")
    theirs = reference.base_model.model[0]
    assert torch.allclose(ours[0].lora_A, theirs.lora_A["default"].weight, atol=1e-5)
    assert torch.allclose(ours[0].lora_B, theirs.lora_B["default"].weight, atol=1e-5)
    assert torch.allclose(ours[0].base.weight, theirs.base_layer.weight, atol=1e-6)


def test_pissa_refuses_a_base_it_cannot_split():
    class Odd(nn.Module):
        in_features, out_features = 4, 4

        def forward(self, x):
            return x

    model = nn.Sequential(Odd())
    with pytest.raises(ValueError, match="needs a float nn.Linear or Conv1D base"):
        apply_lora(model, ["0"], r=2, init="pissa")
    assert isinstance(model[0], Odd)  # untouched
    with pytest.raises(ValueError, match="rank 9 is larger than the weight"):
        apply_lora(nn.Sequential(nn.Linear(8, 6)), ["0"], r=9, init="pissa")
    with pytest.raises(ValueError, match="quantizes the base"):
        apply_lora(nn.Sequential(nn.Linear(8, 6)), ["0"], r=2, init="loftq")


def test_pissa_init_of_rank_zero_changes_nothing():
    model = apply_lora(base_model(), ["fc1"], r=0, init="pissa")
    assert torch.equal(model.blocks[0].mlp.fc1.base.weight, base_model().blocks[0].mlp.fc1.weight)
    pissa_init_(model.blocks[0].mlp.fc1)


def test_converted_pair_is_the_difference_of_the_updates():
    torch.manual_seed(1)
    a_t, b_t, a_0, b_0 = torch.randn(3, 7), torch.randn(5, 3), torch.randn(3, 7), torch.randn(5, 3)
    lora_a, lora_b = converted_pair(a_t, b_t, a_0, b_0)
    assert lora_a.shape == (6, 7) and lora_b.shape == (5, 6)
    assert torch.allclose(lora_b @ lora_a, b_t @ a_t - b_0 @ a_0, atol=1e-5)
    with pytest.raises(ValueError, match="initial adapter shapes"):
        converted_pair(a_t, b_t, a_0[:2], b_0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_pissa_adapter_on_the_original_base_reproduces_the_trained_model(
        tmp_path, use_rslora):
    original = base_model()
    fingerprint, stats = base_fingerprint(original), base_tensor_stats(original)
    model = apply_lora(base_model(), ["q_proj", "v_proj", "fc1", "fc2"], r=4, alpha=8.0,
                       init="pissa", use_rslora=use_rslora, rank_pattern={"fc2": 2})
    initial = lora_state_dict(model)
    train_a_little(model)
    model.eval()
    expected = model(ids())
    with pytest.raises(ValueError, match="changed the base"):
        save_adapter(model, tmp_path / "refused")
    save_adapter(model, tmp_path / "adapter", initial=initial, fingerprint=fingerprint,
                 tensor_stats=stats)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {"fc2": 4}
    assert config["init_lora_weights"] is True
    assert config["minituner"]["init"] == "pissa"
    assert config["minituner"]["converted"]["trained_rank"] == 4
    loaded = load_adapter(base_model(), tmp_path / "adapter").eval()  # fingerprint checked
    assert (loaded(ids()) - expected).abs().max() < 1e-5


def test_an_unconverted_pissa_adapter_is_refused(tmp_path):
    model = apply_lora(base_model(), ["fc1"], r=2)
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["minituner"]["init"] = "pissa"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="changes the base weights and the adapter was not"):
        load_adapter(base_model(), tmp_path / "a")
    del config["minituner"]
    config["init_lora_weights"] = "pissa_niter_4"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="changes the base weights"):
        load_adapter(base_model(), tmp_path / "a")
