"""minituner: LoRA and QLoRA fine-tuning from first principles in PyTorch."""

__version__ = "0.1.0"

_ADAPTERS = "minituner.lora.adapters"
_LAZY_EXPORTS = {"load_adapter": _ADAPTERS, "save_adapter": _ADAPTERS}


def __getattr__(name: str):
    """Lazy top-level exports, so ``import minituner`` stays light (no torch import)."""
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'minituner' has no attribute {name!r}")
