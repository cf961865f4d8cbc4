"""QLoRA: a frozen NF4 base Linear (:class:`QuantizedLinear`) under a trainable LoRA adapter.

The weight lives as NF4 bytes and scales (buffers, never parameters). Each forward dequantizes
it to the compute dtype and calls an ordinary GEMM; the backward dequantizes it again and
returns only the input gradient, so autograd keeps the packed weight and its scales, never the
dequantized (out, in) matrix and never the input. Layers of one model may share one scratch
buffer (:class:`DequantBuffer`) for the dequantized matrix, so it is allocated once.

``QuantizedLinear`` implements :class:`minituner.lora.base.FrozenBase`: LoRA's fused function
calls its ``frozen_forward`` / ``frozen_input_grad`` (the one NF4 forward and backward, which
its own autograd function uses too), and ``merge_lora`` folds an adapter in through its
``merged_with`` ("dequantized" or "requantized"). Where a layer came from (a Conv1D's
(in, out) layout, a bitsandbytes checkpoint) is declared in its :class:`QuantizedOrigin`.

``QuantizedLinear.state_dict()`` uses ``bnb.nn.Linear4bit``'s keys (``weight``,
``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...), so a QLoRA model's base
can be read by bitsandbytes and the other way round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from minituner.lora import (
    MINIGPT_TARGETS,
    DoRALinear,
    apply_lora,
    lora_layers,
    resolve_target_modules,
    set_submodule,
)
from minituner.lora.merge import MergeReport, merge_lora, run_probe
from minituner.quant import DEFAULT_QUANT_SCHEME
from minituner.quant.kernels import standard_code
from minituner.quant.nf4 import (
    NF4Weight,
    check_blocksize,
    check_dtype,
    dequantize_nf4,
    quantize_nf4,
)
from minituner.quant.nf4_io import from_bnb_state_dict, to_bnb_state_dict

QUANT_SCHEMES = {  # name -> (blocksize, double quantization); QLoRA's own setting is the first
    DEFAULT_QUANT_SCHEME: (64, True),
    "nf4_per_group_64_no_dq": (64, False),
    "nf4_per_group_32": (32, True),
    "nf4_per_group_128": (128, True),
    "nf4_per_group_256": (256, True),
}
MERGE_TARGETS = ("dequantized", "requantized")


def parse_quant_scheme(name: str) -> tuple:
    """(blocksize, double_quant) of a scheme name; the default double-quantizes, as QLoRA."""
    if name not in QUANT_SCHEMES:
        raise ValueError(f"unknown quant_scheme {name!r}; known: {sorted(QUANT_SCHEMES)}")
    return QUANT_SCHEMES[name]


class DequantBuffer:
    """Scratch memory for dequantized weights, shared by a model's QuantizedLinear layers.

    Layers run one at a time, so one flat tensor per (dtype, device), as large as the largest
    weight, serves them all: each layer's matrix is written, used by one GEMM and overwritten by
    the next layer's.
    """

    def __init__(self) -> None:
        self._tensors: dict = {}

    def get(self, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """A contiguous (shape) view of the scratch tensor, grown on first need."""
        numel, key = math.prod(shape), (dtype, str(device))
        flat = self._tensors.get(key)
        if flat is None or flat.numel() < numel:
            flat = self._tensors[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held by the scratch tensors."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


class _FrozenNF4(torch.autograd.Function):
    """y = x W^T + b through the layer's frozen_forward / frozen_input_grad (no LoRA on top)."""

    @staticmethod
    def forward(ctx, x, layer, *state):
        out = layer.frozen_forward(x.reshape(-1, x.shape[-1]), state)
        ctx.layer = layer
        ctx.save_for_backward(*state)  # 4.1-4.5 bits per weight
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad2d = grad_out.reshape(-1, grad_out.shape[-1])
            grad_x = ctx.layer.frozen_input_grad(grad2d, ctx.saved_tensors)
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        return (grad_x, None) + (None,) * len(ctx.saved_tensors)


@dataclass(frozen=True)
class QuantizedOrigin:
    """Where a QuantizedLinear's weight came from; kept by copies, merges and reloads."""

    fan_in_fan_out: bool = False  # quantized from a layer stored (in, out): GPT-2's Conv1D
    prequantized: bool = False  # bytes read as a bitsandbytes checkpoint stored them


class QuantizedLinear(nn.Module):
    """A frozen Linear stored in NF4 (4-bit codes + block scales) with a float bias.

    It holds no parameters. ``compute_dtype`` (fp32, bf16 or fp16; default: the input's dtype)
    is the dtype the weight is dequantized to and the GEMM runs in; the output comes back in
    the input's dtype. It implements :class:`minituner.lora.base.FrozenBase`.
    """

    merge_targets = MERGE_TARGETS

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, buffer: DequantBuffer | None = None,
                 origin: QuantizedOrigin | None = None):
        super().__init__()
        self.origin = QuantizedOrigin() if origin is None else origin
        if not isinstance(self.origin, QuantizedOrigin):
            raise ValueError(f"origin must be a QuantizedOrigin, got {type(origin).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"QuantizedLinear needs a 2-D (out, in) weight, got {weight.shape}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}"
            )
        self.compute_dtype = None if compute_dtype is None else check_dtype(compute_dtype)
        self.dequant_buffer = buffer
        self._set_weight(weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(),
                             persistent=False)

    def _set_weight(self, q: NF4Weight) -> None:
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"NF4 weight has shape {q.shape}, the layer is "
                f"({self.out_features}, {self.in_features})"
            )
        self.weight_dtype, self.blocksize = q.dtype, q.blocksize
        self.offset, self.nested_blocksize = q.offset, q.nested_blocksize
        for name in ("packed", "absmax", "nested_absmax", "nested_code"):
            self.register_buffer(name, getattr(q, name), persistent=False)
        # decided once here, not per dequantize: the standard code becomes the shared tensor
        self.register_buffer("code", standard_code(q.code), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None,
                    buffer: DequantBuffer | None = None) -> QuantizedLinear:
        """Quantize an ``nn.Linear``'s weight to NF4; the bias stays float."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, bias, compute_dtype=compute_dtype, buffer=buffer)

    @classmethod
    def from_bnb_state_dict(cls, state_dict, prefix: str = "", bias: torch.Tensor | None = None,
                            compute_dtype: torch.dtype | None = None,
                            buffer: DequantBuffer | None = None,
                            fan_in_fan_out: bool = False) -> QuantizedLinear:
        """Build from a ``bnb.nn.Linear4bit`` state dict; the bias is taken from it if present."""
        q = from_bnb_state_dict(state_dict, prefix)
        if bias is None:
            bias = state_dict.get(prefix + "bias")
        origin = QuantizedOrigin(fan_in_fan_out=fan_in_fan_out, prequantized=True)
        return cls(q, bias, compute_dtype=compute_dtype, buffer=buffer, origin=origin)

    @property
    def source_fan_in_fan_out(self) -> bool:
        """Whether the float layer this came from stored its weight (in, out) (PEFT's flag)."""
        return self.origin.fan_in_fan_out

    @property
    def nf4(self) -> NF4Weight:
        """The stored weight as an :class:`NF4Weight` (views of this layer's buffers)."""
        return self._weight(self.packed, self.absmax, self.nested_absmax)

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are double-quantized."""
        return self.nested_absmax is not None

    def _weight(self, packed, absmax, nested_absmax) -> NF4Weight:
        return NF4Weight(
            packed=packed, absmax=absmax, shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype, blocksize=self.blocksize, code=self.code,
            nested_absmax=nested_absmax, nested_code=self.nested_code, offset=self.offset,
            nested_blocksize=self.nested_blocksize,
        )

    def dequantize_for_compute(self, input_dtype, packed, absmax, nested_absmax) -> torch.Tensor:
        """The dequantized weight in the compute dtype (in the shared buffer when there is one)."""
        dtype = self.compute_dtype or input_dtype
        out = None
        if self.dequant_buffer is not None:
            out = self.dequant_buffer.get((self.out_features, self.in_features), dtype,
                                          packed.device)
        return dequantize_nf4(self._weight(packed, absmax, nested_absmax), dtype=dtype, out=out)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh float copy of the weight (default dtype: the original weight's)."""
        return self.nf4.dequantize(dtype or self.weight_dtype)

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """A fresh (out, in) float copy of the weight in ``dtype`` (FrozenBase)."""
        return self.dequantized_weight(dtype)

    def fused_state(self, x: torch.Tensor) -> tuple | None:
        """The packed codes and scales, when the layer computes in ``x``'s dtype (FrozenBase)."""
        if (self.compute_dtype or x.dtype) != x.dtype:
            return None
        return self.packed, self.absmax, self.nested_absmax

    def frozen_forward(self, x2d: torch.Tensor, state: tuple) -> torch.Tensor:
        """x W^T + b with W dequantized from ``state`` into x's dtype (FrozenBase)."""
        weight = self.dequantize_for_compute(x2d.dtype, *state)
        bias = None if self.bias is None else self.bias.to(x2d.dtype)
        return F.linear(x2d, weight, bias)

    def frozen_input_grad(self, grad2d: torch.Tensor, state: tuple) -> torch.Tensor:
        """grad W, with W dequantized again from ``state``: nothing float was kept (FrozenBase)."""
        return torch.mm(grad2d, self.dequantize_for_compute(grad2d.dtype, *state))

    @torch.no_grad()
    def merged_with(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    target: str, row_scale: torch.Tensor | None = None) -> nn.Module:
        """dequantized(W) + scaling * B @ A (each row times ``row_scale`` when given: DoRA) as
        an fp32 ``nn.Linear`` ("dequantized"), or that quantized again with fresh scales as a
        QuantizedLinear ("requantized")."""
        if target not in MERGE_TARGETS:
            raise ValueError(f"target must be one of {list(MERGE_TARGETS)}, got {target!r}")
        weight = self.dequantized_weight(torch.float32)
        weight += scaling * (lora_b.float() @ lora_a.float()).to(weight.device)
        if row_scale is not None:
            weight *= row_scale.float().to(weight.device)[:, None]
        if target == "requantized":
            q = quantize_nf4(weight.to(self.weight_dtype), self.blocksize, self.double_quant)
            origin = replace(self.origin, prequantized=False)
            return QuantizedLinear(q, self.bias, self.compute_dtype, self.dequant_buffer, origin)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = check_dtype(self.compute_dtype or x.dtype)
        out = _FrozenNF4.apply(x.to(compute), self, self.packed, self.absmax, self.nested_absmax)
        return out.to(x.dtype)

    def storage_bytes(self) -> int:
        """Bytes of the NF4 weight (codes, scales, maps) plus the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.nf4.storage_bytes() + bias

    def _apply(self, fn, recurse: bool = True):
        # Device moves apply; dtype casts (model.half()) would destroy the codes and scales.
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                moved = moved if moved.dtype == buf.dtype else buf.to(moved.device)
                if name == "code" and moved.device != buf.device:
                    moved = standard_code(moved)
                self._buffers[name] = moved
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in to_bnb_state_dict(self.nf4, prefix).items():
            destination[key] = value if keep_vars else value.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        expected = set(to_bnb_state_dict(self.nf4, prefix))
        if self.bias is not None:
            expected.add(prefix + "bias")
        present = {k for k in state_dict if k.startswith(prefix)}
        missing_keys.extend(sorted(expected - present))
        if strict:
            unexpected_keys.extend(sorted(present - expected))
        if expected - present:
            return
        try:
            q = from_bnb_state_dict(state_dict, prefix)
            self._set_weight(q.to(self.packed.device))
        except ValueError as exc:
            error_msgs.append(f"{prefix}weight: {exc}")
            return
        if self.bias is not None:
            self.bias.copy_(state_dict[prefix + "bias"])

    def extra_repr(self) -> str:
        compute = str(self.compute_dtype).removeprefix("torch.") if self.compute_dtype else "input"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, compute_dtype={compute}"
        )


def _linear_targets(model: nn.Module, target_modules, compute_dtype) -> list:
    """Names of the targeted layers, after checking each is an nn.Linear NF4 can hold."""
    if compute_dtype is not None:
        check_dtype(compute_dtype)
    names = resolve_target_modules(model, target_modules)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}; only nn.Linear is quantized")
        try:
            check_dtype(module.weight.dtype)
        except ValueError as exc:
            raise ValueError(f"{name}.weight: {exc}") from None
    return names


def quantize_model(model: nn.Module, target_modules, blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                   reuse_buffer: bool = True) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers (dotted-suffix names, as apply_lora) in place.

    Every target is checked before the first is replaced. With ``reuse_buffer`` the new layers
    share one :class:`DequantBuffer`. Returns the model.
    """
    check_blocksize(blocksize)
    names = _linear_targets(model, target_modules, compute_dtype)
    buffer = DequantBuffer() if reuse_buffer else None
    for name in names:
        layer = QuantizedLinear.from_linear(model.get_submodule(name), blocksize, double_quant,
                                            compute_dtype, buffer)
        set_submodule(model, name, layer)
    return model


def wrap_minigpt_qlora(model: nn.Module, r: int = 8, alpha: float = 16.0,
                       quant_scheme: str = DEFAULT_QUANT_SCHEME, target_modules=MINIGPT_TARGETS,
                       compute_dtype: torch.dtype | None = None, **lora_kw) -> nn.Module:
    """The course's QLoRA: each target Linear becomes LoRALinear(QuantizedLinear); A, B train.

    ``lora_kw`` go to :func:`minituner.lora.apply_lora` (dropout, init, seed, use_dora, ...). All
    arguments are checked before the model is touched. The bases share one DequantBuffer; read
    the quantization settings back with :func:`quantization_summary`.
    """
    blocksize, double_quant = parse_quant_scheme(quant_scheme)
    _linear_targets(model, target_modules, compute_dtype)
    apply_lora(model, target_modules, r=r, alpha=alpha, **lora_kw)
    buffer = DequantBuffer()
    for _, layer in lora_layers(model):
        layer.base = QuantizedLinear.from_linear(layer.base, blocksize, double_quant,
                                                 compute_dtype, buffer)
        if isinstance(layer, DoRALinear):  # m = ||deq(W)||_c: the NF4 base exactly at step 0
            layer.reset_magnitude()
    return model


def scheme_name(blocksize: int, double_quant: bool) -> str | None:
    """The QUANT_SCHEMES name of a (blocksize, double quantization) pair, or None."""
    return next((name for name, value in QUANT_SCHEMES.items()
                 if value == (blocksize, double_quant)), None)


def quantization_summary(model: nn.Module) -> dict | None:
    """How the model's NF4 layers are stored, read from the layers themselves (None: no NF4).

    Keys: method, quant_scheme (None for an unnamed setting), blocksize, double_quant,
    compute_dtype (None: the input's), prequantized (every layer read from a bitsandbytes
    checkpoint), quantized_modules.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return None
    settings = {(m.blocksize, m.double_quant, m.compute_dtype) for m in layers}
    if len(settings) != 1:
        raise ValueError("the model's quantized layers disagree on block size, double "
                         "quantization or compute dtype")
    blocksize, double_quant, compute = settings.pop()
    return {
        "method": "nf4", "quant_scheme": scheme_name(blocksize, double_quant),
        "blocksize": blocksize, "double_quant": double_quant,
        "compute_dtype": None if compute is None else str(compute).removeprefix("torch."),
        "prequantized": all(m.origin.prequantized for m in layers),
        "quantized_modules": len(layers),
    }


@torch.no_grad()
def merge_quantized_lora(model: nn.Module, target: str | None = "dequantized",
                         probe=None) -> MergeReport:
    """Fold every adapter into its NF4 base and report the logit change on ``probe``.

    "dequantized" (default): the base becomes an fp32 ``nn.Linear`` holding the NF4-dequantized
    weight plus the update; outputs match the unmerged model up to float rounding.
    "requantized": W + update is quantized again to NF4 with fresh scales (same block size and
    double quantization); this changes outputs, and the report says by how much.
    The LoRA wrappers stay (marked merged) until :func:`minituner.lora.merge_and_unload`.
    This is :func:`minituner.lora.merge_lora` with an NF4 target (QuantizedLinear.merged_with).
    """
    target = "dequantized" if target is None else target
    if target not in MERGE_TARGETS:
        raise ValueError(f"target must be one of {list(MERGE_TARGETS)}, got {target!r}")
    return merge_lora(model, probe=probe, target=target)


@dataclass(frozen=True)
class LogitDifference:
    """How far model A's logits are from model B's (the reference) on one batch."""

    max_abs: float
    mean_abs: float
    mean_abs_logit: float  # of the reference
    relative: float  # mean_abs / mean_abs_logit

    def to_dict(self) -> dict:
        """Plain dict, for JSON."""
        return asdict(self)


@torch.no_grad()
def logit_difference(model_a: nn.Module, model_b: nn.Module, tokens) -> LogitDifference:
    """Mean and max |logits_a - logits_b| on ``tokens``, and the mean relative to mean |logits_b|.

    The course's check: an NF4 base with the same adapter moves logits by about 1-3%.
    """
    logits_a, logits_b = run_probe(model_a, tokens), run_probe(model_b, tokens)
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    diff = (logits_a - logits_b).abs()
    scale = float(logits_b.abs().mean())
    mean_abs = float(diff.mean())
    return LogitDifference(max_abs=float(diff.max()), mean_abs=mean_abs, mean_abs_logit=scale,
                           relative=mean_abs / scale if scale > 0 else float("inf"))
