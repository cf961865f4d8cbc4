"""The settings a model's LoRA layers were made with, as one declared value.

Every :class:`minituner.lora.layer.LoRALinear` of a model holds the same :class:`LoRAConfig`
(its ``config`` field), so the settings travel with the layers: through ``copy.deepcopy``,
saving and loading an adapter, and away with the layers when they are merged and unloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["LoRAConfig"]


@dataclass(frozen=True)
class LoRAConfig:
    """What :func:`minituner.lora.apply_lora` (or loading an adapter) was asked for.

    ``r`` and ``alpha`` are the defaults; ``rank_pattern`` / ``alpha_pattern`` override them per
    module (PEFT's rule), so a layer's own ``r`` and ``alpha`` are the values it uses.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "gaussian"
    use_rslora: bool = False
    use_dora: bool = False  # DoRA layers (minituner.lora.dora), PEFT's use_dora
    target_modules: list | str = field(default_factory=list)
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    seed: int | None = None
    exclude_modules: list | str | None = None  # PEFT's exclude_modules
    layers_to_transform: list | None = None  # PEFT's layers_to_transform
    modules_to_save: list | None = None  # paths of modules trained in full (PEFT's layout)

    def to_dict(self) -> dict:
        """Plain dict, for JSON."""
        return asdict(self)
