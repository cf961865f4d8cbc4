"""Shapes of the models the memory planner knows, without building them.

A :class:`ModelSpec` says how many parameters a decoder has and which Linears each block holds,
which is all the planner needs. Built-in specs: Mini-GPT (the course's canonical configuration),
GPT-2 small and the four original LLaMA sizes with their published dimensions; ``hf:DIR`` reads
a local transformers ``config.json`` (model types gpt2, llama, mistral).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from minituner.util.files import read_json


@dataclass(frozen=True)
class ModelSpec:
    """A pre-norm decoder: embeddings, ``n_layers`` blocks (attention + MLP), final norm, head."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    context_len: int
    n_kv_heads: int | None = None  # grouped-query attention; None: same as n_heads
    gated_mlp: bool = False  # SwiGLU (gate, up, down) instead of fc1 -> act -> fc2
    tied_head: bool = True  # output head shares the token embedding
    attn_bias: bool = False  # biases on the attention projections
    mlp_bias: bool = True
    norm: str = "layernorm"  # "layernorm" (scale + shift) or "rmsnorm" (scale)
    positions: str = "rope"  # "rope" (fp32 cos/sin tables) or "learned" (a position embedding)
    fused_qkv: bool = False  # one (d, 3d) projection, as GPT-2's c_attn

    def __post_init__(self) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "context_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model spec {self.name}: {field} must be a positive int")
        if self.d_model % self.n_heads or self.n_heads % self.kv_heads:
            raise ValueError(f"model spec {self.name}: heads do not divide d_model")
        if self.norm not in ("layernorm", "rmsnorm") or self.positions not in ("rope", "learned"):
            raise ValueError(f"model spec {self.name}: unknown norm or positions")

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection."""
        return self.kv_heads * self.head_dim

    def block_linears(self) -> list:
        """(name, in_features, out_features, has_bias) of every Linear in one block."""
        d, ff = self.d_model, self.d_ff
        if self.fused_qkv:
            attention = [("c_attn", d, d + 2 * self.kv_dim, self.attn_bias),
                         ("attn.c_proj", d, d, self.attn_bias)]
        else:
            attention = [("q_proj", d, d, self.attn_bias),
                         ("k_proj", d, self.kv_dim, self.attn_bias),
                         ("v_proj", d, self.kv_dim, self.attn_bias),
                         ("o_proj", d, d, self.attn_bias)]
        if self.gated_mlp:
            mlp = [("gate_proj", d, ff, self.mlp_bias), ("up_proj", d, ff, self.mlp_bias),
                   ("down_proj", ff, d, self.mlp_bias)]
        else:
            mlp = [("fc1", d, ff, self.mlp_bias), ("fc2", ff, d, self.mlp_bias)]
        return attention + mlp

    def norm_params(self) -> int:
        """Parameters of one norm layer."""
        return self.d_model * (2 if self.norm == "layernorm" else 1)

    def linear_weight_params(self) -> int:
        """Weights (not biases) of every block Linear: what LoRA adapts and NF4 quantizes."""
        return self.n_layers * sum(i * o for _, i, o, _ in self.block_linears())

    def lora_params(self, rank: int) -> int:
        """Parameters of rank-``rank`` LoRA (A and B) on every block Linear."""
        return rank * self.n_layers * sum(i + o for _, i, o, _ in self.block_linears())

    def n_params(self) -> int:
        """Total parameters (the tied head counted once)."""
        d = self.d_model
        biases = sum(o for _, _, o, bias in self.block_linears() if bias)
        per_block = sum(i * o for _, i, o, _ in self.block_linears()) + biases
        per_block += 2 * self.norm_params()
        embeddings = self.vocab_size * d * (1 if self.tied_head else 2)
        if self.positions == "learned":
            embeddings += self.context_len * d
        return embeddings + self.n_layers * per_block + self.norm_params()

    def buffer_bytes(self) -> int:
        """Non-parameter state: the fp32 RoPE cos/sin tables (context_len x head_dim each)."""
        return 2 * self.context_len * self.head_dim * 4 if self.positions == "rope" else 0

    def to_dict(self) -> dict:
        """Plain dict, for JSON."""
        return asdict(self)


MODEL_SPECS = {
    "minigpt": ModelSpec("minigpt", vocab_size=64, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                         context_len=32),
    "gpt2-small": ModelSpec("gpt2-small", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                            d_ff=3072, context_len=1024, attn_bias=True, positions="learned",
                            fused_qkv=True),
    **{
        f"llama-{size}": ModelSpec(f"llama-{size}", vocab_size=32000, d_model=d, n_layers=layers,
                                   n_heads=heads, d_ff=ff, context_len=2048, gated_mlp=True,
                                   tied_head=False, mlp_bias=False, norm="rmsnorm")
        for size, d, layers, ff, heads in [
            ("7b", 4096, 32, 11008, 32), ("13b", 5120, 40, 13824, 40),
            ("33b", 6656, 60, 17920, 52), ("65b", 8192, 80, 22016, 64),
        ]
    },
    # a 70B Llama-style shape (Llama-3-70B's): GQA with 8 KV heads, 128k vocabulary
    "llama-70b-style": ModelSpec("llama-70b-style", vocab_size=128256, d_model=8192,
                                 n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
                                 context_len=8192, gated_mlp=True, tied_head=False,
                                 mlp_bias=False, norm="rmsnorm"),
}


def _config_int(config: dict, path: Path, *keys, default=None) -> int:
    for key in keys:
        if config.get(key) is not None:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{path}: {key} must be an int, got {value!r}")
            return value
    if default is None:
        raise ValueError(f"{path}: missing {' / '.join(keys)}")
    return default


def spec_from_hf_config(directory) -> ModelSpec:
    """A spec from a local transformers directory's config.json (gpt2, llama or mistral)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a transformers model directory)")
    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must be a JSON object")
    model_type = config.get("model_type")
    name = f"hf:{directory}"
    if model_type == "gpt2":
        d = _config_int(config, path, "n_embd")
        return ModelSpec(
            name, vocab_size=_config_int(config, path, "vocab_size"), d_model=d,
            n_layers=_config_int(config, path, "n_layer"),
            n_heads=_config_int(config, path, "n_head"),
            d_ff=_config_int(config, path, "n_inner", default=4 * d),
            context_len=_config_int(config, path, "n_positions"), attn_bias=True,
            positions="learned", fused_qkv=True,
            tied_head=bool(config.get("tie_word_embeddings", True)),
        )
    if model_type in ("llama", "mistral"):
        heads = _config_int(config, path, "num_attention_heads")
        return ModelSpec(
            name, vocab_size=_config_int(config, path, "vocab_size"),
            d_model=_config_int(config, path, "hidden_size"),
            n_layers=_config_int(config, path, "num_hidden_layers"), n_heads=heads,
            n_kv_heads=_config_int(config, path, "num_key_value_heads", default=heads),
            d_ff=_config_int(config, path, "intermediate_size"),
            context_len=_config_int(config, path, "max_position_embeddings"), gated_mlp=True,
            tied_head=bool(config.get("tie_word_embeddings", False)),
            attn_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)), norm="rmsnorm",
        )
    raise ValueError(f"{path}: model_type {model_type!r} is not supported "
                     f"(supported: gpt2, llama, mistral)")


def model_spec(name: str) -> ModelSpec:
    """A built-in spec by name, or ``hf:DIR`` for a local transformers directory."""
    if isinstance(name, ModelSpec):
        return name
    if isinstance(name, str) and name.startswith("hf:"):
        return spec_from_hf_config(name[3:])
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_SPECS)} or hf:DIR")
    return MODEL_SPECS[name]
