"""The settings of a Mini-GPT fine-tuning run, torch-free so the CLI can build its parser (and
check a --config file) without importing torch. :mod:`minituner.course.finetune` re-exports them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["DEFAULT_STEPS", "METHODS", "FinetuneConfig", "check_types"]

METHODS = ("lora", "qlora", "full")
DEFAULT_STEPS = 600

_TYPES = {"int": int, "float": float, "str": str, "list": list}
_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list"}


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (the CLI flags, a --config file, or code)."""

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
    quant_scheme: str = "nf4_per_group_64"
    targets: list | None = None  # module-name suffixes; None = all 12 Linears
    dropout: float = 0.2  # LoRA dropout on the adapter's input (LoRA/QLoRA only)
    train_data: str | None = None
    val_data: str | None = None

    def validate(self) -> FinetuneConfig:
        """Raise a one-line ValueError naming the first bad setting; returns self."""
        check_types(self.to_dict(), "finetune config")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {list(METHODS)}, got {self.method!r}")
        checks = [
            ("rank", self.rank >= 0, "a non-negative int"),
            ("alpha", self.alpha > 0, "positive"),
            ("batch_size", self.batch_size >= 1, "a positive int"),
            ("grad_accum", self.grad_accum >= 1, "a positive int"),
            ("lr", self.lr > 0, "positive"),
            ("warmup", 0 <= self.warmup < 1, "a fraction in [0, 1)"),
            ("replay", 0 <= self.replay < 1, "a fraction in [0, 1)"),
            ("kl", self.kl >= 0, "non-negative"),
            ("dropout", 0 <= self.dropout < 1, "a fraction in [0, 1)"),
            ("replay_nll", self.replay_nll >= 0, "non-negative"),
            ("eval_every", self.eval_every >= 1, "a positive int"),
            ("checkpoint_every", self.checkpoint_every >= 1, "a positive int"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, "
                                 f"got {getattr(self, name)!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be a positive int, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
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
        return self

    @property
    def replay_rows(self) -> int:
        """Rows of each micro-batch drawn from the base corpus."""
        return int(round(self.batch_size * self.replay))

    def to_dict(self) -> dict:
        """Plain dict, for config.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "finetune config") -> FinetuneConfig:
        """Build from a dict, rejecting unknown keys and wrongly typed values by name
        (``source`` starts the error message, e.g. "config file ft.yaml")."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}")
        check_types(values, source)
        return cls(**values)


def _allowed(annotation: str) -> tuple:
    """'int | None' -> (int, None)."""
    return tuple(None if part == "None" else _TYPES[part]
                 for part in (p.strip() for p in annotation.split("|")))


FIELD_TYPES = {f.name: _allowed(f.type) for f in fields(FinetuneConfig)}


def check_types(values: dict, source: str = "finetune config") -> None:
    """Raise a one-line ValueError for the first value whose type its field does not take: int,
    float (an int is accepted), str, list of str, or None where the field allows it; a bool is
    not a number."""
    for name, value in values.items():
        allowed = FIELD_TYPES.get(name)
        if allowed is None or (value is None and None in allowed):
            continue
        kind = next(t for t in allowed if t is not None)
        if kind in (int, float) and not isinstance(value, bool):
            ok = isinstance(value, int) or (kind is float and isinstance(value, float))
        else:
            ok = isinstance(value, kind) and not isinstance(value, bool)
        if ok and kind is list:
            ok = all(isinstance(item, str) for item in value)
        if not ok:
            what = _NAMES[kind] + (" of strings" if kind is list else "")
            what += " or null" if None in allowed else ""
            hint = ""
            if kind in (int, float) and isinstance(value, str) and _number(value):
                hint = " (a number written as text: unquote it; YAML reads 1e-3 as text, 1.0e-3 " \
                       "as a number)"
            raise ValueError(f"{source}: {name!r} must be {what}, got {value!r}{hint}")


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
