"""Quantization: the NF4 format (a readable reference and the fast kernels), bitsandbytes-format
state dicts, ``QuantizedLinear`` and QLoRA."""
