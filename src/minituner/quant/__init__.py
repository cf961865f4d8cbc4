"""Quantization: the NF4 format (a readable reference and the fast kernels), bitsandbytes-format
state dicts, ``QuantizedLinear`` and QLoRA."""

# The course's name for NF4 in blocks of 64 with double quantization (QLoRA's setting). Kept here,
# free of torch, so configs and the CLI can name it without loading the kernels.
DEFAULT_QUANT_SCHEME = "nf4_per_group_64"
