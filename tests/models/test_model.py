import pytest
import torch
import torch.nn as nn

from minituner.models.minigpt import (
    MiniGPT,
    MiniGPTConfig,
    apply_rope,
    expected_param_count,
    linear_inventory,
    rope_tables,
)


def test_canonical_parameter_count():
    model = MiniGPT()
    assert sum(p.numel() for p in model.parameters()) == 103_680
    assert expected_param_count(MiniGPTConfig()) == 103_680


def test_closed_form_matches_other_shapes():
    cfg = MiniGPTConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=3, d_ff=96)
    assert sum(p.numel() for p in MiniGPT(cfg).parameters()) == expected_param_count(cfg)


def test_linear_inventory_names_and_shapes():
    inventory = dict(linear_inventory(MiniGPT()))
    assert len(inventory) == 12
    for i in range(2):
        for proj in "qkvo":
            assert inventory[f"blocks.{i}.attn.{proj}_proj"] == (64, 64)
        assert inventory[f"blocks.{i}.mlp.fc1"] == (256, 64)
        assert inventory[f"blocks.{i}.mlp.fc2"] == (64, 256)
    model = MiniGPT()
    assert model.blocks[0].attn.q_proj.bias is None
    assert model.blocks[0].mlp.fc1.bias is not None
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 12


def test_head_is_tied_to_embedding():
    model = MiniGPT()
    tokens = torch.randint(0, 64, (2, 8))
    captured = {}
    model.ln_f.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    logits = model(tokens)
    assert logits.shape == (2, 8, 64)
    assert torch.allclose(logits, captured["h"] @ model.tok_emb.weight.t())
    assert not any("head" in n for n, _ in model.named_parameters())


def test_causality():
    torch.manual_seed(0)
    model = MiniGPT().eval()
    tokens = torch.randint(0, 64, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % 64
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_rope_relative_position_property():
    cos, sin = rope_tables(32, 16, 10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 16), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k.view(1, 1, 1, 16), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum().item()

    assert score(5, 3) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(20, 2) == pytest.approx(score(25, 7), abs=1e-5)
    assert score(5, 3) != pytest.approx(score(5, 4), abs=1e-3)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        MiniGPTConfig(d_model=64, n_heads=5)
    with pytest.raises(ValueError, match="d_ff"):
        MiniGPTConfig(d_ff=0)
    with pytest.raises(ValueError, match="unknown"):
        MiniGPTConfig.from_dict({"d_model": 64, "bogus": 1})


def test_padding_and_ragged_batches():
    torch.manual_seed(0)
    model = MiniGPT().eval()
    short = torch.randint(4, 64, (1, 5))
    long = torch.randint(4, 64, (1, 9))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, :5], batch[1] = short[0], long[0]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :5], mask[1] = True, True
    with torch.no_grad():
        alone = model(short)
        batched = model(batch, attention_mask=mask)
        right_padded_no_mask = model(batch)
    assert torch.allclose(batched[0, :5], alone[0], atol=1e-5)
    assert torch.allclose(right_padded_no_mask[0, :5], alone[0], atol=1e-5)
    assert torch.allclose(batched[1], model(long)[0], atol=1e-5)
    assert torch.isfinite(batched).all()


def test_masked_loss_ignores_unmasked_positions():
    torch.manual_seed(0)
    model = MiniGPT()
    tokens = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 4:] = True
    _, loss_a = model(tokens, targets, mask)
    targets2 = targets.clone()
    targets2[:, :4] = (targets2[:, :4] + 1) % 64
    _, loss_b = model(tokens, targets2, mask)
    assert torch.equal(loss_a, loss_b)


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="context_len"):
        MiniGPT()(torch.zeros(1, 33, dtype=torch.long))
