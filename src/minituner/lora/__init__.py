"""LoRA: the layer, the interface it uses to reach its frozen base, its fused autograd function,
target resolution, injection, merging, PEFT-format adapter files and several named adapters
on one base. The package's public API is
re-exported here. Nothing in this package imports quantization code."""

from minituner.lora.base import DenseBase, FrozenBase, frozen_base
from minituner.lora.config import LoRAConfig
from minituner.lora.dora import DoRALinear, dora_layers
from minituner.lora.inject import (
    apply_lora,
    count_lora_params,
    disable_adapters,
    install_lora_layers,
    is_lora_name,
    load_lora_state_dict,
    lora_param_table,
    lora_ratio,
    lora_state_dict,
    model_lora_config,
    set_model_lora_config,
    wrap_minigpt_with_lora,
)
from minituner.lora.layer import (
    KNOWN_INITS,
    LoRALinear,
    check_alpha,
    check_dropout,
    check_init,
    check_rank,
    is_fan_in_fan_out,
    linear_features,
    lora_layers,
    lora_scaling,
    source_fan_in_fan_out,
)
from minituner.lora.merge import (
    MergeReport,
    merge_and_unload,
    merge_lora,
    output_drift,
    run_probe,
    unmerge_lora,
)
from minituner.lora.multi import (
    BASE_ROW,
    COMBINATION_TYPES,
    LoRAAdapter,
    MultiLoRALinear,
    active_adapter,
    adapter_names,
    add_named_adapters,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter_layers,
    enable_adapter_layers,
    forward_with_adapters,
    load_named_adapter,
    multi_layers,
    name_adapter,
    save_named_adapter,
    set_adapter,
    use_adapter_rows,
)
from minituner.lora.targets import (
    ALL_LINEAR,
    MINIGPT_TARGETS,
    check_patterns,
    is_linear_like,
    pattern_value,
    resolve_target_modules,
    set_submodule,
    suffix_matches,
)

__all__ = [
    "DenseBase", "DoRALinear", "dora_layers", "FrozenBase", "LoRAConfig", "frozen_base",
    "model_lora_config",
    "set_model_lora_config",
    "ALL_LINEAR", "KNOWN_INITS", "MINIGPT_TARGETS", "LoRALinear", "MergeReport", "apply_lora",
    "check_alpha", "check_dropout", "check_init", "check_patterns", "check_rank",
    "count_lora_params", "disable_adapters", "install_lora_layers", "is_fan_in_fan_out",
    "is_linear_like",
    "is_lora_name", "linear_features", "load_lora_state_dict", "lora_layers", "lora_param_table",
    "lora_ratio", "lora_scaling", "lora_state_dict", "merge_and_unload", "merge_lora",
    "output_drift", "pattern_value", "resolve_target_modules", "run_probe", "set_submodule",
    "source_fan_in_fan_out",
    "suffix_matches", "unmerge_lora", "wrap_minigpt_with_lora",
    # several named adapters on one base (multi.py)
    "BASE_ROW", "COMBINATION_TYPES", "LoRAAdapter", "MultiLoRALinear", "active_adapter",
    "adapter_names", "add_named_adapters", "add_weighted_adapter", "delete_adapter",
    "disable_adapter_layers",
    "enable_adapter_layers", "forward_with_adapters", "load_named_adapter", "multi_layers",
    "name_adapter", "save_named_adapter", "set_adapter", "use_adapter_rows",
]
