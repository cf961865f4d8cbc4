"""Fine-tuning a transformers causal LM on the user's JSONL with LoRA or QLoRA: the transformers
backend of :func:`minituner.training.pipeline.run_finetune`.

The pipeline runs what every fine-tuning run shares (:func:`minituner.training.loop.fit`:
steps, gradient accumulation, clipping, evaluation, best step, checkpoints and resume; the
stateless :class:`minituner.training.sampling.MixedBatches` sampler; the run folder). What is
added here: the transformers model and its batches, devices and dtypes, quantize-on-load,
gradient checkpointing, and data parallelism (``torchrun``; see
:mod:`minituner.training.distributed`).

Batch size is GLOBAL: ``batch_size`` rows per micro-step over all processes, split evenly, so
a run resumes on another process count and N processes compute what one process computes.
The run folder holds config.json, manifest.json, results.json, train_log.jsonl, loss.png,
data/ (the exact train/validation records), checkpoints/ and adapter/ (PEFT layout).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from minituner.hf.fsdp import FSDPForward, check_fsdp_settings, load_sharded_base
from minituner.hf.load import base_record
from minituner.hf.models import dtype_name, read_hf_config, resolve_device, resolve_dtype
from minituner.hf.packing import check_packing_config, check_packing_model, packed_inputs
from minituner.hf.plan import measured_peak, plan_from_data, resident_bytes
from minituner.hf.run import (
    HFBase,
    HFPrepared,
    add_lora,
    base_parameter_count,
    data_sha256,
    enable_grad_checkpointing,
    load_hf_base,
    prepare_hf_data,
)
from minituner.hf.tokens import resize_for_tokens, save_tokenizer
from minituner.lora import lora_layers, lora_state_dict
from minituner.lora.adapters import base_tensor_stats, save_adapter
from minituner.lora.init import BASE_CHANGING_INITS
from minituner.models.minigpt import masked_token_nll
from minituner.training import distributed as D
from minituner.training import fsdp as F
from minituner.training import pipeline
from minituner.training.config import FinetuneConfig, base_method, parse_init
from minituner.training.evaluation import make_validator
from minituner.training.losses import final_hidden_states, masked_lm_nll, plain_output_head
from minituner.training.packing import is_packed, pack_sequences
from minituner.training.vocab_parallel import VocabShardedHead, vocab_parallel_nll
from minituner.util.files import mmap_threshold_in_effect, release_freed_memory

__all__ = ["HFBackend", "NoGradientError", "check_lora_gradients", "dropout_seed",
           "enable_grad_checkpointing", "make_hf_loss_fn", "make_hf_validator", "padding_mask",
           "run_hf_finetune", "runtime_settings", "seed_dropout"]


class NoGradientError(ValueError):
    """LoRA layers received no gradient: training would silently do nothing."""


def check_lora_gradients(model: nn.Module, step: int) -> None:
    """Refuse to go on when some lora_B has no (or an all-zero) gradient after a step.

    At the first step B = 0, so A's gradient is 0 by construction, but every B gets one. A
    missing B gradient is the known trap of reentrant gradient checkpointing over frozen
    inputs: the loss falls nowhere and the adapter never moves.
    """
    dead = [name for name, layer in lora_layers(model) if layer.r > 0 and (
        layer.lora_B.grad is None or not bool(layer.lora_B.grad.abs().sum() > 0))]
    if dead:
        raise NoGradientError(
            f"after step {step}, {len(dead)} LoRA layer(s) got no gradient (first: {dead[0]}): "
            "the adapter would not train (reentrant gradient checkpointing over frozen inputs "
            "is the usual cause; minituner uses non-reentrant checkpointing)"
        )


def padding_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """Attention mask of a right-padded batch: every position up to the row's last target.

    Each row ends with a target (the EOS, or the last text token), so this is exactly its
    real tokens.
    """
    return (target_mask.flip(-1).cumsum(-1).flip(-1) > 0).long()


def make_hf_loss_fn(forward_model: nn.Module, device: torch.device):
    """loss_fn(model, batch) -> (summed NLL over masked targets, token count).

    ``forward_model`` is the model to call (the DDP wrapper when distributed), so that DDP
    sees the forward and synchronises the gradients. The LM head and the loss run chunked
    (:func:`minituner.training.losses.masked_lm_nll`) when the head is a plain Linear, and
    vocabulary-parallel (:func:`minituner.training.vocab_parallel.vocab_parallel_nll`) when
    --fsdp split its rows over the processes. A packed
    batch (``--packing``) gets its block-diagonal mask and per-example positions
    (:func:`minituner.hf.packing.packed_inputs`).
    """

    inner = getattr(forward_model, "module", forward_model)  # DDP: .module
    head = plain_output_head(inner)
    sharded_head = inner.get_output_embeddings()
    if not isinstance(sharded_head, VocabShardedHead):
        sharded_head = None
    dtype = inner.get_input_embeddings().weight.dtype

    def loss_fn(model, batch: dict) -> tuple:
        ids = batch["input_ids"].to(device)
        if is_packed(batch):  # block-diagonal attention, per-example positions
            inputs = packed_inputs(batch, dtype, device)
        else:
            inputs = {"attention_mask": padding_mask(batch["target_mask"]).to(device),
                      "position_ids": None}
        targets, mask = batch["targets"].to(device), batch["target_mask"].to(device)
        if sharded_head is not None:  # --fsdp: the head's rows are split over processes
            hidden = final_hidden_states(forward_model, ids, inputs["attention_mask"],
                                         inputs["position_ids"])
            labels = torch.where(mask.bool(), targets, -100)
            return vocab_parallel_nll(hidden, sharded_head.weight, labels), mask.sum()
        if head is not None:
            return masked_lm_nll(forward_model, head, ids, inputs["attention_mask"], targets,
                                 mask, position_ids=inputs["position_ids"])
        out = forward_model(input_ids=ids, use_cache=False,
                            **{k: v for k, v in inputs.items() if v is not None})
        return masked_token_nll(out.logits, targets, mask)

    return loss_fn


def dropout_seed(seed: int, micro_step: int, rank: int) -> int:
    """The RNG seed of micro-batch ``micro_step`` on process ``rank``: a function of the run's
    seed and the step alone, so the dropout masks of a step are the same in a fresh, a repeated
    and a resumed run, and differ between processes."""
    return ((seed * 1_000_003 + micro_step) * 65_537 + rank) % (2**63)


def seed_dropout(loss_fn, seed: int, rank: int):
    """``loss_fn`` that first seeds torch's RNGs (every device) with :func:`dropout_seed` of
    the batch's ``micro_step``."""

    def seeded(model, batch: dict) -> tuple:
        torch.manual_seed(dropout_seed(seed, batch["micro_step"], rank))
        return loss_fn(model, batch)

    return seeded


def hf_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a right-padded batch: ``model(input_ids=..., attention_mask=...)``."""
    return model(input_ids=batch["input_ids"], attention_mask=padding_mask(batch["target_mask"]),
                 use_cache=False).logits


def _sum_over_processes(totals: list) -> list:
    return D.all_reduce_sum(torch.tensor(totals, dtype=torch.float64)).tolist()


def make_hf_validator(sequences: list, pad_id: int, device: torch.device, info: D.DistInfo,
                      batch_size: int = 8, sharded: bool = False):
    """evaluate(model) -> {"val_loss", "val_ppl"}: each process scores its share, then sums.

    ``sharded`` (an FSDP model): every process scores every batch, so the gathers of the
    processes stay in step, and the root's gathered parameters are freed after (its root
    keeps them after a forward, for the backward that follows in training)."""
    if not sharded:
        return make_validator(sequences[info.rank::info.world_size], pad_id, hf_logits,
                              batch_size=batch_size, device=device,
                              reduce_sum=_sum_over_processes)
    evaluate = make_validator(sequences, pad_id, hf_logits, batch_size=batch_size, device=device)

    def evaluate_and_reshard(model: nn.Module) -> dict:
        metrics = evaluate(model)
        model.reshard()
        return metrics

    return evaluate_and_reshard


def runtime_settings(cfg: FinetuneConfig, device_name: str | None = "auto") -> dict:
    """Device and compute dtype this run uses (resolved from 'auto'), and the process group."""
    device = resolve_device(device_name)
    info = D.init_distributed(device)
    device = D.process_device(device, info)
    return {"device": device, "dtype": resolve_dtype(cfg.dtype, device), "dist": info}


class HFBackend:
    """The transformers side of a fine-tuning run: devices, dtypes, processes (DDP), the base
    loaded (NF4 for QLoRA), LoRA applied, and the adapter saved with the base's record."""

    run_kind = "finetune-hf"

    def __init__(self, device: str | None = "auto"):
        self.device_name = device
        self.runtime: dict = {}
        self.data: HFPrepared | None = None
        self.model: nn.Module | None = None
        self.base: HFBase | None = None
        self.gradients_checked = False
        self.original: dict = {}  # a base-changing init: the adapter at step 0, base stats
        self.plan: dict = {}  # the preflight plan (predicted peak memory, padding)
        self.rss_before_load: int | None = None
        self.base_params: int | None = None  # counted before FSDP shards the NF4 buffers
        self.trim_after_steps = False  # --fsdp on the CPU: release freed heap after each step

    def setup(self, cfg: FinetuneConfig) -> D.DistInfo:
        """Device, compute dtype and process group; the global batch must split evenly."""
        if cfg.kind != "hf":
            raise ValueError(f"--model must be hf:DIR for a transformers run, got {cfg.model!r}")
        self.runtime = runtime_settings(cfg, self.device_name)
        info = self.runtime["dist"]
        if cfg.fsdp:
            check_fsdp_settings(cfg)
        if cfg.batch_size % info.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} does not split evenly over "
                             f"{info.world_size} processes")
        return info

    def prepare(self, cfg: FinetuneConfig) -> pipeline.Prepared:
        """Read, split and encode the data; load the base."""
        self.data = prepared = prepare_hf_data(cfg)
        train = prepared.train.sequences
        if cfg.packing:
            check_packing_config(read_hf_config(cfg.model), prepared.max_len)
            train = pack_sequences(train, prepared.max_len)
        self.plan = plan_from_data(cfg, prepared, self.runtime["dtype"],
                                   self.runtime["dist"].world_size)
        if self.runtime["device"].type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.runtime["device"])
        self.rss_before_load = resident_bytes()
        if self.sharded(cfg):
            self.load_sharded(cfg)
        else:
            self.model, self.base = load_hf_base(cfg, self.runtime["dtype"],
                                                 self.runtime["device"])
        release_freed_memory()  # loading's transient buffers would otherwise stay resident
        if prepared.added_tokens is not None:  # the base as loaded, then grown (build_trainable)
            self.base.record["added_tokens"] = prepared.added_tokens
        if cfg.packing:
            check_packing_model(self.model, prepared.max_len)
        identity = {"compute_dtype": dtype_name(self.runtime["dtype"]),
                    "base": self.base.to_dict(), "data_sha256": data_sha256(prepared)}
        if prepared.chat_template is not None:  # generate --chat renders with the same one
            identity["chat_template"] = prepared.chat_template
        validation = [] if prepared.validation is None else prepared.validation.sequences
        return pipeline.Prepared(train, validation, prepared.pad_id, identity,
                                 files={"train": prepared.train_records,
                                        "validation": prepared.validation_records})

    def load_sharded(self, cfg: FinetuneConfig) -> None:
        """--fsdp: the base built sharded, LoRA applied, each process reading and keeping only
        its part of every layer (:func:`minituner.hf.fsdp.load_sharded_base`)."""
        record = base_record(cfg.model, base_method(cfg.method), self.runtime["dtype"],
                             cfg.quant_scheme)
        loaded = load_sharded_base(record, self.runtime["dist"], self.runtime["device"],
                                   lambda model: add_lora(model, cfg))
        self.model, self.base_params = loaded.model, loaded.base_params
        self.base = HFBase(record, loaded.fingerprint, self.model.config.model_type)
        self.original = {"tensor_stats": loaded.tensor_stats}
        self.trim_after_steps = self.runtime["device"].type == "cpu"

    def evaluate_before(self, cfg: FinetuneConfig) -> None:
        """Nothing: a transformers run reports its validation loss only."""

    def build_trainable(self, cfg: FinetuneConfig) -> nn.Module:
        """LoRA on the base (and gradient checkpointing when asked); a base-changing init
        (PiSSA) also keeps what saving its converted adapter needs; --fsdp: already done
        while loading (:meth:`load_sharded`)."""
        if self.sharded(cfg):
            return self.model
        changes_base = parse_init(cfg.init)[0] in BASE_CHANGING_INITS
        saves_modules = bool(cfg.modules_to_save or cfg.add_tokens)
        keep_stats = changes_base or saves_modules
        stats = base_tensor_stats(self.model) if keep_stats else None
        if self.data.added_tokens is not None:  # the statistics describe the original base
            resize_for_tokens(self.model, self.data.added_tokens)
        model = add_lora(self.model, cfg)
        self.base_params = base_parameter_count(model)
        if changes_base:
            self.original = {"initial": lora_state_dict(model), "tensor_stats": stats}
        elif stats is not None:  # trained copies must not enter the base's statistics
            self.original = {"tensor_stats": stats}
        return model

    def sharded(self, cfg: FinetuneConfig) -> bool:
        """True when this run shards the model (--fsdp with more than one process)."""
        return bool(cfg.fsdp) and self.runtime["dist"].enabled

    def loss_fn(self, cfg: FinetuneConfig, model: nn.Module):
        """Masked NLL through the DDP wrapper (or the FSDP root) when distributed; with
        dropout, each micro-batch seeds the RNG from (seed, micro-step, process) first
        (:func:`seed_dropout`)."""
        if self.sharded(cfg):
            forward_model = FSDPForward(model)
        else:
            forward_model = D.wrap_ddp(model, self.runtime["dist"], self.runtime["device"])
        loss_fn = make_hf_loss_fn(forward_model, self.runtime["device"])
        if cfg.dropout == 0:
            return loss_fn
        return seed_dropout(loss_fn, cfg.seed, self.runtime["dist"].rank)

    def validator(self, cfg: FinetuneConfig, prepared: pipeline.Prepared):
        """Validation NLL summed over processes, or None without validation data."""
        if not prepared.validation:
            return None
        if self.sharded(cfg):  # every process runs every batch: FSDP's gathers stay in step
            return make_hf_validator(prepared.validation, prepared.pad_id,
                                     self.runtime["device"], D.DistInfo(), sharded=True)
        return make_hf_validator(prepared.validation, prepared.pad_id, self.runtime["device"],
                                 self.runtime["dist"])

    def start_info(self) -> dict:
        """Device, dtype, process group and the encoded data (truncations to warn about)."""
        return {**self.runtime, "data": self.data}

    def on_step(self, model: nn.Module, record: dict) -> None:
        """After the first step, refuse LoRA layers that got no gradient. A sharded CPU run
        hands the heap memory the step freed back to the OS: FSDP's per-block gathers leave
        freed blocks in glibc's heap that the next step's root gather (fresh memory) cannot
        reuse, so they would add to the peak."""
        if not self.gradients_checked:
            check_lora_gradients(model, record["step"])
            self.gradients_checked = True
        if self.trim_after_steps:
            release_freed_memory()

    def results(self, cfg: FinetuneConfig, run: pipeline.TrainedRun) -> dict:
        """Loss, best step, sizes, device and throughput of the run."""
        log, result, data = run.fit.log, run.fit, self.data
        this_process = [r for r in log if r["step"] > (result.resumed_from or 0)]
        tokens = sum(r.get("target_tokens", 0) for r in this_process)
        train_time = this_process[-1]["elapsed_s"] if this_process else 0.0
        return {
            "method": cfg.method, "rank": cfg.rank, "alpha": cfg.alpha, "steps": run.steps,
            "final_loss": log[-1]["loss"] if log else None,
            "best_step": result.best_step, "best_val_loss": result.best_metrics.get("val_loss"),
            "best_val_ppl": result.best_metrics.get("val_ppl"),
            "resumed_from_step": result.resumed_from,
            "trainable_params": sum(p.numel() for p in run.model.parameters()
                                    if p.requires_grad),
            "base_params": self.base_params,
            "device": str(self.runtime["device"]),
            "compute_dtype": dtype_name(self.runtime["dtype"]),
            "world_size": run.dist.world_size, "global_batch": cfg.batch_size,
            "train_examples": len(data.train.sequences),
            "validation_examples": 0 if data.validation is None else
            len(data.validation.sequences),
            "truncated_lines": data.train.truncated, "dropped_lines": data.train.dropped,
            "max_len": data.max_len,
            "target_tokens_per_s": tokens / train_time if train_time else None,
            "packing": bool(cfg.packing), "train_rows": len(run.batches.sft),
            "padding_fraction": self.plan["layouts"]["packed" if cfg.packing
                                                     else "unpacked"]["padding_fraction"],
            "memory": {"predicted": self.plan["memory"],
                       "measured": measured_peak(self.rss_before_load, self.runtime["device"]),
                       "cpu_mmap_threshold_bytes": mmap_threshold_in_effect()},
        }

    def after_fit(self, cfg: FinetuneConfig, model: nn.Module) -> None:
        """Every process, after training: a sharded adapter is gathered whole for saving."""
        if self.sharded(cfg):
            F.unshard_trainable(model)

    def save(self, cfg: FinetuneConfig, model: nn.Module, out: Path) -> None:
        """The adapter (PEFT layout) with the base's record and fingerprint; with new tokens,
        the extended tokenizer beside it."""
        save_adapter(model, out / "adapter", base_model_name_or_path=self.base.path,
                     extra=self.base.record, fingerprint=self.base.fingerprint, **self.original)
        if self.data.added_tokens is not None:
            save_tokenizer(self.data.tokenizer, out / "adapter")

    def manifest_fields(self) -> dict:
        """The base directory, process count and device."""
        return {"base": self.base.path, "world_size": self.runtime["dist"].world_size,
                "device": str(self.runtime["device"])}

    def plot_title(self, cfg: FinetuneConfig) -> str:
        """'lora r=8 on DIRNAME'."""
        return f"{cfg.method} r={cfg.rank} on {Path(self.base.path).name}"


def run_hf_finetune(cfg: FinetuneConfig, out_dir, resume: bool = False,
                    overwrite: bool = False, on_step=None, device: str | None = "auto",
                    on_start=None) -> dict:
    """Fine-tune ``cfg.model`` (hf:DIR) on ``cfg.train_data`` into the run folder ``out_dir``.

    ``on_start(info)`` gets the resolved settings and data counts before training (the CLI
    prints them); ``on_step(record)`` runs after each step on every process.
    """
    return pipeline.run_finetune(HFBackend(device), cfg, out_dir, resume=resume,
                                 overwrite=overwrite, on_step=on_step, on_start=on_start)
