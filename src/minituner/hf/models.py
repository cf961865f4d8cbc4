"""LoRA and QLoRA on Hugging Face transformers causal LMs read from a local directory.

A model is named ``hf:DIR``, where DIR is a ``save_pretrained`` directory (config.json plus
safetensors weights, and a tokenizer). Supported architectures: GPT-2 (its attention and MLP
layers are ``Conv1D``, weight stored (in, out), which :mod:`minituner.lora` wraps directly) and
the Llama family (Llama, Mistral, Qwen2, Qwen3: nn.Linear q/k/v/o and gate/up/down).

Nothing is downloaded: loading is local-only. Full-precision loading goes through
``AutoModelForCausalLM.from_pretrained``; QLoRA loading streams the safetensors file layer by
layer (:mod:`minituner.hf.load`), so the float model is never in memory whole.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from minituner.lora import ALL_LINEAR, apply_lora, resolve_target_modules
from minituner.lora.targets import is_regex
from minituner.util.files import read_json

HF_PREFIX = "hf:"
TANH_GELU_MODULES = ("NewGELUActivation", "FastGELUActivation")  # transformers' class names
SUPPORTED_ARCHITECTURES = {
    "gpt2": "GPT-2 (Conv1D c_attn/c_proj/c_fc)",
    "llama": "Llama (q/k/v/o_proj, gate/up/down_proj)",
    "mistral": "Mistral (q/k/v/o_proj, gate/up/down_proj)",
    "qwen2": "Qwen2 (q/k/v/o_proj, gate/up/down_proj)",
    "qwen3": "Qwen3 (q/k/v/o_proj, gate/up/down_proj)",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def is_hf_spec(spec: str | os.PathLike) -> bool:
    """True for a model given as ``hf:DIR``."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def hf_dir(spec: str | os.PathLike) -> Path:
    """The directory of an ``hf:DIR`` spec (a plain path is taken as is)."""
    text = str(spec)
    path = Path(text[len(HF_PREFIX):] if text.startswith(HF_PREFIX) else text)
    if not text.removeprefix(HF_PREFIX):
        raise ValueError("--model: 'hf:' needs a directory after it (hf:DIR)")
    return path


def supported_list() -> str:
    """Comma-separated model_type names minituner supports."""
    return ", ".join(SUPPORTED_ARCHITECTURES)


def check_architecture(model_type: str | None, where: str = "model") -> str:
    """Refuse an unsupported architecture in one line that lists the supported ones."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{where}: unsupported architecture {model_type!r}; minituner supports "
                         f"model_type {supported_list()}")
    return model_type


def read_hf_config(path: str | os.PathLike):
    """The transformers config of a local model directory, after checking its architecture."""
    directory = hf_dir(path)
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: model directory not found")
    if not config_file.is_file():
        raise ValueError(f"{directory}: not a transformers model directory (no config.json)")
    raw = read_json(config_file, "model config")
    check_architecture(raw.get("model_type") if isinstance(raw, dict) else None, str(config_file))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory), local_files_only=True)


def context_length(config) -> int | None:
    """The longest sequence the model's positions cover (n_positions / max_position_embeddings)."""
    for field in ("n_positions", "max_position_embeddings"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu' / 'cuda' / 'cuda:N' as given."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # an unknown device type ("gpu") is refused by torch itself
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a CUDA device that supports it, else fp32; 'fp32' / 'bf16' as given."""
    if name in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto, fp32 or bf16, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'fp32' or 'bf16'."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


@contextmanager
def quiet_transformers():
    """Inside the block transformers prints no progress bars and only errors (library code
    never prints); its settings are restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
    allow_pickle: bool = False,
) -> nn.Module:
    """A full-precision causal LM from a local directory, in eval mode, weights in ``dtype``.

    Weights are read from safetensors only: unpickling ``pytorch_model.bin`` can run code, so a
    folder holding only pickle weights is refused unless ``allow_pickle`` is True.
    """
    config = read_hf_config(path)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{hf_dir(path)}: the checkpoint is 4-bit quantized; use --method qlora")
    use_safetensors = check_weight_files(hf_dir(path), allow_pickle)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(hf_dir(path)), config=config, dtype=dtype, local_files_only=True,
                use_safetensors=use_safetensors,
            )
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{hf_dir(path)}: cannot load the model ({_first_line(exc)})") from None
    fuse_activations(model)
    return model.to(device).eval()


def check_weight_files(directory: Path, allow_pickle: bool) -> bool:
    """True when the folder has safetensors weights (the only ones read); a pickle-only folder
    is refused unless ``allow_pickle``, which then returns False (transformers reads the .bin)."""
    if any((directory / name).is_file() for name in SAFETENSORS_FILES):
        return True
    pickles = [name for name in PICKLE_FILES if (directory / name).is_file()]
    if not pickles:
        raise ValueError(f"{directory}: no model weights ({' or '.join(SAFETENSORS_FILES)})")
    if not allow_pickle:
        raise ValueError(f"{directory}: holds only pickle weights ({pickles[0]}), which can run "
                         "code when loaded; convert them to safetensors or pass --allow-pickle")
    return False


class TanhGELU(nn.Module):
    """GELU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def fuse_activations(model: nn.Module) -> int:
    """Swap transformers' elementwise tanh-GELU modules for :class:`TanhGELU`; how many."""
    names = [name for name, module in model.named_modules()
             if type(module).__name__ in TANH_GELU_MODULES
             and type(module).__module__.startswith("transformers")]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, TanhGELU())
    return len(names)


def load_hf_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in the model directory (local files only)."""
    directory = hf_dir(path)
    missing = ValueError(f"{directory}: no tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise missing  # transformers would build an empty tokenizer and later errors mislead
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{directory}: no usable tokenizer ({_first_line(exc)})") from None
    if len(tokenizer) <= 1:
        raise missing
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{directory}: the tokenizer has no EOS token (needed to end completions)")
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse_targets(target_modules):
    """'all-linear', a list of names, a comma-separated string of names, or a regex (a string
    that is not such a list) -> apply_lora's form."""
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        names = [t.strip() for t in target_modules.split(",") if t.strip()]
        return target_modules if any(map(is_regex, names)) else names
    return target_modules


def hf_targets(model: nn.Module, target_modules=ALL_LINEAR) -> list:
    """Module paths selected by 'all-linear' (never the LM head, tied or not) or by names."""
    return resolve_target_modules(model, parse_targets(target_modules))


def apply_hf_lora(
    model: nn.Module, target_modules=ALL_LINEAR, r: int = 8, alpha: float = 16.0, **kwargs
) -> nn.Module:
    """LoRA on a transformers model: :func:`minituner.lora.apply_lora`, comma lists allowed."""
    return apply_lora(model, parse_targets(target_modules), r=r, alpha=alpha, **kwargs)


def hf_forward_logits(model: nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (batch, seq, vocab) of a transformers causal LM, without its KV cache."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits
