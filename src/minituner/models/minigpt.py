"""Mini-GPT: the course's 2-layer decoder, in one readable file.

Pre-LN blocks, bias-free q/k/v/o projections with rotary positions (RoPE), a GELU FFN whose
two Linears carry biases, a final LayerNorm and an output head tied to the token embedding.
The default config has exactly 12 ``nn.Linear`` and 103,680 parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class MiniGPTConfig:
    """Shape of a Mini-GPT; the defaults are the course's canonical configuration."""

    vocab_size: int = 64
    context_len: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MiniGPTConfig.{f.name} must be a positive number, got {value!r}")
        for name in ("vocab_size", "context_len", "d_model", "n_heads", "n_layers", "d_ff"):
            if not isinstance(getattr(self, name), int):
                value = getattr(self, name)
                raise ValueError(f"MiniGPTConfig.{name} must be an int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"MiniGPTConfig.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError("MiniGPTConfig: head dim d_model/n_heads must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        """Plain dict, for config.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MiniGPTConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MiniGPTConfig: unknown field(s) {unknown}")
        return cls(**values)


def expected_param_count(cfg: MiniGPTConfig) -> int:
    """Closed-form parameter count: V*d + L*(4d^2 + 2*d*d_ff + d_ff + d + 4d) + 2d."""
    d, ff = cfg.d_model, cfg.d_ff
    per_block = 4 * d * d + 2 * d * ff + ff + d + 4 * d
    return cfg.vocab_size * d + cfg.n_layers * per_block + 2 * d


def rope_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple:
    """Cosine and sine tables of shape (seq_len, head_dim) for rotary embeddings."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    positions = torch.arange(seq_len, device=device).float()
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, Dh) queries or keys by their positions (rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with four bias-free projections and RoPE."""

    def __init__(self, cfg: MiniGPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, key_padding_mask=None):
        bsz, seq, width = x.shape

        def heads(t):
            return t.view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if key_padding_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
            allowed = causal[None, None] & key_padding_mask[:, None, None, :].bool()
            # A padded query row may see no key at all; let it see itself to avoid NaN.
            allowed = allowed | torch.eye(seq, dtype=torch.bool, device=x.device)[None, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, width))


class MLP(nn.Module):
    """fc1 -> GELU -> fc2, both Linears with bias."""

    def __init__(self, cfg: MiniGPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: MiniGPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, key_padding_mask=None):
        x = x + self.attn(self.ln1(x), cos, sin, key_padding_mask)
        return x + self.mlp(self.ln2(x))


class MiniGPT(nn.Module):
    """The course's Mini-GPT: token embedding, pre-LN blocks, final LN, tied output head."""

    def __init__(self, config: MiniGPTConfig | None = None):
        super().__init__()
        self.config = config or MiniGPTConfig()
        cfg = self.config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        cos, sin = rope_tables(cfg.context_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual-stream writers down by depth.
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.mlp.fc2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        """Logits (B, T, V); with ``targets``, returns ``(logits, mean masked loss)``."""
        seq = tokens.shape[1]
        if seq > self.config.context_len:
            raise ValueError(
                f"sequence length {seq} exceeds context_len {self.config.context_len}"
            )
        x = self.tok_emb(tokens)
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        for block in self.blocks:
            x = block(x, cos, sin, attention_mask)
        x = self.ln_f(x)
        logits = x @ self.tok_emb.weight.t()
        if targets is None:
            return logits
        total, count = masked_token_nll(logits, targets, target_mask)
        return logits, total / count.clamp(min=1)

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        stop_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of (B, T) tokens; temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            window = tokens[:, -self.config.context_len :]
            logits = self(window)[:, -1, :]
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, next_id], dim=1)
            if stop_id is not None and bool((next_id == stop_id).all()):
                break
        return tokens


def masked_token_nll(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple:
    """Summed next-token NLL over masked positions, and how many positions counted.

    Returning the sum and the count (not a mean) lets distributed training divide by the
    global token count.
    """
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
    )
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    weights = mask.reshape(-1).to(nll.dtype)
    return (nll * weights).sum(), weights.sum()


def linear_inventory(model: nn.Module) -> list:
    """(name, weight shape) of every ``nn.Linear`` in the model, in module order."""
    return [
        (name, tuple(module.weight.shape))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
