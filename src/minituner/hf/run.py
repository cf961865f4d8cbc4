"""The parts of a transformers fine-tuning run around the loop: data, model, base record, results.

Used by :class:`minituner.hf.finetune.HFBackend`; nothing here imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minituner.hf.chat import template_record, tokenizer_template, uses_template
from minituner.hf.data import EncodedData, encode_examples, read_examples, split_validation
from minituner.hf.load import base_record, load_base
from minituner.hf.models import (
    ALL_LINEAR,
    apply_hf_lora,
    context_length,
    load_hf_tokenizer,
    read_hf_config,
)
from minituner.hf.tokens import add_new_tokens, token_modules_to_save
from minituner.lora.adapters import base_fingerprint
from minituner.lora.saved_modules import apply_modules_to_save
from minituner.lora.targets import target_spec
from minituner.quant.qlora import QuantizedLinear
from minituner.training.config import base_method, parse_init, parse_layers, uses_dora
from minituner.util.files import sha256_json


@dataclass
class HFPrepared:
    """Encoded train/validation data of a run and what produced it."""

    train: EncodedData
    validation: EncodedData | None
    train_records: list
    validation_records: list
    pad_id: int
    max_len: int
    context: int | None
    chat_template: dict | None = None  # the template rendered with (config.json records it)
    added_tokens: dict | None = None  # --add-tokens: what was added (hf.tokens.add_new_tokens)
    tokenizer: object = None  # the tokenizer the data was encoded with


def prepare_hf_data(cfg) -> HFPrepared:
    """Read, split and encode the JSONL data for ``cfg.model``'s tokenizer and context."""
    config = read_hf_config(cfg.model)
    tokenizer = load_hf_tokenizer(cfg.model)
    context = context_length(config)
    if cfg.max_len is not None and context is not None and cfg.max_len > context:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the model's context of {context} "
                         "tokens")
    max_len = cfg.max_len or context or 1024
    added = None
    if cfg.add_tokens:  # before encoding, so the data may use them
        added = add_new_tokens(tokenizer, cfg.add_tokens, config.vocab_size, str(cfg.model))
    examples = read_examples(cfg.train_data)
    validation_examples: list = []
    if cfg.val_data:
        validation_examples = read_examples(cfg.val_data)
    elif cfg.val_fraction:
        examples, validation_examples = split_validation(examples, cfg.val_fraction, cfg.seed)
    encode = {"max_len": max_len, "chat_template": cfg.chat_template, "strict": cfg.strict_len}
    train = encode_examples(tokenizer, examples, where=str(cfg.train_data), **encode)
    validation = None
    if validation_examples:
        where = str(cfg.val_data or cfg.train_data)
        validation = encode_examples(tokenizer, validation_examples, where=where, **encode)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    records = [r for _, r in examples] + [r for _, r in validation_examples]
    template = None
    if uses_template(records, cfg.chat_template):
        template = template_record(tokenizer, tokenizer_template(tokenizer, cfg.model))
    return HFPrepared(train, validation, [r for _, r in examples],
                      [r for _, r in validation_examples], pad_id, max_len, context, template,
                      added, tokenizer)


def data_sha256(prepared: HFPrepared) -> str:
    """Hash of the exact train and validation records (config.json: a --resume must match)."""
    return sha256_json({"train": prepared.train_records,
                        "validation": prepared.validation_records})


@dataclass
class HFBase:
    """How the base of a run was loaded (:func:`minituner.hf.load.base_record`) and its
    :func:`minituner.lora.adapters.base_fingerprint`, hashed once: config.json, the manifest and
    the adapter all record them."""

    record: dict
    fingerprint: str
    model_type: str

    @property
    def path(self) -> str:
        """The base's directory."""
        return self.record["path"]

    def to_dict(self) -> dict:
        """config.json's "base" section."""
        return {**self.record, "model_type": self.model_type, "fingerprint": self.fingerprint}


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (gradients reach LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def load_hf_base(cfg, dtype: torch.dtype, device: torch.device) -> tuple:
    """(base model, :class:`HFBase`): float for LoRA, NF4 for QLoRA."""
    record = base_record(cfg.model, base_method(cfg.method), dtype, cfg.quant_scheme)
    model = load_base(record, device=device, allow_pickle=cfg.allow_pickle)
    return model, HFBase(record, base_fingerprint(model), model.config.model_type)


def add_lora(model: nn.Module, cfg) -> nn.Module:
    """LoRA on the base's Linears (``cfg.targets``, default all, less ``cfg.exclude``, in
    ``cfg.layers``; ranks and alphas by ``cfg.rank_pattern`` / ``cfg.alpha_pattern``) and
    ``cfg.modules_to_save`` trained in full (with ``cfg.add_tokens``, the embedding and the
    head too), in training mode."""
    targets = target_spec(cfg.targets) if cfg.targets else ALL_LINEAR
    apply_hf_lora(model, targets, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                  init=parse_init(cfg.init)[0] or "kaiming", use_rslora=cfg.use_rslora,
                  seed=cfg.seed, use_dora=uses_dora(cfg.method),
                  exclude_modules=target_spec(cfg.exclude), layers_to_transform=parse_layers(
                      cfg.layers), rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern)
    saved = token_modules_to_save(model, cfg.modules_to_save) if cfg.add_tokens \
        else cfg.modules_to_save
    if saved:
        apply_modules_to_save(model, saved)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    return model.train()


def base_parameter_count(model: nn.Module) -> int:
    """Frozen parameters, NF4 weights counted as the values they stand for."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return frozen + sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
                        for m in model.modules() if isinstance(m, QuantizedLinear))
