"""Fine-tuning a Mini-GPT base with LoRA, QLoRA or full fine-tuning: the Mini-GPT backend of
:func:`minituner.training.pipeline.run_finetune`.

Against forgetting, two explicit options (both on by default, both documented in the report's
ablation): ``replay`` is the fraction of each batch's rows drawn from the base's pretraining
lines (trained with the ordinary next-token loss), and ``kl`` weighs a per-token
KL(base || tuned) on those replay rows, the frozen reference being the same model with its
adapters disabled (LoRA, QLoRA) or a frozen copy of the base (full fine-tuning). ``replay 0``
and ``kl 0`` give plain fine-tuning on the irregular examples alone.

A run folder holds config.json, manifest.json, results.json, train_log.jsonl, loss.png,
data/ (the exact examples), checkpoints/, and adapter/ (PEFT layout) for LoRA and QLoRA; a full
fine-tuning run holds model.safetensors + tokenizer.json instead of adapter/ (a model run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from minituner.course import corpus, data
from minituner.course.evaluate import (
    SLICE_GROUPS,
    builtin_path,
    control_perplexity,
    evaluate_model,
    load_builtin_probes,
)
from minituner.course.objectives import make_loss_fn, token_kl
from minituner.course.probesets import irregular_probes
from minituner.course.qlora_eval import qlora_comparison
from minituner.course.slices import form_choice_probes
from minituner.lora import disable_adapters, lora_state_dict, wrap_minigpt_with_lora
from minituner.lora.adapters import base_fingerprint, base_tensor_stats, save_adapter
from minituner.lora.init import BASE_CHANGING_INITS
from minituner.quant.loftq import wrap_minigpt_loftq
from minituner.quant.qlora import wrap_minigpt_qlora
from minituner.training import distributed as D
from minituner.training import pipeline
from minituner.training.accounting import training_state_bytes
from minituner.training.config import (
    DEFAULT_STEPS,
    METHODS,
    FinetuneConfig,
    base_method,
    parse_init,
    uses_dora,
)
from minituner.training.evaluation import make_validator
from minituner.training.loop import total_steps
from minituner.training.runs import load_base_run, save_model
from minituner.util.files import sha256_json
from minituner.util.jsonl import read_jsonl

__all__ = ["DEFAULT_STEPS", "METHODS", "FinetuneConfig", "FinetuneData", "MiniGPTBackend",
           "ProgressSink", "build_trainable", "control_records", "load_base", "make_loss_fn",
           "prepare_data", "run_finetune", "run_with_progress", "token_kl",
           "total_steps"]

PEAK_RSS_NOTE = ("peak resident memory of the whole process so far (ru_maxrss): Python, torch "
                 "and every import included, and every earlier run in the same process")

load_base = load_base_run  # (model, tokenizer, config) of a base run folder


@dataclass
class FinetuneData:
    """Examples and encoded sequences of one run."""

    sft: dict
    train: list
    validation: list
    replay: list
    control: list
    control_texts: list
    unk: data.UnkReport  # what of the user's examples maps to <unk> (empty for the built-in set)


def control_records(base_dir) -> list:
    """The control set: regular-verb lines of the base's held-out pretraining test split (the
    built-in set when the base has no corpus; both agree for a seed-0 base)."""
    test_file = Path(base_dir) / "corpus" / "test.jsonl"
    if test_file.is_file():
        return data.build_control_set(read_jsonl(test_file))
    return read_jsonl(builtin_path("control_set"))


def frame_probes(base_dir, frames: dict) -> list:
    """Probes of a frame split's test frames (over-regularised and form choice) and the
    regular-verb control probes: what a cross-validation fold is scored on."""
    records = read_jsonl(Path(base_dir) / "corpus" / "irregular.jsonl")
    probes = [probe for tense in data.BLANK_TENSES
              for probe in irregular_probes(records, tense, frames=frames["test"])]
    probes += form_choice_probes(records, frames=frames["test"])
    return probes + load_builtin_probes(("regular_control",))


def prepare_data(base_dir: Path, tokenizer, cfg: FinetuneConfig,
                 frames: dict | None = None) -> FinetuneData:
    """SFT splits (built-in or the user's files; ``frames`` re-splits the built-in set by
    frame), replay lines and the control set."""
    corpus_dir = Path(base_dir) / "corpus"
    unk = data.UnkReport()
    if cfg.train_data:
        records = data.load_user_examples(cfg.train_data)
        validation = data.load_user_examples(cfg.val_data) if cfg.val_data else []
        unk = data.count_unk(records + validation, tokenizer)
        data.refuse_mostly_unk(unk, cfg.allow_unk)
        sft = data.split_user_examples(records, cfg.seed)
        if cfg.val_data:
            sft["train"] += sft["validation"] + sft["test"]
            sft["validation"], sft["test"] = validation, []
    else:
        if not (corpus_dir / "irregular.jsonl").is_file():
            raise ValueError(f"{base_dir}: has no corpus/irregular.jsonl; pass --train-data")
        sft = data.build_sft_set(read_jsonl(corpus_dir / "irregular.jsonl"), tokenizer,
                                 frames=frames)
    if not sft["validation"]:
        raise ValueError("the validation split is empty: give more examples or --val-data")
    replay: list = []
    if cfg.replay > 0:
        if not (corpus_dir / "train.jsonl").is_file():
            raise ValueError(f"{base_dir}: has no corpus/train.jsonl for --replay; use --replay 0")
        texts = corpus.pretraining_texts(read_jsonl(corpus_dir / "train.jsonl"))
        replay = [data.text_sequence(tokenizer, t) for t in texts]
    control = control_records(base_dir)
    return FinetuneData(
        sft=sft,
        train=data.sequences_of(sft["train"], tokenizer, "training"),
        validation=data.sequences_of(sft["validation"], tokenizer, "validation"),
        replay=replay, control=control, control_texts=data.control_texts(control), unk=unk,
    )


def build_trainable(model, cfg: FinetuneConfig) -> tuple:
    """Wrap or unfreeze ``model`` for the method; returns (model, reference logits function).

    The reference is the model as it starts: the base with its adapters disabled, or, after a
    base-changing init (PiSSA, LoftQ: disabling the adapters would leave the residual), a frozen
    copy of the model at step 0.
    """
    if cfg.method == "full":
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
        return model, frozen
    init, iters = parse_init(cfg.init)
    chosen = {} if init is None else {"init": init}
    dora = uses_dora(cfg.method)  # dora / qdora: DoRA layers on a float / NF4 base
    if base_method(cfg.method) == "lora":
        model = wrap_minigpt_with_lora(model, r=cfg.rank, alpha=cfg.alpha, seed=cfg.seed,
                                       use_dora=dora, **_targets(cfg), **chosen)
    elif init == "loftq":
        torch.manual_seed(cfg.seed)
        wrap_minigpt_loftq(model, r=cfg.rank, alpha=cfg.alpha, iters=iters,
                           quant_scheme=cfg.quant_scheme)
    else:
        torch.manual_seed(cfg.seed)
        model = wrap_minigpt_qlora(model, r=cfg.rank, alpha=cfg.alpha,
                                   quant_scheme=cfg.quant_scheme, use_dora=dora, **chosen)
    if init in BASE_CHANGING_INITS:
        return model, copy.deepcopy(model).eval().requires_grad_(False)

    def reference(input_ids):
        with disable_adapters(model):
            return model(input_ids)

    return model, reference


def _targets(cfg: FinetuneConfig) -> dict:
    chosen = {} if cfg.targets is None else {"target_modules": list(cfg.targets)}
    return {**chosen, "dropout": cfg.dropout} if cfg.dropout else chosen


def ppl_by_tense(model, tokenizer, control: list) -> dict:
    """Control perplexity of each tense's lines (records without a "tense" are skipped)."""
    groups: dict = {}
    for record in control:
        if isinstance(record.get("tense"), str):
            groups.setdefault(record["tense"], []).append(record)
    return {tense: control_perplexity(model, tokenizer, data.control_texts(records))
            for tense, records in sorted(groups.items())}


class MiniGPTBackend:
    """The Mini-GPT side of a fine-tuning run: the verb SFT data, replay and KL, probe
    evaluation before and after, and the adapter (or, for full fine-tuning, model) saved."""

    run_kind = "finetune"

    def __init__(self, base_dir: str | Path, frames: dict | None = None):
        self.base_dir = Path(base_dir)
        self.frames = frames  # a cross-validation fold's frame split (None: the fixed one)
        self.model = self.tokenizer = self.data = self.reference = None
        self.probes, self.before = None, None
        self.original: dict = {}  # base-changing inits: the original base's record, A0 and B0

    def setup(self, cfg: FinetuneConfig) -> D.DistInfo:
        """One process on the CPU."""
        return D.DistInfo()

    def prepare(self, cfg: FinetuneConfig) -> pipeline.Prepared:
        """Load the base run and the SFT, replay and control data."""
        self.model, self.tokenizer, _ = load_base_run(self.base_dir)
        if self.frames is not None and cfg.train_data:
            raise ValueError("a frame cross-validation fold uses the built-in examples; "
                             "drop --train-data")
        self.data = prepared = prepare_data(self.base_dir, self.tokenizer, cfg, self.frames)
        identity = {
            "model": self.model.config.to_dict(),
            "base": {"path": str(self.base_dir.resolve()),
                     "fingerprint": base_fingerprint(self.model)},
            "data_sha256": sha256_json({"sft": prepared.sft, "control": prepared.control,
                                        "replay": len(prepared.replay)}),
        }
        files = {f"sft_{split}": records for split, records in prepared.sft.items()}
        return pipeline.Prepared(prepared.train, prepared.validation, self.tokenizer.pad_id,
                                 identity, replay=prepared.replay,
                                 files={**files, "control": prepared.control})

    def _evaluate(self, model) -> dict:
        scores = evaluate_model(model, self.tokenizer, self.probes, self.data.control_texts)
        scores["control_ppl_by_tense"] = ppl_by_tense(model, self.tokenizer, self.data.control)
        return scores

    def evaluate_before(self, cfg: FinetuneConfig) -> None:
        """Probe accuracies and control perplexity of the base."""
        self.probes = (load_builtin_probes() if self.frames is None
                       else frame_probes(self.base_dir, self.frames))
        self.before = self._evaluate(self.model)

    def build_trainable(self, cfg: FinetuneConfig):
        """LoRA/QLoRA-wrapped or unfrozen base, and the frozen reference of the KL term
        (a base-changing init also keeps what saving its converted adapter needs)."""
        if parse_init(cfg.init)[0] in BASE_CHANGING_INITS:
            self.original = {"fingerprint": base_fingerprint(self.model),
                             "tensor_stats": base_tensor_stats(self.model)}
        self.model, self.reference = build_trainable(self.model, cfg)
        if self.original:
            self.original["initial"] = lora_state_dict(self.model)
        return self.model

    def loss_fn(self, cfg: FinetuneConfig, model):
        """Completion NLL, plus replay NLL and KL to the reference on replay rows."""
        return make_loss_fn(self.reference, cfg.kl, cfg.replay_nll)

    def validator(self, cfg: FinetuneConfig, prepared: pipeline.Prepared):
        """Completion NLL of the SFT validation split."""
        return make_validator(prepared.validation, prepared.pad_id, batch_size=128)

    def start_info(self) -> dict:
        """The <unk> counts of the user's examples (the CLI warns about them)."""
        return {"unk": self.data.unk.to_dict()}

    def on_step(self, model, record: dict) -> None:
        """No per-step check."""

    def results(self, cfg: FinetuneConfig, run: pipeline.TrainedRun) -> dict:
        """Accuracies and control perplexity before and after, tensor bytes, QLoRA extras."""
        after = self._evaluate(run.model)
        tensor_bytes = training_state_bytes(run.model, run.optimizer, run.loss_fn,
                                            run.batches(0))
        if cfg.method == "full" and cfg.kl > 0:  # the frozen copy the KL term compares against
            tensor_bytes["kl_reference_bytes"] = sum(
                t.numel() * t.element_size() for t in self.reference.state_dict().values())
            tensor_bytes["total_bytes"] += tensor_bytes["kl_reference_bytes"]
        results = _results(cfg, self.before, after, run.fit, run.steps, run.batches, run.model,
                           tensor_bytes)
        results["unk"] = self.data.unk.to_dict()
        if self.frames is not None:
            results["frames"] = self.frames
        if base_method(cfg.method) == "qlora":
            results["qlora"] = qlora_comparison(self.base_dir, run.model, cfg, self.data,
                                                run.loss_fn, run.batches, self.tokenizer,
                                                initial=self.original.get("initial"))
        return results

    def save(self, cfg: FinetuneConfig, model, out: Path) -> None:
        """The adapter (PEFT layout), or the whole model for full fine-tuning."""
        if cfg.method == "full":
            save_model(out, model, self.tokenizer)
        else:
            save_adapter(model, out / "adapter",
                         base_model_name_or_path=str(self.base_dir.resolve()), **self.original)

    def manifest_fields(self) -> dict:
        """The base run folder."""
        return {"base": str(self.base_dir.resolve())}

    def plot_title(self, cfg: FinetuneConfig) -> str:
        """'lora r=8 fine-tuning' or 'full fine-tuning'."""
        return (f"{cfg.method} r={cfg.rank} fine-tuning" if cfg.method != "full"
                else "full fine-tuning")


def run_finetune(base_dir, out_dir, cfg: FinetuneConfig, resume: bool = False,
                 overwrite: bool = False, on_step=None, on_start=None,
                 writer_enabled: bool = True, frames: dict | None = None) -> dict:
    """Fine-tune the base in ``base_dir`` (``cfg.model`` when None) into the run folder
    ``out_dir``; returns results. ``on_start(info)`` and ``on_step(record)`` are progress
    callbacks (the library never prints); ``frames`` is a cross-validation fold's frame split
    (:func:`minituner.course.data.fold_frames`)."""
    base = base_dir if base_dir is not None else cfg.model
    if base is None:
        raise ValueError("--base: give the Mini-GPT base run folder")
    return pipeline.run_finetune(MiniGPTBackend(base, frames), cfg, out_dir, resume=resume,
                                 overwrite=overwrite, on_step=on_step, on_start=on_start,
                                 writer_enabled=writer_enabled)


class ProgressSink(Protocol):
    """What :func:`run_with_progress` reports to (the CLI's tqdm ``Progress``)."""

    def start(self, total: int) -> None: ...

    def on_step(self, record: dict) -> None: ...

    def close(self) -> None: ...


def run_with_progress(base_dir: str | Path, out_dir: str | Path, cfg: FinetuneConfig,
                      progress: ProgressSink | None = None, *, resume: bool = False,
                      overwrite: bool = False, frames: dict | None = None) -> dict:
    """:func:`run_finetune` reporting to ``progress`` (closed when the run ends or fails)."""
    callbacks = {} if frames is None else {"frames": frames}
    if progress is not None:
        callbacks |= {"on_start": lambda info: progress.start(info["steps"]),
                      "on_step": progress.on_step}
    try:
        return run_finetune(base_dir, out_dir, cfg, resume=resume, overwrite=overwrite,
                            **callbacks)
    finally:
        if progress is not None:
            progress.close()


def _results(cfg, before: dict, after: dict, result, steps: int, batches, model,
             tensor_bytes: dict) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows_per_step = (cfg.batch_size - cfg.replay_rows) * cfg.grad_accum
    return {
        "method": cfg.method, "rank": cfg.rank if cfg.method != "full" else None,
        "alpha": cfg.alpha, "lr": cfg.lr, "replay": cfg.replay, "kl": cfg.kl, "seed": cfg.seed,
        "steps": steps, "epochs_seen": steps * rows_per_step / len(batches.sft),
        "best_step": result.best_step, "best_val_loss": result.best_metrics.get("val_loss"),
        "resumed_from_step": result.resumed_from,
        "irregular_accuracy_base": before["irregular_accuracy"],
        "irregular_accuracy_tuned": after["irregular_accuracy"],
        "regular_accuracy_base": before["regular_accuracy"],
        "regular_accuracy_tuned": after["regular_accuracy"],
        "control_ppl_base": before["control_ppl"],
        "control_ppl_tuned": after["control_ppl"],
        "control_ppl_change": after["control_ppl"] / before["control_ppl"] - 1.0,
        "control_ppl_by_tense_base": before["control_ppl_by_tense"],
        "control_ppl_by_tense_tuned": after["control_ppl_by_tense"],
        "slices_base": before["slices"], "slices_tuned": after["slices"],
        **{f"{name}_accuracy_{when}": scores["groups"].get(name)
           for name in SLICE_GROUPS for when, scores in (("base", before), ("tuned", after))},
        "trainable_params": trainable,
        "tensor_bytes": tensor_bytes,
        "peak_rss_note": PEAK_RSS_NOTE,
        "accuracy_note": ("fractions in [0, 1]; irregular = irregular-past + "
                          "irregular-participle probes on the held-out test frames"),
    }
