"""QLoRA: a frozen NF4 base Linear (:class:`QuantizedLinear`) under a trainable LoRA adapter.

The weight lives as NF4 bytes and scales (buffers, never parameters). Each forward dequantizes
it to the compute dtype and calls an ordinary GEMM; the backward dequantizes it again and
returns only the input gradient, so autograd keeps the packed weight and its scales, never the
dequantized (out, in) matrix and never the input. Layers of one model may share one scratch
buffer (:class:`DequantBuffer`) for the dequantized matrix, so it is allocated once.

``QuantizedLinear.state_dict()`` uses ``bnb.nn.Linear4bit``'s keys (``weight``,
``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...), so a QLoRA model's base
can be read by bitsandbytes and the other way round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minituner.lora import (
    MINIGPT_TARGETS,
    apply_lora,
    lora_layers,
    resolve_target_modules,
    set_submodule,
)
from minituner.lora.merge import MergeReport, output_drift, run_probe
from minituner.quant.kernels import standard_code
from minituner.quant.nf4 import (
    NF4Weight,
    check_blocksize,
    check_dtype,
    dequantize_nf4,
    quantize_nf4,
)

QUANT_SCHEMES = {  # name -> (blocksize, double quantization); QLoRA's own setting is the first
    "nf4_per_group_64": (64, True),
    "nf4_per_group_64_no_dq": (64, False),
    "nf4_per_group_32": (32, True),
    "nf4_per_group_128": (128, True),
    "nf4_per_group_256": (256, True),
}
MERGE_TARGETS = ("dequantized", "requantized")


def parse_quant_scheme(name: str) -> tuple:
    """(blocksize, double_quant) of a scheme name; "nf4_per_group_64" double-quantizes, as QLoRA."""
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


class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantized from NF4 in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, bias, layer, packed, absmax, nested_absmax):
        weight = layer.dequantize_for_compute(x.dtype, packed, absmax, nested_absmax)
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.save_for_backward(packed, absmax, nested_absmax)  # 4.1-4.5 bits per weight
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.dequantize_for_compute(grad_out.dtype, *ctx.saved_tensors)
            grad_x = grad_out @ weight
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None


class QuantizedLinear(nn.Module):
    """A frozen Linear stored in NF4 (4-bit codes + block scales) with a float bias.

    It holds no parameters. ``compute_dtype`` (fp32, bf16 or fp16; default: the input's dtype)
    is the dtype the weight is dequantized to and the GEMM runs in; the output comes back in
    the input's dtype.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, buffer: DequantBuffer | None = None):
        super().__init__()
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
                            compute_dtype: torch.dtype | None = None) -> QuantizedLinear:
        """Build from a ``bnb.nn.Linear4bit`` state dict; the bias is taken from it if present."""
        q = NF4Weight.from_bnb_state_dict(state_dict, prefix)
        if bias is None:
            bias = state_dict.get(prefix + "bias")
        return cls(q, bias, compute_dtype=compute_dtype)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype or x.dtype
        check_dtype(compute)
        bias = None if self.bias is None else self.bias.to(compute)
        out = _NF4Linear.apply(x.to(compute), bias, self, self.packed, self.absmax,
                               self.nested_absmax)
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
        for key, value in self.nf4.to_bnb_state_dict(prefix).items():
            destination[key] = value if keep_vars else value.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        expected = set(self.nf4.to_bnb_state_dict(prefix))
        if self.bias is not None:
            expected.add(prefix + "bias")
        present = {k for k in state_dict if k.startswith(prefix)}
        missing_keys.extend(sorted(expected - present))
        if strict:
            unexpected_keys.extend(sorted(present - expected))
        if expected - present:
            return
        try:
            q = NF4Weight.from_bnb_state_dict(state_dict, prefix)
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
                       quant_scheme: str = "nf4_per_group_64", target_modules=MINIGPT_TARGETS,
                       compute_dtype: torch.dtype | None = None, **lora_kw) -> nn.Module:
    """The course's QLoRA: each target Linear becomes LoRALinear(QuantizedLinear); A, B train.

    ``lora_kw`` go to :func:`minituner.lora.apply_lora` (dropout, init, seed, ...). All
    arguments are checked before the model is touched. The bases share one DequantBuffer.
    """
    blocksize, double_quant = parse_quant_scheme(quant_scheme)
    _linear_targets(model, target_modules, compute_dtype)
    apply_lora(model, target_modules, r=r, alpha=alpha, **lora_kw)
    buffer = DequantBuffer()
    for _, layer in lora_layers(model):
        layer.base = QuantizedLinear.from_linear(layer.base, blocksize, double_quant,
                                                 compute_dtype, buffer)
    model.qlora_config = {"quant_scheme": quant_scheme, "blocksize": blocksize,
                          "double_quant": double_quant,
                          "compute_dtype": None if compute_dtype is None else str(compute_dtype)}
    return model


@torch.no_grad()
def _merged_base(layer) -> nn.Module:
    """(dequantized W) + scaling * B @ A of a LoRALinear over a QuantizedLinear, in fp32."""
    base = layer.base
    weight = base.dequantized_weight(torch.float32) + layer.delta_weight().float()
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=weight.device)
    linear.weight.copy_(weight)
    if base.bias is not None:
        linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


@torch.no_grad()
def merge_quantized_lora(model: nn.Module, target: str | None = "dequantized",
                         probe=None) -> MergeReport:
    """Fold every adapter into its base and report the logit change on ``probe``.

    "dequantized" (default): the base becomes an fp32 ``nn.Linear`` holding the NF4-dequantized
    weight plus the update; outputs match the unmerged model up to float rounding.
    "requantized": W + update is quantized again to NF4 with fresh scales (same block size and
    double quantization); this changes outputs, and the report says by how much.
    The LoRA wrappers stay (marked merged) until :func:`minituner.lora.merge_and_unload`.
    """
    target = "dequantized" if target is None else target
    if target not in MERGE_TARGETS:
        raise ValueError(f"target must be one of {list(MERGE_TARGETS)}, got {target!r}")
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError("model has no LoRA layers to merge")
    if any(m.merged for m in layers):
        raise ValueError("model is already merged")
    before = run_probe(model, probe)
    for layer in layers:
        base = layer.base
        if not isinstance(base, QuantizedLinear):
            layer.merge()
            continue
        merged = _merged_base(layer)
        if target == "requantized":
            q = quantize_nf4(merged.weight.to(base.weight_dtype), base.blocksize,
                             base.double_quant)
            merged = QuantizedLinear(q, base.bias, base.compute_dtype, base.dequant_buffer)
        layer.base = merged
        layer.merged = True
    max_diff, mean_diff = output_drift(before, run_probe(model, probe))
    return MergeReport(n_layers=len(layers), target=target, max_abs_diff=max_diff,
                       mean_abs_diff=mean_diff)


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
