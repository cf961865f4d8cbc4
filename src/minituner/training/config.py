"""The settings of every fine-tuning run, Mini-GPT or transformers, torch-free so the CLI can
build its parser (and check a --config file) without importing torch.

``model`` names the base: a Mini-GPT run folder, or ``hf:DIR`` for a transformers model. The two
kinds of model share one :class:`FinetuneConfig` but not every default (:data:`KIND_DEFAULTS`
keeps each kind's results as they were) nor every setting (:data:`KIND_REFUSES`: replay and KL
need the Mini-GPT base's pretraining corpus; sequence length, dtype and chat templates are
transformers matters).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from minituner.quant import DEFAULT_QUANT_SCHEME
from minituner.util.config import from_dict, typed_values

__all__ = ["ADAPTER_METHODS", "DEFAULT_STEPS", "HF_PREFIX", "INIT_NAMES", "KINDS",
           "KIND_DEFAULTS", "KIND_METHODS", "KIND_REFUSES", "LR_SCHEDULERS", "METHODS",
           "METHOD_REFUSES", "TRACKERS",
           "RUNTIME_FIELDS", "SETTING_NEEDS", "FinetuneConfig", "PretrainConfig", "base_method",
           "check_given_settings", "check_new_tokens", "check_ranges", "flag_name",
           "kind_defaults", "model_kind", "parse_init", "parse_layers", "uses_dora"]

# dora / qdora: DoRA (weight-decomposed LoRA, minituner.lora.dora) on a float / NF4 base.
METHODS = ("lora", "qlora", "full", "dora", "qdora")
ADAPTER_METHODS = {"lora": "lora", "qlora": "qlora", "dora": "lora", "qdora": "qlora"}
# --init: the A initialisations (B = 0) and the two that start from the weights and change the
# base (PiSSA: float bases; LoftQ: NF4 bases, "loftq:N" runs N alternations, default 1).
INIT_NAMES = ("gaussian", "gaussian_std", "kaiming", "pissa", "loftq")
DEFAULT_LOFTQ_ITERS = 1
HF_PREFIX = "hf:"
KINDS = ("minigpt", "hf")
KIND_NAMES = {"minigpt": "Mini-GPT", "hf": "transformers (hf:)"}
KIND_METHODS = {"minigpt": METHODS, "hf": ("lora", "qlora", "dora", "qdora")}

# Each kind's defaults where they differ from the dataclass's (which are Mini-GPT's).
KIND_DEFAULTS = {
    "minigpt": {"steps": 600, "lr": 1e-2, "batch_size": 32, "dropout": 0.2, "replay": 0.5,
                "kl": 3.0, "checkpoint_every": 50, "targets": None},
    "hf": {"steps": 100, "lr": 2e-4, "batch_size": 8, "dropout": 0.0, "replay": 0.0,
           "kl": 0.0, "checkpoint_every": 25, "targets": None},
}
DEFAULT_STEPS = KIND_DEFAULTS["minigpt"]["steps"]

# Settings a kind cannot use (refused when they differ from the kind's default), and why.
KIND_REFUSES = {
    "minigpt": {name: "it applies to transformers (hf:) models only" for name in (
        "val_fraction", "use_rslora", "max_len", "strict_len", "chat_template",
        "grad_checkpointing", "dtype", "allow_pickle", "exclude", "layers", "rank_pattern",
        "alpha_pattern", "modules_to_save", "packing", "add_tokens", "fsdp")},
    "hf": {"replay": "replay needs the base's pretraining corpus, which only a Mini-GPT base "
                     "run has",
           "kl": "the KL anchor acts on replay rows, which need a Mini-GPT base's corpus",
           "replay_nll": "it weighs replay rows, which need a Mini-GPT base's corpus",
           "allow_unk": "it applies to the Mini-GPT 64-token tokenizer only"},
}

# Settings a method cannot use: refused when given at all (a flag or a --config key), and why.
METHOD_REFUSES = {
    "full": {name: "full fine-tuning trains every weight and has no adapter" for name in (
        "rank", "alpha", "dropout", "targets", "use_rslora", "init", "loraplus_lr_ratio",
        "exclude", "layers", "rank_pattern", "alpha_pattern", "modules_to_save", "add_tokens")}
    | {"quant_scheme": "only --method qlora quantizes the base"},
    "lora": {"quant_scheme": "only --method qlora or qdora quantizes the base"},
    "qlora": {},
    "dora": {"quant_scheme": "only --method qlora or qdora quantizes the base; "
                             "use --method qdora for DoRA on an NF4 base"},
    "qdora": {},
}

# Settings that do nothing without another one, and why (refused when given without it).
SETTING_NEEDS = {
    "val_data": ("train_data", "the built-in set has its own validation split"),
    "val_fraction": ("train_data", "it splits --train-data/--data"),
}

# Settings recorded in config.json that a --resume may change (they do not decide results).
RUNTIME_FIELDS = ("threads", "allow_pickle", "verify_base", "report_to", "fsdp")
LR_SCHEDULERS = ("cosine", "linear", "constant")
TRACKERS = ("tensorboard", "wandb", "mlflow")


def base_method(method: str) -> str:
    """How the base is held: "lora" (float), "qlora" (NF4) or "full" (trained itself)."""
    return ADAPTER_METHODS.get(method, method)


def uses_dora(method: str) -> bool:
    """True for the DoRA methods (dora on a float base, qdora on an NF4 base)."""
    return method in ("dora", "qdora")


def check_given_settings(given: dict, method: str) -> None:
    """Refuse settings given explicitly (flags or a --config file) that ``method`` cannot use
    or that need a setting left out, naming the flag: a setting that does nothing is an error,
    never silently ignored."""
    for name, why in METHOD_REFUSES.get(method, {}).items():
        if given.get(name) is not None:
            raise ValueError(f"{flag_name(name)} cannot be used with --method {method} ({why})")
    if given.get("warmup") is not None and given.get("warmup_steps") is not None:
        raise ValueError("give --warmup-steps or --warmup-ratio (--warmup), not both")
    for name, (needed, why) in SETTING_NEEDS.items():
        if given.get(name) is not None and given.get(needed) is None:
            raise ValueError(f"{flag_name(name)} needs {flag_name(needed)} ({why})")


def parse_init(init: str | None) -> tuple:
    """(name, LoftQ iterations or None) of an --init value: 'pissa', 'loftq', 'loftq:5', an A
    initialisation ('gaussian', 'gaussian_std', 'kaiming') or None (the kind's default)."""
    if init is None:
        return None, None
    name, colon, count = str(init).partition(":")
    if name not in INIT_NAMES or (colon and name != "loftq"):
        raise ValueError(f"--init must be one of {list(INIT_NAMES)} or loftq:N, got {init!r}")
    if name != "loftq":
        return name, None
    if not colon:
        return name, DEFAULT_LOFTQ_ITERS
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"--init loftq:N needs N an int >= 1, got {init!r}")
    return name, int(count)


def parse_layers(text: str | None) -> list | None:
    """Layer indices of a --layers value: '0-11' (inclusive), '0,2,5' or a mix ('0-3,8');
    None stays None."""
    if text is None:
        return None
    indices: list = []
    for part in str(text).split(","):
        first, dash, last = part.strip().partition("-")
        last = last if dash else first
        if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
            raise ValueError(f"--layers must be layer indices like 0-11 or 0,2,5, got {text!r}")
        indices.extend(range(int(first), int(last) + 1))
    return sorted(set(indices))


def model_kind(model: str | None) -> str:
    """'hf' for an ``hf:DIR`` model, 'minigpt' for a Mini-GPT run folder (or none given)."""
    return "hf" if isinstance(model, str) and model.startswith(HF_PREFIX) else "minigpt"


def flag_name(field: str) -> str:
    """The CLI flag of a setting: 'batch_size' -> '--batch-size'."""
    return "--" + field.replace("_", "-")


# Settings only a --config file (or code) can give: an error names them as they are written there.
FILE_ONLY = {"grad_clip"}
PRETRAIN_FLAGS = ("steps", "batch_size", "lr", "seed")


def _finite(value) -> bool:
    return value is None or math.isfinite(value)


def check_ranges(values: object, checks: list, file_only=()) -> None:
    """Raise a one-line ValueError for the first failed (field, ok, what) of ``checks``,
    naming the flag (or, for a setting in ``file_only``, the config key) and the value."""
    for name, ok, what in checks:
        if not ok:
            shown = f"{name} (a --config setting)" if name in file_only else flag_name(name)
            raise ValueError(f"{shown} must be {what}, got {getattr(values, name)!r}")


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (the CLI flags, a --config file, or code).

    The field defaults are a Mini-GPT run's; :meth:`for_kind` starts from a kind's defaults.
    """

    model: str | None = None  # Mini-GPT base run folder, or hf:DIR
    train_data: str | None = None  # {"prompt", "completion"} JSONL (hf: also {"text"})
    val_data: str | None = None
    val_fraction: float | None = None  # hf: hold out this fraction of train_data
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-2
    warmup: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    replay: float = 0.5
    kl: float = 3.0
    replay_nll: float = 1.0  # weight of the next-token loss on replay rows (0: KL only)
    eval_every: int = 25
    checkpoint_every: int = 50
    seed: int = 0
    quant_scheme: str = DEFAULT_QUANT_SCHEME
    targets: list | None = None  # module-name suffixes; None = every Linear
    dropout: float = 0.2  # LoRA dropout on the adapter's input (LoRA/QLoRA only)
    use_rslora: bool = False
    max_len: int | None = None
    strict_len: bool = False
    chat_template: bool = False
    grad_checkpointing: bool = False
    dtype: str = "auto"
    threads: int = 1
    allow_unk: bool = False  # Mini-GPT: train on completions that are mostly <unk>
    allow_pickle: bool = False  # hf: read a base folder that holds only pickle weights
    verify_base: bool = True  # False: a --resume may go on over a base whose fingerprint changed
    init: str | None = None  # None: the kind's A init (Mini-GPT gaussian, hf kaiming)
    loraplus_lr_ratio: float | None = None  # LoRA+: B's lr / A's lr (None: plain LoRA, as 1)
    # The settings below default to None so a run folder written before they existed resumes.
    lr_scheduler: str | None = None  # cosine (None: cosine down to 10%), linear or constant
    warmup_steps: int | None = None  # warmup in steps instead of the fraction ``warmup``
    report_to: list | None = None  # trackers: tensorboard, wandb, mlflow (None: none)
    exclude: list | None = None  # module-name suffixes (or one regex) never adapted
    layers: str | None = None  # "0-11" or "0,2,5": PEFT's layers_to_transform
    rank_pattern: dict | None = None  # module-name regex -> rank (PEFT's rule)
    alpha_pattern: dict | None = None  # module-name regex -> alpha
    modules_to_save: list | None = None  # modules trained in full beside the adapters
    packing: bool | None = None  # hf: several examples per row, kept apart (None: off)
    add_tokens: list | None = None  # hf: new special tokens; their embedding rows train
    fsdp: bool | None = None  # hf under torchrun: shard the model with FSDP2 (None: DDP)

    @property
    def kind(self) -> str:
        """'minigpt' or 'hf', from :attr:`model`."""
        return model_kind(self.model)

    @classmethod
    def for_kind(cls, kind: str, **values) -> FinetuneConfig:
        """A config with ``kind``'s defaults, then ``values``."""
        return cls(**{**kind_defaults(kind), **values})

    def validate(self) -> FinetuneConfig:
        """Raise a one-line ValueError naming the first bad setting; returns self."""
        typed_values(FinetuneConfig, self.to_dict(), "finetune config")
        kind = self.kind
        self._check_kind(kind)
        if self.method not in KIND_METHODS[kind]:
            raise ValueError(f"--method must be one of {list(KIND_METHODS[kind])} for "
                             f"{KIND_NAMES[kind]} models, got {self.method!r}")
        checks = [
            ("rank", self.rank >= 0, "a non-negative int"),
            ("alpha", self.alpha > 0 and _finite(self.alpha), "a positive finite number"),
            ("batch_size", self.batch_size >= 1, "a positive int"),
            ("grad_accum", self.grad_accum >= 1, "a positive int"),
            ("lr", self.lr > 0 and _finite(self.lr), "a positive finite number"),
            ("warmup", 0 <= self.warmup < 1, "a fraction in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0 and _finite(self.weight_decay),
             "a non-negative finite number"),
            ("grad_clip", self.grad_clip >= 0 and _finite(self.grad_clip),
             "a non-negative finite number (0 = no clipping)"),
            ("seed", self.seed >= 0, "a non-negative int"),
            ("replay", 0 <= self.replay < 1, "a fraction in [0, 1)"),
            ("kl", self.kl >= 0 and _finite(self.kl), "a non-negative finite number"),
            ("dropout", 0 <= self.dropout < 1, "a fraction in [0, 1)"),
            ("replay_nll", self.replay_nll >= 0 and _finite(self.replay_nll),
             "a non-negative finite number"),
            ("eval_every", self.eval_every >= 1, "a positive int"),
            ("checkpoint_every", self.checkpoint_every >= 1, "a positive int"),
            ("threads", self.threads >= 1, "a positive int"),
            ("max_len", self.max_len is None or self.max_len >= 1, "a positive int"),
            ("val_fraction", self.val_fraction is None or 0 < self.val_fraction < 1,
             "a fraction in (0, 1)"),
            ("dtype", self.dtype in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
            ("lr_scheduler", self.lr_scheduler is None or self.lr_scheduler in LR_SCHEDULERS,
             "one of " + ", ".join(LR_SCHEDULERS)),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0,
             "a non-negative int"),
            ("report_to", all(t in TRACKERS for t in self.report_to or ()),
             "a list of " + ", ".join(TRACKERS)),
            ("loraplus_lr_ratio", self.loraplus_lr_ratio is None
             or (self.loraplus_lr_ratio > 0 and _finite(self.loraplus_lr_ratio)),
             "a positive finite number"),
        ]
        check_ranges(self, checks, FILE_ONLY)
        self._check_init(kind)
        check_new_tokens(self.add_tokens)
        parse_layers(self.layers)
        if kind == "hf" and self.rank < 1:
            raise ValueError(f"--rank must be a positive int for {KIND_NAMES[kind]} models, "
                             f"got {self.rank}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be a positive int, got {self.steps}")
        if self.epochs is not None and not (self.epochs > 0 and _finite(self.epochs)):
            raise ValueError(f"--epochs must be a positive finite number, got {self.epochs}")
        if self.val_data and self.val_fraction:
            raise ValueError("give --val-data or --val-fraction, not both")
        self._check_replay()
        return self

    def _check_init(self, kind: str) -> None:
        """Refuse an --init the method or the model kind cannot start from, saying why."""
        name, _ = parse_init(self.init)
        if name in ("pissa", "loftq") and uses_dora(self.method):
            raise ValueError(f"--init {name} cannot be used with --method {self.method} (DoRA's "
                             "magnitude starts from the base's row norms; minituner does not "
                             "combine it with an init that changes the base)")
        if name == "pissa" and self.method == "qlora":
            raise ValueError("--init pissa cannot be used with --method qlora (PiSSA splits a "
                             "float weight; minituner does not requantize the residual): use "
                             "--init loftq")
        if name == "loftq" and self.method != "qlora":
            raise ValueError(f"--init loftq needs --method qlora (it chooses the NF4 base), got "
                             f"--method {self.method}")
        if name == "loftq" and kind == "hf":
            raise ValueError("--init loftq cannot be used with transformers (hf:) models (their "
                             "QLoRA base is quantized while loading; LoftQ needs the float "
                             "weights): Mini-GPT or the Python API (minituner.quant.loftq)")

    def _check_kind(self, kind: str) -> None:
        """Refuse a setting this kind of model cannot use, naming the flag and the kind."""
        defaults = kind_defaults(kind)
        for name, why in KIND_REFUSES[kind].items():
            if getattr(self, name) != defaults.get(name, FIELD_DEFAULTS[name]):
                raise ValueError(f"{flag_name(name)} cannot be used with {KIND_NAMES[kind]} "
                                 f"models ({why})")

    def _check_replay(self) -> None:
        rows = self.replay_rows
        if self.batch_size - rows < 1:
            raise ValueError(f"--batch-size {self.batch_size} with --replay {self.replay:g} leaves "
                             f"no fine-tuning rows ({rows} of {self.batch_size} rows per batch "
                             "are replay rows): raise --batch-size or lower --replay")
        if self.kl > 0 and self.replay == 0:
            raise ValueError("--kl needs replay rows to act on: set --replay > 0 or --kl 0")
        if self.kl > 0 and rows < 1:
            raise ValueError(f"--kl needs replay rows to act on, but --batch-size "
                             f"{self.batch_size} with --replay {self.replay:g} gives 0 replay rows "
                             "per batch: raise --batch-size or --replay, or set --kl 0")

    @property
    def replay_rows(self) -> int:
        """Rows of each micro-batch drawn from the base corpus."""
        return int(round(self.batch_size * self.replay))

    def to_dict(self) -> dict:
        """Plain dict, for config.json."""
        return asdict(self)

    def resume_identity(self) -> dict:
        """The settings a --resume must keep (every one but :data:`RUNTIME_FIELDS`)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, values: dict, source: str = "finetune config") -> FinetuneConfig:
        """Build from a dict, rejecting unknown keys and wrongly typed values by name
        (``source`` starts the error message, e.g. "config file ft.yaml")."""
        return from_dict(cls, values, source)

    def replace(self, **values) -> FinetuneConfig:
        """A copy with ``values`` changed."""
        return replace(self, **values)


FIELD_DEFAULTS = {f.name: f.default for f in fields(FinetuneConfig)}


def check_new_tokens(tokens: list | None) -> None:
    """Refuse an --add-tokens entry that is empty, blank or given twice, naming it."""
    seen = set()
    for token in tokens or ():
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"--add-tokens: a token must be a non-empty string, got {token!r}")
        if token in seen:
            raise ValueError(f"--add-tokens: token {token!r} is given twice")
        seen.add(token)


def kind_defaults(kind: str) -> dict:
    """Every setting's default for ``kind`` ('minigpt' or 'hf')."""
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {list(KINDS)}, got {kind!r}")
    return {**FIELD_DEFAULTS, **KIND_DEFAULTS[kind]}


@dataclass
class PretrainConfig:
    """Hyper-parameters of base pretraining."""

    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 200
    seed: int = 0

    def validate(self) -> PretrainConfig:
        """Raise a one-line ValueError naming the first bad setting (the same checks as the
        flags, for a --config file and code too); returns self."""
        typed_values(PretrainConfig, self.to_dict(), "pretrain config")
        check_ranges(self, [
            ("steps", self.steps >= 1, "a positive int"),
            ("batch_size", self.batch_size >= 1, "a positive int"),
            ("lr", self.lr > 0 and _finite(self.lr), "a positive finite number"),
            ("warmup_steps", self.warmup_steps >= 0, "a non-negative int"),
            ("weight_decay", self.weight_decay >= 0 and _finite(self.weight_decay),
             "a non-negative finite number"),
            ("grad_clip", self.grad_clip >= 0 and _finite(self.grad_clip),
             "a non-negative finite number (0 = no clipping)"),
            ("eval_every", self.eval_every >= 1, "a positive int"),
            ("seed", self.seed >= 0, "a non-negative int"),
        ], file_only=[f.name for f in fields(PretrainConfig) if f.name not in PRETRAIN_FLAGS])
        return self

    def to_dict(self) -> dict:
        """Plain dict, for config.json."""
        return asdict(self)
