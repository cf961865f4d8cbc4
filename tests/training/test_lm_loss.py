"""Chunked LM head + cross-entropy: equal to the plain loss, with equal gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minituner.training.losses import (
    causal_lm_loss,
    chunk_rows,
    chunked_lm_loss,
    masked_lm_nll,
    plain_output_head,
)


def inputs(dtype=torch.float32, vocab=101, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 37, 16, generator=generator).to(dtype).requires_grad_(True)
    weight = torch.randn(vocab, 16, generator=generator).to(dtype).requires_grad_(True)
    bias = torch.randn(vocab, generator=generator).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (3, 37), generator=generator)
    targets[0, :5] = -100
    return hidden, weight, bias, targets


def plain_loss(hidden, weight, bias, targets, reduction="mean"):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1),
                           reduction=reduction)


@pytest.mark.parametrize("chunk", [1, 10, 37, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradients_equal_the_plain_cross_entropy(chunk, reduction):
    hidden, weight, bias, targets = inputs()
    want = plain_loss(hidden, weight, bias, targets, reduction)
    want_grads = torch.autograd.grad(want * 3, (hidden, weight, bias))
    got = chunked_lm_loss(hidden, weight, targets, bias, chunk_size=chunk, reduction=reduction)
    got_grads = torch.autograd.grad(got * 3, (hidden, weight, bias))
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5)


def test_frozen_head_gets_no_gradient_and_hidden_does():
    hidden, weight, _, targets = inputs()
    weight = weight.detach()
    loss = chunked_lm_loss(hidden, weight, targets, chunk_size=8)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_bf16_close_to_plain():
    hidden, weight, bias, targets = inputs(torch.bfloat16)
    want = plain_loss(hidden, weight, None, targets)
    got = chunked_lm_loss(hidden, weight, targets, chunk_size=16)
    assert abs(float(got) - float(want)) < 1e-2
    (grad_got,) = torch.autograd.grad(got, hidden)
    (grad_want,) = torch.autograd.grad(want, hidden)
    assert grad_got.dtype == torch.bfloat16
    assert (grad_got.float() - grad_want.float()).abs().max() < 0.02 * grad_want.abs().max()


def test_no_grad_mode_and_all_ignored():
    hidden, weight, bias, targets = inputs()
    with torch.no_grad():
        loss = chunked_lm_loss(hidden, weight, targets, bias, chunk_size=7)
    assert torch.allclose(loss, plain_loss(hidden, weight, bias, targets), atol=1e-5)
    ignored = torch.full_like(targets, -100)
    assert float(chunked_lm_loss(hidden, weight, ignored)) == 0.0


def test_bad_arguments_are_named():
    hidden, weight, _, targets = inputs()
    with pytest.raises(ValueError, match="reduction"):
        chunked_lm_loss(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="targets shape"):
        chunked_lm_loss(hidden, weight, targets[:, :-1])
    with pytest.raises(ValueError, match="weight must be"):
        chunked_lm_loss(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_lm_loss(hidden, weight, targets, chunk_size=0)



def test_chunks_are_balanced_and_within_the_budget():
    assert chunk_rows(508, 50257) == 254  # 333 fit in 2**24 values: two chunks of 254
    assert chunk_rows(300, 50257) == 300  # one chunk
    assert chunk_rows(10_000, 50257) * 50257 <= 1 << 24
    assert chunk_rows(5, 10**9) == 5  # at least 16 rows per chunk, never more than the tokens
    hidden, weight, _, targets = inputs()
    default = chunked_lm_loss(hidden, weight, targets)
    assert torch.allclose(default, chunked_lm_loss(hidden, weight, targets, chunk_size=4),
                          atol=1e-5)


def test_causal_lm_loss_equals_transformers_loss(toy_hf_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(toy_hf_model("gpt2")))
    ids = torch.randint(7, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids, labels=ids, use_cache=False).loss
    want_grads = torch.autograd.grad(want, [p for p in model.parameters()])
    got = causal_lm_loss(model, ids, chunk_size=5)
    got_grads = torch.autograd.grad(got, [p for p in model.parameters()])
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):  # the tied head/embedding included
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_masked_lm_nll_equals_the_full_logits_loss(arch, toy_hf_model):
    from minituner.hf import load_hf_model
    from minituner.hf.finetune import padding_mask
    from minituner.models.minigpt import masked_token_nll

    model = load_hf_model(toy_hf_model(arch))
    model.train()
    head = plain_output_head(model)
    assert head is model.get_output_embeddings()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 512, (2, 12), generator=generator)
    targets = torch.randint(7, 512, (2, 12), generator=generator)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 3:9], mask[1, 5:12] = True, True
    attention = padding_mask(mask)
    params = [p for p in model.parameters()]
    want, want_count = masked_token_nll(
        model(input_ids=ids, attention_mask=attention, use_cache=False).logits, targets, mask)
    want_grads = torch.autograd.grad(want, params)
    got, count = masked_lm_nll(model, head, ids, attention, targets, mask)
    got_grads = torch.autograd.grad(got, params)
    assert int(count) == int(want_count) == 13
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)


def test_an_adapted_head_keeps_the_plain_path(toy_hf_model):
    from minituner.hf import load_hf_model
    from minituner.lora import apply_lora

    model = apply_lora(load_hf_model(toy_hf_model("llama")), ["lm_head"], r=2)
    assert plain_output_head(model) is None
