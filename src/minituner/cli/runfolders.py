"""What ``--model`` names, and loading it for ``eval``, ``generate`` and ``merge``.

``--model`` is a transformers model directory (``hf:DIR``) or a run folder. A run folder's
config.json says which kind of model it holds; :func:`read_run_folder` is the one place that
reads it, and the commands dispatch on its answer: a Mini-GPT run goes to
:mod:`minituner.course.loading`, a transformers run (its recorded base plus its adapter) to
:mod:`minituner.hf.inference`. This choice lives in the CLI because the ``course`` and ``hf``
packages never import each other.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from minituner.cli.common import nonneg_int
from minituner.util.files import read_json

HF_PREFIX = "hf:"
MINIGPT, TRANSFORMERS = "Mini-GPT", "transformers"
RUN_FORMAT = 1  # the newest run-folder format this minituner reads (absent = 1)
RUN_KINDS = {"pretrain": MINIGPT, "finetune": MINIGPT, "merged": MINIGPT,
             "finetune-hf": TRANSFORMERS}
# flags a Mini-GPT model has no use for (unset ones are None)
TRANSFORMERS_ONLY_FLAGS = ("device", "allow_pickle", "chat", "system", "top_p",
                           "repetition_penalty", "stop", "data", "exact_match")
ADAPTER_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)=(?P<dir>.+)$")


@dataclass(frozen=True)
class RunFolder:
    """A run folder, the model kind it holds (MINIGPT or TRANSFORMERS) and its config.json."""

    path: Path
    model_kind: str
    kind: str
    config: dict


def read_run_folder(path: str | Path) -> RunFolder:
    """Read a run folder's config.json and say which kind of model it holds.

    An unknown ``kind`` or a ``format`` newer than :data:`RUN_FORMAT` is a one-line ValueError
    naming the file and the field.
    """
    run = Path(path)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run folder not found")
    file = run / "config.json"
    if not file.is_file():
        raise ValueError(f"{run}: not a run folder (no config.json)")
    config = read_json(file, "run config")
    if not isinstance(config, dict):
        raise ValueError(f"{file}: must hold a JSON object")
    version = config.get("format", RUN_FORMAT)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= RUN_FORMAT:
        raise ValueError(f"{file}: field 'format' is {version!r}; this minituner reads run "
                         f"folders of format 1 to {RUN_FORMAT} (a newer minituner wrote it?)")
    kind = config.get("kind")
    if kind not in RUN_KINDS:
        raise ValueError(f"{file}: field 'kind' is {kind!r}, not a run this minituner knows "
                         f"({', '.join(RUN_KINDS)})")
    return RunFolder(run, RUN_KINDS[kind], kind, config)


def is_hf_spec(spec) -> bool:
    """True for ``--model hf:DIR``."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def model_kind(spec) -> str:
    """MINIGPT or TRANSFORMERS for a ``--model`` value (hf:DIR or a run folder)."""
    return TRANSFORMERS if is_hf_spec(spec) else read_run_folder(spec).model_kind


def check_flags(args, kind: str) -> None:
    """Refuse, in one line, a flag the model kind cannot use (flags left unset are None)."""
    if kind != MINIGPT:
        return
    for name in TRANSFORMERS_ONLY_FLAGS:
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag}: not used by a {MINIGPT} model ({args.model} holds one; "
                             "it runs on the CPU); the flag is for transformers models")


def verify_base(args) -> bool:
    """False when --no-verify-base was given: an adapter's base fingerprint is then only
    warned about, not enforced."""
    return not getattr(args, "no_verify_base", False)


def device_of(args) -> str:
    """The --device a transformers model is loaded on (cpu when not given)."""
    return getattr(args, "device", None) or "cpu"


@contextmanager
def one_line_warnings():
    """Inside the block a UserWarning (e.g. an adapter whose base could not be checked) is
    printed as one stderr line, not Python's two-line file:line form."""
    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=UserWarning, module="minituner")
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, UserWarning):
                return original(message, category, filename, lineno, file, line)
            text = str(message).strip().splitlines()
            print(f"minituner: warning: {text[0] if text else category.__name__}",
                  file=sys.stderr)

        warnings.showwarning = show
        yield


def adapter_choice(args):
    """What --adapter names: None, one folder (a plain ``DIR``), or a dict of name -> folder
    (``NAME=DIR``, each name once; given more than once, every adapter needs its name)."""
    values = getattr(args, "adapter", None) or []
    if isinstance(values, str):
        values = [values]
    named = [ADAPTER_NAME.match(v) if not Path(v).is_dir() else None for v in values]
    if len(values) == 1 and named[0] is None:
        return values[0]
    adapters: dict = {}
    for value, match in zip(values, named, strict=True):
        if match is None:
            raise ValueError(f"--adapter {value}: name every adapter (NAME=DIR) when giving "
                             "several")
        if match["name"] in adapters:
            raise ValueError(f"--adapter: adapter {match['name']!r} is given twice "
                             "(duplicate name)")
        adapters[match["name"]] = match["dir"]
    return adapters or None


def load_for_inference(args) -> tuple:
    """(model, tokenizer, model kind) of --model (and --adapter) for eval and generate."""
    with one_line_warnings():
        return _load_for_inference(args)


def _load_for_inference(args) -> tuple:
    kind = model_kind(args.model)
    check_flags(args, kind)
    adapter = adapter_choice(args)
    if kind == MINIGPT:
        from minituner.course.loading import load_run

        model, tokenizer, _ = load_run(args.model, adapter, verify_base=verify_base(args))
        return model, tokenizer, kind
    from minituner.hf.inference import inference_views, run_inference_views
    from minituner.hf.models import resolve_device

    device, allow_pickle = resolve_device(device_of(args)), bool(args.allow_pickle)
    options = {"allow_pickle": allow_pickle, "verify_base": verify_base(args)}
    if is_hf_spec(args.model):
        model, tokenizer = inference_views(args.model, adapter, device, **options)
    else:
        model, tokenizer = run_inference_views(args.model, adapter, device, **options)
    return model, tokenizer, kind


def chat_template_for(args, hf_tokenizer):
    """The chat template prompts are rendered with: the one a transformers run recorded in its
    config.json (the template it trained with), else the model's tokenizer's own; a
    :class:`minituner.hf.chat.ChatTemplate` plus the recorded end-of-turn token (or None)."""
    from minituner.hf.chat import end_of_turn, template_from_record, tokenizer_template

    if not is_hf_spec(args.model):
        run = read_run_folder(args.model)
        record = run.config.get("chat_template")
        if record is not None:
            template = template_from_record(record, str(run.path / "config.json"))
            return template, record.get("end_of_turn")
    template = tokenizer_template(hf_tokenizer, args.model)
    return template, end_of_turn(hf_tokenizer, template)


def _add(parser: argparse.ArgumentParser, *flags, **kwargs) -> None:
    """Add a flag unless the parser already has it (the command's own flag wins)."""
    try:
        parser.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def add_hf_inference_flags(parser: argparse.ArgumentParser) -> None:
    """--adapter, --device, --allow-pickle and --seed of ``eval`` / ``generate``."""
    _add(parser, "--adapter", metavar="[NAME=]DIR", action="append",
         help="adapter to apply (instead of a run's own); give NAME=DIR more than once to load "
              "several named adapters on the one base")
    _add(parser, "--device", default=None,
         help="transformers models: auto, cpu (default) or cuda[:N]")
    _add(parser, "--allow-pickle", action="store_true", default=None,
         help="transformers models: read pytorch_model.bin weights (unpickling can run code)")
    _add(parser, "--no-verify-base", action="store_true",
         help="attach the adapter even if its base fingerprint does not match (warns)")
    _add(parser, "--seed", type=nonneg_int, default=0)


def add_hf_merge_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of ``merge`` for transformers models (hf:DIR or a transformers run folder)."""
    _add(parser, "--model", metavar="hf:DIR", help="transformers base (default: the adapter's)")
    _add(parser, "--adapter", metavar="DIR", help="adapter directory (PEFT layout)")
    _add(parser, "--out", metavar="DIR", help="output transformers directory")
    _add(parser, "--target", choices=("dequantized", "requantized"), default=None,
         help="dequantized: float weights (default); requantized: NF4, bitsandbytes layout")
    _add(parser, "--overwrite", action="store_true")
    _add(parser, "--device", default=None,
         help="transformers models: cpu (default), cuda or cuda:N")
    _add(parser, "--no-verify-base", action="store_true",
         help="merge even if the adapter's base fingerprint does not match (warns)")
    _add(parser, "--allow-pickle", action="store_true", default=None,
         help="transformers models: read pytorch_model.bin weights (unpickling can run code)")


def run_hf_merge_command(args, model_spec: str | None, adapter) -> int:
    """Merge ``adapter`` into its transformers base and print the report's numbers."""
    from minituner.hf.merge import merge_hf_adapter
    from minituner.hf.models import resolve_device

    if not adapter or not args.out:
        raise ValueError("merge of a transformers model needs --adapter DIR (or a transformers "
                         "run folder) and --out DIR")
    report = merge_hf_adapter(model_spec, adapter, args.out, target=args.target,
                              device=resolve_device(device_of(args)),
                              overwrite=args.overwrite, strict=verify_base(args),
                              allow_pickle=bool(args.allow_pickle))
    memory, reloaded = report["merged_in_memory"], report["reloaded_from_directory"]
    print(f"merged {report['n_layers']} layers ({report['target']}) -> {args.out}; max |logit "
          f"diff| vs the unmerged adapter: {memory['max_abs_diff']:.3g} in memory, "
          f"{reloaded['max_abs_diff']:.3g} after reloading (report: {args.out}/merge_report.json)")
    return 0
