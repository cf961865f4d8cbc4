"""Training-memory planner: bytes in four buckets, predicted before anything is built.

Buckets: **weights** (every stored weight: frozen base in its format, trainable weights, fp32
master copies, buffers), **gradients**, **optimizer** (AdamW m and v in fp32, plus its step
counters) and **activations** (what autograd saves for backward, plus the few large transients
of a step: the logits and their gradient, and QLoRA's dequantization buffer).

Methods: ``full`` (everything fp32), ``full-mixed`` (16-bit weights and gradients, fp32 master
weights, fp32 Adam: 16 bytes per parameter), ``lora`` (frozen 16-bit base, trainable A and B on
every block Linear) and ``qlora`` (the same with every block Linear stored in NF4). The
activation model follows the tensors a pre-norm decoder saves, layer by layer; docs/memory.md
derives it and says how it was validated. :func:`course_table` is the course's simplified
model, kept apart from the planner's own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from minituner.models.specs import ModelSpec, model_spec

GB = 10**9
GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("full", "full-mixed", "lora", "qlora")
QUANT_FORMATS = ("nf4-dq", "nf4")
ATTENTION_KINDS = ("sdpa", "eager")
BITS_PER_PARAM = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "int8": 8.0,
                  "nf4": 4 + 32 / 64, "nf4-dq": 4 + 8 / 64 + 32 / (64 * 256)}
DEFAULT_DTYPES = {  # method -> (frozen / stored weight dtype, compute dtype)
    "full": ("fp32", "fp32"), "full-mixed": ("fp16", "fp16"),
    "lora": ("bf16", "bf16"), "qlora": ("bf16", "bf16"),
}


def base_weight_bytes(n_params: int, fmt: str = "fp16") -> float:
    """Bytes of ``n_params`` weights in a format, per-tensor constants left out (4.127 bits NF4)."""
    if fmt not in BITS_PER_PARAM:
        raise ValueError(f"fmt must be one of {sorted(BITS_PER_PARAM)}, got {fmt!r}")
    return n_params * BITS_PER_PARAM[fmt] / 8


def full_ft_state_bytes(n_params: int) -> int:
    """Full fine-tuning state before activations: 16 bytes per parameter.

    Mixed precision: fp16 weights 2 + fp32 master 4 + fp16 gradients 2 + Adam m, v 8 (plain
    fp32 training also comes to 4 + 4 + 8 = 16). 7B parameters -> 112 GB.
    """
    return 16 * int(n_params)


def nf4_storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Exact bytes of one NF4 tensor as minituner and bitsandbytes store it, constants included."""
    n_blocks = -(-numel // blocksize)
    total = (numel + 1) // 2 + 16 * 4  # packed codes + the 16-value fp32 code map
    if not double_quant:
        return total + 4 * n_blocks
    return total + n_blocks + 4 * -(-n_blocks // 256) + 256 * 4 + 4  # codes, nested, map, offset


@dataclass(frozen=True)
class PlanSettings:
    """Everything a plan depends on besides the model; None picks the method's default."""

    method: str = "lora"
    rank: int = 8
    batch: int = 1
    seq: int | None = None  # default: the model's context length
    grad_checkpointing: bool = False
    base_dtype: str | None = None  # stored weights outside NF4 (full: the trained weights)
    adapter_dtype: str = "fp32"  # LoRA A, B and their gradients
    compute_dtype: str | None = None  # activations
    quant: str = "nf4-dq"  # qlora's base format (block size 64)
    blocksize: int = 64
    attention: str = "sdpa"  # "sdpa" saves no score matrix; "eager" saves (b, h, s, s)
    chunked_loss: bool = False  # head + loss run chunked (training.losses, transformers runs)
    packed_mask: bool = False  # a (b, 1, s, s) block-diagonal mask in the compute dtype
    devices: int = 1  # processes (one per device); with fsdp, state is sharded over them
    fsdp: bool = False  # FSDP2: weights, gradients and Adam state 1/devices, gathered units
    trained_modules_params: int = 0  # modules trained in full beside LoRA (modules_to_save)

    def resolved(self, spec: ModelSpec) -> PlanSettings:
        """Validated settings with the defaults filled in."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name, least in (("rank", 0), ("batch", 1), ("devices", 1),
                            ("trained_modules_params", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if self.trained_modules_params and self.method not in ("lora", "qlora"):
            raise ValueError("trained_modules_params is for lora and qlora (full fine-tuning "
                             "already trains every module)")
        seq = spec.context_len if self.seq is None else self.seq
        if isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0:
            raise ValueError(f"seq must be a positive int, got {seq!r}")
        if spec.positions == "learned" and seq > spec.context_len:
            raise ValueError(f"seq {seq} exceeds {spec.name}'s context length {spec.context_len}")
        base, compute = DEFAULT_DTYPES[self.method]
        settings = PlanSettings(**{**asdict(self), "seq": seq,
                                   "base_dtype": self.base_dtype or base,
                                   "compute_dtype": self.compute_dtype or compute})
        for name in ("base_dtype", "adapter_dtype", "compute_dtype"):
            if getattr(settings, name) not in DTYPE_BYTES:
                raise ValueError(f"{name} must be one of {list(DTYPE_BYTES)}, "
                                 f"got {getattr(settings, name)!r}")
        if settings.quant not in QUANT_FORMATS:
            raise ValueError(f"quant must be one of {list(QUANT_FORMATS)}, got {settings.quant!r}")
        if settings.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {list(ATTENTION_KINDS)}, "
                             f"got {settings.attention!r}")
        return settings


@dataclass(frozen=True)
class MemoryPlan:
    """A prediction: bytes per bucket, a finer breakdown, and the assumptions behind it."""

    model: str
    buckets: dict
    details: dict = field(default_factory=dict)
    assumptions: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Sum of the four buckets."""
        return sum(self.buckets.values())

    def to_dict(self) -> dict:
        """The JSON form: total, buckets, assumptions and the breakdown."""
        return {"total_bytes": self.total_bytes, "buckets": dict(self.buckets),
                "assumptions": dict(self.assumptions), "details": dict(self.details)}


def _param_tensor_count(spec: ModelSpec) -> int:
    per_block = sum(1 + bias for *_, bias in spec.block_linears())
    per_block += 2 * (2 if spec.norm == "layernorm" else 1)
    embeddings = (1 if spec.tied_head else 2) + (spec.positions == "learned")
    return embeddings + spec.n_layers * per_block + (2 if spec.norm == "layernorm" else 1)


def _weights(spec: ModelSpec, s: PlanSettings) -> dict:
    n, base = spec.n_params(), DTYPE_BYTES[s.base_dtype]
    adapters = spec.lora_params(s.rank)
    parts = {"weights.buffers": spec.buffer_bytes()}
    if s.method in ("full", "full-mixed"):
        parts["weights.model"] = n * base
        if s.method == "full-mixed":
            parts["weights.fp32_master"] = n * 4
        return parts
    parts["weights.adapters"] = adapters * DTYPE_BYTES[s.adapter_dtype]
    if s.method == "lora":
        parts["weights.frozen_base"] = n * base
        return parts
    double = s.quant == "nf4-dq"
    parts["weights.nf4_linears"] = spec.n_layers * sum(
        nf4_storage_bytes(i * o, s.blocksize, double) for _, i, o, _ in spec.block_linears())
    parts["weights.frozen_other"] = (n - spec.linear_weight_params()) * base
    return parts


def _trainable(spec: ModelSpec, s: PlanSettings) -> tuple:
    """(trainable parameters, trainable tensors)."""
    if s.method in ("full", "full-mixed"):
        return spec.n_params(), _param_tensor_count(spec)
    return spec.lora_params(s.rank), 2 * spec.n_layers * len(spec.block_linears())


def _layer_activation_bytes(spec: ModelSpec, s: PlanSettings) -> int:
    """Bytes one block saves for backward, per token."""
    a, d = DTYPE_BYTES[s.compute_dtype], spec.d_model
    mlp = (4 if spec.gated_mlp else 2) * spec.d_ff  # act input/output (and gate, up, product)
    widths = 4 * d + (d + 2 * spec.kv_dim) + d + mlp  # 2 norms in/out, q, k, v, attention out
    stats = 2 * (8 if spec.norm == "layernorm" else 4)  # fp32 mean/rstd per norm
    if s.attention == "sdpa":
        scores = 4 * spec.n_heads  # fp32 log-sum-exp per head
    else:
        scores = spec.n_heads * s.seq * (4 + a)  # fp32 softmax + probabilities in compute dtype
    lora = 0
    if s.method in ("lora", "qlora"):
        lora = len(spec.block_linears()) * s.rank * DTYPE_BYTES[s.adapter_dtype]  # x @ A^T
    return widths * a + stats + scores + lora


def _activations(spec: ModelSpec, s: PlanSettings) -> dict:
    a, d, tokens = DTYPE_BYTES[s.compute_dtype], spec.d_model, s.batch * s.seq
    layer = _layer_activation_bytes(spec, s)
    full = s.method in ("full", "full-mixed")
    stats = 8 if spec.norm == "layernorm" else 4
    blocks = spec.n_layers * layer
    if s.grad_checkpointing:  # block inputs kept; one block's activations live in recompute
        blocks = spec.n_layers * d * a + layer
    elif not full:  # nothing before block 0 trains: its first norm saves nothing
        blocks -= d * a + stats
    final = d * a + stats + (d * a if full else 0)  # final norm (+ head input if the head trains)
    loss = 4 * spec.vocab_size + 8 + 4  # fp32 log-softmax, int64 targets, fp32 token weights
    embed = 8 if full else 0  # int64 token ids for the embedding's gradient
    parts = {"activations.saved_blocks": tokens * blocks,
             "activations.saved_head_and_loss": tokens * (final + loss + embed) + 8,
             # the logits (held by the caller) and, in backward, the loss's fp32 gradients
             # with respect to the log-probabilities and to the logits
             "activations.logits_transient": tokens * spec.vocab_size * (a + 8)}
    if s.chunked_loss:  # the loss's input gradient is kept; one chunk of logits at a time
        parts["activations.saved_head_and_loss"] = tokens * (final + d * a) + 8
        parts["activations.logits_transient"] = (chunk_rows(tokens, spec.vocab_size)
                                                 * spec.vocab_size * (a + 4))
    if s.packed_mask:
        parts["activations.packed_mask"] = s.batch * s.seq * s.seq * a
    if s.method == "qlora":  # one shared dequantized matrix (largest block Linear)
        parts["activations.dequant_buffer"] = max(i * o for _, i, o, _ in spec.block_linears()) * a
    return parts


CHUNK_ELEMENTS = 1 << 24  # minituner.training.losses.DEFAULT_CHUNK_ELEMENTS


def chunk_rows(n_tokens: int, vocab_size: int) -> int:
    """Tokens per chunk of the chunked loss (as minituner.training.losses.chunk_rows)."""
    most = max(16, CHUNK_ELEMENTS // max(1, vocab_size))
    n_chunks = -(-max(1, n_tokens) // most)
    return -(-max(1, n_tokens) // n_chunks)


def plan_memory(model="minigpt", method: str = "lora", **settings) -> MemoryPlan:
    """Predict the training memory of ``model`` (a name, ``hf:DIR`` or a ModelSpec) by bucket.

    Keyword settings are those of :class:`PlanSettings` (rank, batch, seq, grad_checkpointing,
    base_dtype, adapter_dtype, compute_dtype, quant, blocksize, attention, chunked_loss,
    packed_mask).
    """
    spec = model_spec(model)
    unknown = sorted(set(settings) - set(PlanSettings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown planner setting(s) {unknown}")
    s = PlanSettings(method=method, **settings).resolved(spec)
    n_trainable, n_tensors = _trainable(spec, s)
    details = {**_weights(spec, s), **_activations(spec, s)}
    grad_bytes = {"full": 4, "full-mixed": 2}.get(s.method, DTYPE_BYTES[s.adapter_dtype])
    details["gradients.trainable"] = n_trainable * grad_bytes
    details["optimizer.adam_m_v_fp32"] = 8 * n_trainable
    details["optimizer.step_counters"] = 4 * n_tensors
    details.update(_trained_module_details(s))
    if s.fsdp:
        details = _fsdp_details(spec, s, details)
    buckets = {bucket: sum(v for k, v in details.items() if k.startswith(bucket + "."))
               for bucket in ("weights", "gradients", "optimizer", "activations")}
    return MemoryPlan(model=spec.name, buckets=buckets, details=details,
                      assumptions=_assumptions(spec, s, n_trainable))


def _trained_module_details(s: PlanSettings) -> dict:
    """Modules trained in full beside the adapters (PEFT's modules_to_save): each is a trainable
    copy in base_dtype beside the frozen original, with a gradient and AdamW's m and v in the
    same dtype (torch's AdamW keeps its moments in the parameter's dtype)."""
    if not s.trained_modules_params:
        return {}
    copies = s.trained_modules_params * DTYPE_BYTES[s.base_dtype]
    return {"weights.trained_module_copies": copies, "gradients.trained_modules": copies,
            "optimizer.trained_modules_adam_m_v": 2 * copies}


SHARDED_PREFIXES = ("weights.adapters", "weights.frozen_base", "weights.nf4_linears",
                    "weights.frozen_other", "gradients.", "optimizer.adam_m_v_fp32")


def _root_params(spec: ModelSpec) -> int:
    """Parameters outside the blocks (embeddings, head, final norm): FSDP's root unit."""
    d = spec.d_model
    root = spec.vocab_size * d * (1 if spec.tied_head else 2) + spec.norm_params()
    return root + (spec.context_len * d if spec.positions == "learned" else 0)


def _block_bytes(spec: ModelSpec, s: PlanSettings) -> int:
    """Bytes of one block's weights as FSDP all-gathers them (NF4 Linears for qlora)."""
    base = DTYPE_BYTES[s.base_dtype]
    params = (spec.n_params() - _root_params(spec)) // spec.n_layers
    linears = sum(i * o for _, i, o, _ in spec.block_linears())
    adapters = spec.lora_params(s.rank) // spec.n_layers * DTYPE_BYTES[s.adapter_dtype]
    if s.method == "qlora":
        nf4 = sum(nf4_storage_bytes(i * o, s.blocksize, s.quant == "nf4-dq")
                  for _, i, o, _ in spec.block_linears())
        return nf4 + (params - linears) * base + adapters
    if s.method == "lora":
        return params * base + adapters
    return params * base


def _vocab_params(spec: ModelSpec) -> int:
    """The embedding and head matrices (one when tied): what --fsdp splits by vocabulary rows."""
    return spec.vocab_size * spec.d_model * (1 if spec.tied_head else 2)


def _vocab_split(s: PlanSettings) -> bool:
    """True when --fsdp splits the embedding and head by vocabulary rows (frozen: LoRA and
    QLoRA without modules trained in full; minituner.hf.fsdp.shard_vocabulary)."""
    return s.method in ("lora", "qlora") and not s.trained_modules_params


def _vocab_parallel_loss(spec: ModelSpec, s: PlanSettings) -> dict:
    """The loss's transient memory when the head's rows are split over ``s.devices``
    (minituner.training.vocab_parallel): every device's hidden states gathered, their fp32
    gradient sums, targets and row losses, and one chunk of the logits of this device's slice
    (fp32 in place; a 16-bit run also has its 16-bit logits and probabilities)."""
    a, n = DTYPE_BYTES[s.compute_dtype], s.devices
    rows, per_device = n * s.batch * s.seq, -(-spec.vocab_size // n)
    return {"activations.logits_transient":
            chunk_rows(rows, per_device) * per_device * (4 if a == 4 else a + 4),
            "activations.vocab_parallel_gathers": rows * (spec.d_model * (a + 4) + 8 + 4)}


def _fsdp_details(spec: ModelSpec, s: PlanSettings, details: dict) -> dict:
    """Per-device details under FSDP2 (minituner.training.fsdp's settings).

    Sharded state is 1/devices of the whole. A gathered unit is a full copy beside the
    device's own shard: FSDP2 all-gathers into one flat buffer of the whole unit, then copies
    it out into the unit's unsharded parameters, so at the copy-out both are alive (the
    buffer is freed right after: ``set_unshard_async_op``). The root unit (final norm,
    learned positions; the embedding and head too when they train) is gathered first and
    stays unsharded for the whole step; at its copy-out no activation exists yet. A frozen
    embedding and head are split by vocabulary rows instead and never gathered (their
    1/devices is in the sharded weights; the loss gathers hidden states, not weights). Later
    the activations grow while one block at a time is gathered (its copy and its buffer), and
    no block is gathered while the loss holds its logits. So the peak is the shards, the
    unsharded root, and the largest of: the root's gather buffer, the activations, the
    activations before the loss plus two block copies.
    """
    n = s.devices
    if n == 1:  # one process: nothing is sharded or gathered
        return details
    out = {k: -(-v // n) if k.startswith(SHARDED_PREFIXES) else v for k, v in details.items()}
    root_params = _root_params(spec)
    if _vocab_split(s):  # the loss is then vocabulary-parallel, always chunked
        root_params -= _vocab_params(spec)
        chunked = _activations(spec, replace(s, chunked_loss=True))
        out["activations.saved_head_and_loss"] = chunked["activations.saved_head_and_loss"]
        out.update(_vocab_parallel_loss(spec, s))
    root = root_params * DTYPE_BYTES[s.base_dtype]
    activations = sum(v for k, v in out.items() if k.startswith("activations."))
    before_loss = activations - out["activations.logits_transient"] \
        - out.get("activations.vocab_parallel_gathers", 0)
    blocks = 2 * _block_bytes(spec, s)
    out["weights.fsdp_unsharded_root"] = root
    out["weights.fsdp_gather_buffers"] = max(root, activations, before_loss + blocks) \
        - activations
    return out


def _assumptions(spec: ModelSpec, s: PlanSettings, n_trainable: int) -> dict:
    notes = {
        "full": "all weights, gradients and Adam state in fp32",
        "full-mixed": "16-bit weights and gradients, fp32 master weights, fp32 Adam m and v",
        "lora": "frozen base in base_dtype; LoRA A and B on every block Linear",
        "qlora": f"every block Linear in {s.quant} (block size {s.blocksize}), the rest of the "
                 "base (embeddings, head, norms, biases) in base_dtype; LoRA on every block Linear",
    }
    return {**asdict(s), "model_spec": spec.to_dict(), "n_params": spec.n_params(),
            "trainable_params": n_trainable, "method_note": notes[s.method],
            "optimizer": "AdamW: m and v in fp32, one fp32 step counter per trainable tensor",
            "activations_note": "saved tensors of a pre-norm decoder (docs/memory.md) plus the "
                                "logits and the loss's two fp32 gradients alive in backward"}


def qlora_paper_settings() -> dict:
    """The QLoRA paper's setup: NF4 + double quant on every Linear, 16-bit rest, r = 64,
    bf16 adapters and gradients, fp32 Adam, gradient checkpointing, batch 1 x 512."""
    return {"method": "qlora", "rank": 64, "batch": 1, "seq": 512, "grad_checkpointing": True,
            "base_dtype": "bf16", "adapter_dtype": "bf16", "compute_dtype": "bf16",
            "quant": "nf4-dq", "blocksize": 64}


def course_table(batch: int = 16, seq: int = 32) -> list:
    """The course's simplified table for Mini-GPT: full FT, LoRA r = 4/8/16, QLoRA r = 8.

    Its model: 16 bytes per trainable parameter (fp16 weight 2 + fp32 master 4 + fp16 gradient 2
    + Adam 8), 2 bytes per frozen 16-bit weight, NF4 at 4.127 bits, and activations
    batch x seq x d_model x n_layers x 16 bytes.
    """
    spec = model_spec("minigpt")
    n, linear = spec.n_params(), spec.linear_weight_params()
    activations = batch * seq * spec.d_model * spec.n_layers * 16
    per_rank = spec.lora_params(1)
    regimes = [("full fine-tuning", n, 0.0), ("LoRA r=4", 4 * per_rank, 2.0 * n),
               ("LoRA r=8", 8 * per_rank, 2.0 * n), ("LoRA r=16", 16 * per_rank, 2.0 * n),
               ("QLoRA r=8", 8 * per_rank,
                base_weight_bytes(linear, "nf4-dq") + base_weight_bytes(n - linear, "fp16"))]
    rows = []
    for name, trainable, frozen in regimes:
        buckets = {"weights": math.ceil(frozen) + 6 * trainable, "gradients": 2 * trainable,
                   "optimizer": 8 * trainable, "activations": activations}
        rows.append({"regime": name, "trainable_params": trainable, **buckets,
                     "total": sum(buckets.values())})
    return rows
