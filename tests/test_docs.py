"""The README and docs/*.md stay true to the code: their Python snippets run, their imports and
dotted names resolve, their `minituner` commands use flags that exist, and the repository files
they name exist."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERATED = re.compile(
    r"<!-- benchmark tables: generated.*?<!-- end of generated benchmark tables -->", re.S)


def doc_text(path: Path) -> str:
    """A doc's text without the README's generated benchmark tables."""
    return GENERATED.sub("", path.read_text(encoding="utf-8"))


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a Markdown text."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def python_blocks() -> list:
    """(doc name, block number, code) of every ```python block."""
    return [pytest.param(code, id=f"{path.name}-{number}")
            for path in DOCS for number, code in enumerate(fenced_blocks(doc_text(path), "python"))]


def import_lines() -> list:
    """Every ``from minituner... import ...`` line of the docs (code blocks and prose alike)."""
    found = set()
    for path in DOCS:
        for match in re.finditer(r"from (minituner[\w.]*) import ([\w, ]+)", doc_text(path)):
            names = tuple(n.strip() for n in match.group(2).split(",") if n.strip())
            found.add((path.name, match.group(1), names))
    return sorted(found)


def dotted_names() -> list:
    """Every backticked ``minituner.a.b`` name of the docs (call parentheses dropped)."""
    found = set()
    for path in DOCS:
        for match in re.finditer(r"`(minituner(?:\.\w+)+)", doc_text(path)):
            found.add((path.name, match.group(1)))
    return sorted(found)


def command_lines() -> list:
    """Every ``minituner ...`` command of the docs: lines of ```bash blocks (continuations
    joined, comments dropped) and inline code spans that start with ``minituner ``."""
    found = []
    for path in DOCS:
        text = doc_text(path)
        for block in fenced_blocks(text, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if re.search(r"(^|\s)minituner\s+\w", line) and "python -c" not in line:
                    found.append((path.name, line))
        for span in re.findall(r"(?<!`)`(minituner [^`]+)`", text):
            found.append((path.name, " ".join(span.split())))
    return found


def repo_paths() -> list:
    """Backticked or linked repository paths of the docs (sources, tests, benchmarks, docs)."""
    pattern = re.compile(r"[`(]((?:src/minituner|tests|benchmarks|docs|data)/[\w./-]+)[`)]")
    found = set()
    for path in DOCS:
        for match in pattern.finditer(doc_text(path)):
            found.add((path.name, match.group(1).rstrip(".")))
    return sorted(found)


@pytest.mark.parametrize("code", python_blocks())
def test_python_block_runs(code, tmp_path, monkeypatch):
    """Each ```python block runs as written, in an empty working directory."""
    if "minituner.hf" in code:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc snippet>", "exec"), {"__name__": "__doc_snippet__"})


def test_docs_have_python_blocks():
    """The extraction finds the README's snippets (so the test above cannot pass vacuously)."""
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("doc,module,names", import_lines())
def test_import_line_resolves(doc, module, names):
    """``from module import a, b`` of a doc imports."""
    if module.startswith("minituner.hf"):
        pytest.importorskip("transformers")
    imported = importlib.import_module(module)
    for name in names:
        assert hasattr(imported, name), f"{doc}: {module} has no {name}"


def resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("doc,dotted", dotted_names())
def test_dotted_name_resolves(doc, dotted):
    """A backticked ``minituner.x.y`` in a doc names a module or an attribute that exists."""
    if dotted.startswith("minituner.hf"):
        pytest.importorskip("transformers")
    resolve(dotted)


def subcommand_parser(tokens: list):
    """The argparse parser of ``minituner <tokens>``'s (sub)command and the remaining tokens."""
    import argparse

    from minituner.cli import build_parser

    parser = build_parser()
    while tokens:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or tokens[0] not in actions[0].choices:
            break
        parser, tokens = actions[0].choices[tokens[0]], tokens[1:]
    return parser, tokens


def test_commands_found():
    """The extraction sees the documented commands (so the flag test cannot pass vacuously)."""
    assert len(command_lines()) >= 20


@pytest.mark.parametrize("doc,line", command_lines())
def test_command_flags_exist(doc, line):
    """Every ``--flag`` of a documented ``minituner`` command is a flag of that subcommand."""
    tokens = shlex.split(line)
    tokens = tokens[tokens.index("minituner") + 1:]
    parser, rest = subcommand_parser(tokens)
    if rest == ["--help"]:
        return
    assert parser.prog != "minituner", f"{doc}: {line!r} names no subcommand"
    known = {option for action in parser._actions for option in action.option_strings}
    for token in rest:
        flag = token.split("=")[0]
        if flag.startswith("--"):
            assert flag in known, f"{doc}: {line!r}: {parser.prog} has no {flag}"


EXAMPLE_PATHS = {"src/minituner/mlx/"}  # a new backend's package, named as an example


@pytest.mark.parametrize("doc,path", repo_paths())
def test_repo_path_exists(doc, path):
    """A file or folder of the repository that a doc names exists."""
    if path in EXAMPLE_PATHS:
        return
    assert (ROOT / path).exists(), f"{doc} names {path}, which does not exist"


def yaml_blocks() -> list:
    """Every ```yaml block of the docs (finetune --config files)."""
    return [pytest.param(code, id=f"{path.name}-{number}")
            for path in DOCS for number, code in enumerate(fenced_blocks(doc_text(path), "yaml"))]


@pytest.mark.parametrize("code", yaml_blocks())
def test_yaml_block_is_a_valid_finetune_config(code, tmp_path):
    """A documented --config file is accepted as it stands and builds a valid FinetuneConfig."""
    from minituner.cli.trainflags import config_file_values
    from minituner.training.config import FinetuneConfig, kind_defaults, model_kind

    path = tmp_path / "run.yaml"
    path.write_text(code, encoding="utf-8")
    values = config_file_values(str(path))
    cfg = FinetuneConfig.from_dict({**kind_defaults(model_kind(values.get("model"))), **values})
    cfg.validate()
    if "lr: 1e-3" in code:
        assert cfg.lr == pytest.approx(1e-3)


def test_yaml_config_rejects_unknown_key(tmp_path):
    """What the README says of --config: an unknown key is refused, the known ones listed."""
    from minituner.cli.trainflags import config_file_values

    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nlearning_rate: 0.1\n", encoding="utf-8")
    known = r"unknown key\(s\) \['learning_rate'\]; known keys: .*'lr'"
    with pytest.raises(ValueError, match=known):
        config_file_values(str(path))
