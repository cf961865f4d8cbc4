"""A random-init GPT-2-small-shaped decoder in plain PyTorch, for memory and speed benchmarks.

Same shapes and parameter count as GPT-2 small (124,439,808): learned positions, pre-LN blocks
with a fused (768 -> 2304) attention projection ``c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj`` (all ``nn.Linear`` with biases, weights stored (out, in)), GELU (tanh), a final
LayerNorm and a head tied to the token embedding. Dropout is off.

``linear_factory`` decides what each Linear becomes as it is created: the QLoRA benchmark passes
one that quantizes the freshly initialised layer to NF4 at once, so the full-precision model
never exists in memory as a whole.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, CONTEXT, WIDTH, LAYERS, HEADS, FFN = 50257, 1024, 768, 12, 12, 3072
TARGETS = ["c_attn", "c_proj", "c_fc"]  # as PEFT's GPT-2 LoRA baseline (c_proj: both)


def float_linear(in_features: int, out_features: int) -> nn.Linear:
    """A GPT-2-initialised Linear: weights N(0, 0.02), zero bias."""
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    def __init__(self, make_linear):
        super().__init__()
        self.c_attn = make_linear(WIDTH, 3 * WIDTH)
        self.c_proj = make_linear(WIDTH, WIDTH)

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, seq, HEADS, width // HEADS).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(out.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    def __init__(self, make_linear):
        super().__init__()
        self.c_fc = make_linear(WIDTH, FFN)
        self.c_proj = make_linear(FFN, WIDTH)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, make_linear):
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = Attention(make_linear)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = MLP(make_linear)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Shape(nn.Module):
    """GPT-2 small's shape; ``forward(tokens, targets)`` returns (logits, mean loss)."""

    def __init__(self, linear_factory=float_linear):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.wpe = nn.Embedding(CONTEXT, WIDTH)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        self.h = nn.ModuleList(Block(linear_factory) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH)

    def forward(self, tokens, targets):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1))
        return logits, loss


def build(method: str, compute_dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A fresh model for "full", "lora" or "qlora" (r = 8, alpha 16 on TARGETS)."""
    from minituner.lora import apply_lora
    from minituner.quant.qlora import DequantBuffer, QuantizedLinear

    torch.manual_seed(seed)
    factory = float_linear
    if method == "qlora":
        buffer = DequantBuffer()

        def factory(in_features, out_features):  # quantize each Linear the moment it exists
            return QuantizedLinear.from_linear(float_linear(in_features, out_features),
                                               compute_dtype=compute_dtype, buffer=buffer)

    model = GPT2Shape(factory)
    if method in ("lora", "qlora"):
        apply_lora(model, TARGETS, r=8, alpha=16.0, seed=seed)
    elif method != "full":
        raise ValueError(f"method must be full, lora or qlora, got {method!r}")
    return model
