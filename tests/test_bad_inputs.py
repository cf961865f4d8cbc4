"""Hostile and careless inputs, run through the CLI in-process: each one exits non-zero with one
stderr line naming the flag, file or field, no traceback, and changes nothing on disk outside
--out. Then property tests: random JSONL lines, config values and adapter configs either load or
raise one ValueError."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from minituner.cli import main
from minituner.course.data import load_user_examples
from minituner.hf.data import read_examples
from minituner.hf.toy import write_toy_model
from minituner.lora import apply_lora
from minituner.lora.adapters import load_adapter, save_adapter
from minituner.training.config import FinetuneConfig

LONG = "x" * 10_000  # a completion the 32-token Mini-GPT context cannot hold


@pytest.fixture(scope="module")
def world(tiny_base_run, toy_hf_model, tmp_path_factory):
    """Read-only inputs every case may copy: a base, a finished LoRA run of each kind, data."""
    root = tmp_path_factory.mktemp("world")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"yesterday he {w}", "completion": " went"})
                            + "\n" for w in "abcdefghijklmnopqrst"))
    model = toy_hf_model("gpt2")
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(root / "mg"),
                 "--steps", "2", "--eval-every", "1"]) == 0
    assert main(["finetune", "--model", f"hf:{model}", "--data", str(data), "--out",
                 str(root / "hf"), "--steps", "2"]) == 0
    return {"base": Path(tiny_base_run), "mg": root / "mg", "hf": root / "hf",
            "toy": Path(model), "data": data, "root": root}


def snapshot(*roots: Path, skip: Path) -> dict:
    """path -> sha256 of every file under ``roots`` except those under ``skip``."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and skip not in path.parents and path != skip:
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def copy_with(src: Path, dst: Path, rel: str, change) -> Path:
    """A copy of run ``src`` at ``dst`` whose JSON file ``rel`` is ``change(old)``."""
    shutil.copytree(src, dst)
    file = dst / rel
    file.write_text(json.dumps(change(json.loads(file.read_text()))))
    return dst


def lines_file(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def example(prompt: str = "he", completion: str = " went") -> bytes:
    return json.dumps({"prompt": prompt, "completion": completion}).encode()


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def torch_write_failed(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                       "writing file data/0: file write failed")


def finetune(w, out, *flags) -> list:
    return ["finetune", "--base", str(w["base"]), "--out", str(out), *flags]


def hf_finetune(w, out, *flags) -> list:
    return ["finetune", "--model", f"hf:{w['toy']}", "--data", str(w["data"]), "--out", str(out),
            *flags]


def bad_utf8(w, t):
    data = lines_file(t / "bad.jsonl", [example(), example(), b'{"prompt": "\xff\xfe"}'])
    return finetune(w, t / "out", "--train-data", str(data)), [f"{data}:3", "UTF-8"]


def bad_utf8_hf(w, t):
    data = lines_file(t / "bad.jsonl", [example(), b"\xc3\x28"])
    return (["finetune", "--model", f"hf:{w['toy']}", "--data", str(data), "--out",
             str(t / "out")], [f"{data}:2", "UTF-8"])


def long_example_at_line_31(w, t):
    lines = [example(f"he {i % 7}") for i in range(24)] + [b""] * 6 + [example("he", LONG)]
    data = lines_file(t / "train.jsonl", lines)
    val = lines_file(t / "val.jsonl", [example("she")])
    return (finetune(w, t / "out", "--train-data", str(data), "--val-data", str(val)),
            [f"{data}:31", "tokens"])


def missing_field_after_blank_lines(w, t):
    data = lines_file(t / "train.jsonl", [example(), b"", b"", b'{"prompt": "he"}'])
    return finetune(w, t / "out", "--train-data", str(data)), [f"{data}:4", "completion"]


def named_adapters(w, command: str, *pairs) -> list:
    """``command --model BASE --adapter NAME=DIR ...`` on the Mini-GPT base."""
    return [command, "--model", str(w["base"]),
            *[f"--adapter={pair}" for pair in pairs]]


def adapter_of_another_base(w, t):
    other = copy_with(w["mg"] / "adapter", t / "other", "adapter_config.json",
                      lambda c: {**c, "minituner": {**c["minituner"],
                                                    "base_fingerprint": {"value": "0" * 64}}})
    return (named_adapters(w, "eval", f"a={w['mg'] / 'adapter'}", f"b={other}"),
            ["adapter 'b'", "fingerprint mismatch"])


def config_file(w, t, text: str, name: str = "run.yaml", *flags):
    path = t / name
    path.write_text(text)
    return finetune(w, t / "out", "--config", str(path), *flags)


def adapter_config_list(w, t):
    run = copy_with(w["mg"], t / "run", "adapter/adapter_config.json", lambda c: [c])
    return ["generate", "--model", str(run)], ["adapter_config.json", "JSON object"]


def adapter_section_string(w, t):
    run = copy_with(w["mg"], t / "run", "adapter/adapter_config.json",
                    lambda c: {**c, "minituner": "x"})
    return ["eval", "--model", str(run)], ["adapter_config.json", "'minituner'"]


def dora_adapter_without_magnitudes(w, t):
    run = copy_with(w["mg"], t / "run", "adapter/adapter_config.json",
                    lambda c: {**c, "use_dora": True})
    return (["eval", "--model", str(run)],
            ["adapter_model.safetensors", "no lora_magnitude_vector", "use_dora=true"])


def adapter_use_dora_not_bool(w, t):
    adapter = copy_with(w["hf"] / "adapter", t / "adapter", "adapter_config.json",
                        lambda c: {**c, "use_dora": "yes"})
    return (["generate", "--model", f"hf:{w['toy']}", "--adapter", str(adapter)],
            ["adapter_config.json", "use_dora must be true or false"])


def hf_adapter_config_list(w, t):
    adapter = copy_with(w["hf"] / "adapter", t / "adapter", "adapter_config.json", lambda c: [c])
    return (["generate", "--model", f"hf:{w['toy']}", "--adapter", str(adapter)],
            ["adapter_config.json", "JSON object"])


def hf_adapter_section_string(w, t):
    run = copy_with(w["hf"], t / "run", "adapter/adapter_config.json",
                    lambda c: {**c, "minituner": "x"})
    return ["generate", "--model", str(run)], [str(run / "adapter"), "base"]


def run_base_string(w, t):
    run = copy_with(w["mg"], t / "run", "config.json", lambda c: {**c, "base": str(w["base"])})
    return ["merge", "--model", str(run), "--out", str(t / "out")], ["config.json", "'base'"]


def run_without_base(w, t):
    run = copy_with(w["mg"], t / "run", "config.json",
                    lambda c: {k: v for k, v in c.items() if k != "base"})
    return ["generate", "--model", str(run)], ["config.json", "'base' missing"]


def invalid_adapter_json(w, t):
    run = copy_with(w["mg"], t / "run", "config.json", lambda c: c)
    (run / "adapter" / "adapter_config.json").write_text("{not json")
    return ["generate", "--model", str(run)], ["adapter_config.json"]


def checkpoint_disk_full(w, t, monkeypatch):
    monkeypatch.setattr("minituner.training.checkpoint.torch.save", enospc)
    out = t / "out"
    return (finetune(w, out, "--steps", "2", "--checkpoint-every", "1"),
            [str(out / "checkpoints"), "no space left on device"])


def checkpoint_torch_write_failed(w, t, monkeypatch):
    monkeypatch.setattr("minituner.training.checkpoint.torch.save", torch_write_failed)
    out = t / "out"
    return (finetune(w, out, "--steps", "2", "--checkpoint-every", "1"),
            [str(out / "checkpoints"), "file write failed"])


def safetensors_disk_full_merge(w, t, monkeypatch):
    monkeypatch.setattr("safetensors.torch.save_file", enospc)
    return (["merge", "--model", str(w["mg"]), "--out", str(t / "out")],
            ["model.safetensors", "no space left on device"])


def safetensors_disk_full_hf_adapter(w, t, monkeypatch):
    monkeypatch.setattr("safetensors.torch.save_file", enospc)
    out = t / "out"
    return hf_finetune(w, out, "--steps", "1"), ["adapter_model.safetensors", "no space left"]


# (id, build(world, tmp) -> (argv, [substrings the one stderr line must hold])). A build that
# takes a third argument gets pytest's monkeypatch (fault injection).
def packing_sliding_window(w, t):
    model = write_toy_model(t / "mistral", arch="mistral")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    return (["finetune", "--model", f"hf:{model}", "--data", str(w["data"]), "--out",
             str(t / "o"), "--packing", "--max-len", "16"],
            ["--packing", "'mistral'", "sliding attention window of 4"])


def chat_line(*turns) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}).encode()


GOOD_CHAT = chat_line(("user", "who is he ?"), ("assistant", "he is my friend ."))


def chat_data(w, t, bad: bytes) -> tuple:
    data = lines_file(t / "chat.jsonl", [GOOD_CHAT, bad])
    return hf_finetune(w, t / "o", "--data", str(data)), data


def chat_unknown_role(w, t):
    args, data = chat_data(w, t, chat_line(("tool", "he"), ("assistant", "went")))
    return args, [f"{data}:2", "messages[0].role", "'tool'"]


def chat_no_assistant(w, t):
    args, data = chat_data(w, t, chat_line(("system", "be good"), ("user", "who is he ?")))
    return args, [f"{data}:2", "'messages'", "no assistant turn"]


def chat_content_not_string(w, t):
    line = json.dumps({"messages": [{"role": "user", "content": "he"},
                                    {"role": "assistant", "content": ["went"]}]}).encode()
    args, data = chat_data(w, t, line)
    return args, [f"{data}:2", "messages[1].content", "list"]


def chat_template_not_verbatim(w, t):
    """A template that upper-cases the assistant's words: its mask cannot be found."""
    toy = t / "toy"
    shutil.copytree(w["toy"], toy)
    (toy / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] | upper }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")
    data = lines_file(t / "chat.jsonl", [GOOD_CHAT])
    return (["finetune", "--model", f"hf:{toy}", "--data", str(data), "--out", str(t / "o")],
            ["chat template of", "verbatim", "'he is my friend .'"])


def chat_template_without_end_of_turn(w, t):
    """The toy's default template writes no end-of-turn marker after the assistant."""
    data = lines_file(t / "chat.jsonl", [GOOD_CHAT])
    return hf_finetune(w, t / "o", "--data", str(data)), ["chat template of", "end-of-turn"]


CASES = [
    # 13: tracebacks that must be one line
    ("rank-1e9", lambda w, t: (finetune(w, t / "o", "--rank", "1000000000"),
                               ["--rank 1000000000", "width 64"])),
    ("rank-1e9-hf", lambda w, t: (hf_finetune(w, t / "o", "--rank", "1000000000"),
                                  ["--rank 1000000000", "width 64"])),
    ("rank-1e9-config", lambda w, t: (config_file(w, t, "rank: 1000000000\n"), ["--rank"])),
    ("epochs-inf", lambda w, t: (finetune(w, t / "o", "--epochs", "inf"), ["--epochs", "finite"])),
    ("epochs-inf-config", lambda w, t: (config_file(w, t, "epochs: .inf\n"),
                                        ["--epochs", "finite"])),
    ("lr-nan", lambda w, t: (finetune(w, t / "o", "--lr", "nan"), ["--lr", "finite"])),
    ("alpha-inf-json-config", lambda w, t: (config_file(w, t, '{"alpha": Infinity}', "c.json"),
                                            ["--alpha", "finite"])),
    ("temperature-nan", lambda w, t: (["generate", "--model", str(w["base"]), "--temperature",
                                       "nan"], ["--temperature", "finite"])),
    ("temperature-negative", lambda w, t: (["generate", "--model", str(w["base"]),
                                            "--temperature", "-1"], ["--temperature", ">= 0"])),
    ("temperature-inf", lambda w, t: (["generate", "--model", str(w["base"]), "--temperature",
                                       "inf"], ["--temperature", "finite"])),
    ("adapter-config-list", adapter_config_list),
    ("adapter-minituner-string", adapter_section_string),
    ("hf-adapter-config-list", hf_adapter_config_list),
    ("hf-adapter-minituner-string", hf_adapter_section_string),
    ("adapter-config-invalid-json", invalid_adapter_json),
    ("run-config-base-string", run_base_string),
    ("checkpoint-enospc", checkpoint_disk_full),
    ("checkpoint-torch-write-failed", checkpoint_torch_write_failed),
    ("merge-safetensors-enospc", safetensors_disk_full_merge),
    ("hf-adapter-safetensors-enospc", safetensors_disk_full_hf_adapter),
    # 14: errors that must name the file, line or field
    ("train-data-invalid-utf8", bad_utf8),
    ("hf-data-invalid-utf8", bad_utf8_hf),
    ("long-example-names-file-line", long_example_at_line_31),
    ("missing-field-names-file-line", missing_field_after_blank_lines),
    ("run-config-without-base", run_without_base),
    # 17: flags that would do nothing
    *[(f"full-{flag}", lambda w, t, flag=flag, value=value: (
        finetune(w, t / "o", "--method", "full", f"--{flag}", *value),
        [f"--{flag}", "--method full"]))
      for flag, value in [("rank", ["8"]), ("alpha", ["16"]), ("dropout", ["0.1"]),
                          ("targets", ["wq"]), ("quant-scheme", ["nf4_per_group_64"])]],
    # issue 16: PiSSA, LoftQ and LoRA+ settings a run cannot use
    ("init-unknown", lambda w, t: (finetune(w, t / "o", "--init", "olora"),
                                   ["--init", "olora"])),
    ("init-loftq-zero-iters", lambda w, t: (finetune(w, t / "o", "--method", "qlora", "--init",
                                                     "loftq:0"), ["--init", "loftq:0"])),
    ("init-pissa-on-nf4", lambda w, t: (finetune(w, t / "o", "--method", "qlora", "--init",
                                                 "pissa"), ["--init pissa", "--method qlora"])),
    ("init-loftq-without-qlora", lambda w, t: (finetune(w, t / "o", "--init", "loftq"),
                                               ["--init loftq", "--method qlora"])),
    ("init-loftq-hf", lambda w, t: (hf_finetune(w, t / "o", "--method", "qlora", "--init",
                                                "loftq"), ["--init loftq", "hf:"])),
    ("init-full", lambda w, t: (finetune(w, t / "o", "--method", "full", "--init", "pissa"),
                                ["--init", "--method full"])),
    ("loraplus-zero", lambda w, t: (finetune(w, t / "o", "--loraplus-lr-ratio", "0"),
                                    ["--loraplus-lr-ratio"])),
    ("loraplus-inf-config", lambda w, t: (config_file(w, t, "loraplus_lr_ratio: .inf\n"),
                                          ["--loraplus-lr-ratio", "finite"])),
    ("loraplus-full", lambda w, t: (finetune(w, t / "o", "--method", "full",
                                             "--loraplus-lr-ratio", "16"),
                                    ["--loraplus-lr-ratio", "--method full"])),
    ("full-rank-in-config", lambda w, t: (config_file(w, t, "method: full\nrank: 4\n"),
                                          ["--rank", "--method full"])),
    ("dora-with-pissa", lambda w, t: (finetune(w, t / "o", "--method", "dora", "--init",
                                               "pissa"), ["--init pissa", "--method dora"])),
    ("lora-quant-scheme", lambda w, t: (finetune(w, t / "o", "--quant-scheme",
                                                 "nf4_per_group_64"),
                                        ["--quant-scheme", "--method lora"])),
    ("hf-full-method", lambda w, t: (hf_finetune(w, t / "o", "--method", "full"), ["--method"])),
    ("targets-regex-matches-nothing", lambda w, t: (
        hf_finetune(w, t / "o", "--targets", r".*\.nothing_(q|v)"),
        ["matches no Linear module path", "tried against", "transformer.h.0.attn.c_attn"])),
    ("layers-not-a-range", lambda w, t: (hf_finetune(w, t / "o", "--layers", "3-1"),
                                         ["--layers", "3-1"])),
    ("layers-outside-the-model", lambda w, t: (hf_finetune(w, t / "o", "--layers", "40-41"),
                                               ["layers_to_transform", "[0, 1]"])),
    ("modules-to-save-matches-nothing", lambda w, t: (
        hf_finetune(w, t / "o", "--modules-to-save", "nope"), ["modules_to_save", "'nope'"])),
    ("add-tokens-existing", lambda w, t: (hf_finetune(w, t / "o", "--add-tokens", "<new>",
                                                      "the"),
                                          ["--add-tokens", "'the'", "already in the tokenizer"])),
    ("add-tokens-empty", lambda w, t: (hf_finetune(w, t / "o", "--add-tokens", ""),
                                       ["--add-tokens", "non-empty"])),
    ("add-tokens-on-mini-gpt", lambda w, t: (finetune(w, t / "o", "--steps", "1", "--add-tokens",
                                                      "<new>"), ["--add-tokens", "Mini-GPT"])),
    ("exclude-on-mini-gpt", lambda w, t: (finetune(w, t / "o", "--steps", "1", "--exclude",
                                                   "fc1"), ["--exclude", "Mini-GPT"])),
    ("report-to-wandb-absent", lambda w, t: (hf_finetune(w, t / "o", "--report-to", "wandb"),
                                             ["--report-to wandb", "not installed"])),
    ("dora-quant-scheme", lambda w, t: (finetune(w, t / "o", "--method", "dora",
                                                 "--quant-scheme", "nf4_per_group_64"),
                                        ["--quant-scheme", "--method dora", "qdora"])),
    ("hf-dora-rank-0", lambda w, t: (hf_finetune(w, t / "o", "--method", "dora", "--rank", "0"),
                                     ["--rank"])),
    ("dora-adapter-without-magnitudes", dora_adapter_without_magnitudes),
    ("adapter-use-dora-not-bool", adapter_use_dora_not_bool),
    ("val-data-without-train-data", lambda w, t: (finetune(w, t / "o", "--val-data",
                                                           str(w["data"])),
                                                  ["--val-data", "--train-data"])),
    ("hf-without-data", lambda w, t: (["finetune", "--model", f"hf:{w['toy']}", "--out",
                                       str(t / "o")], ["--data"])),
    ("hf-replay", lambda w, t: (hf_finetune(w, t / "o", "--replay", "0.3"), ["--replay"])),
    ("minigpt-max-len", lambda w, t: (finetune(w, t / "o", "--max-len", "8"), ["--max-len"])),
    ("minigpt-device", lambda w, t: (finetune(w, t / "o", "--device", "cpu"), ["--device"])),
    ("no-verify-base-without-resume", lambda w, t: (finetune(w, t / "o", "--no-verify-base"),
                                                    ["--no-verify-base", "--resume"])),
    ("minigpt-allow-pickle", lambda w, t: (finetune(w, t / "o", "--allow-pickle"),
                                           ["--allow-pickle"])),
    ("base-and-model", lambda w, t: (finetune(w, t / "o", "--model", str(w["base"])),
                                     ["--base", "--model"])),
    # more of the same family
    ("steps-and-epochs", lambda w, t: (finetune(w, t / "o", "--steps", "2", "--epochs", "1"),
                                       ["--epochs", "--steps"])),
    ("steps-zero", lambda w, t: (finetune(w, t / "o", "--steps", "0"), ["--steps"])),
    ("seed-text", lambda w, t: (finetune(w, t / "o", "--seed", "abc"), ["--seed"])),
    ("train-data-missing", lambda w, t: (finetune(w, t / "o", "--train-data",
                                                  str(t / "none.jsonl")), ["none.jsonl"])),
    ("train-data-not-json", lambda w, t: (
        finetune(w, t / "o", "--train-data",
                 str(lines_file(t / "d.jsonl", [example(), b"{oops"]))),
        ["d.jsonl:2", "JSON"])),
    ("config-not-mapping", lambda w, t: (config_file(w, t, "- 1\n- 2\n"), ["run.yaml"])),
    ("config-unknown-key", lambda w, t: (config_file(w, t, "rnak: 4\n"), ["rnak"])),
    ("config-wrong-type", lambda w, t: (config_file(w, t, "rank: four\n"), ["rank"])),
    ("config-missing", lambda w, t: (finetune(w, t / "o", "--config", str(t / "no.yaml")),
                                     ["no.yaml"])),
    ("generate-missing-run", lambda w, t: (["generate", "--model", str(t / "nope")], ["nope"])),
    ("generate-max-new-tokens-zero", lambda w, t: (["generate", "--model", str(w["base"]),
                                                    "--max-new-tokens", "0"],
                                                   ["--max-new-tokens"])),
    ("eval-not-a-run", lambda w, t: (["eval", "--model", str(w["data"].parent / "nowhere")],
                                     ["nowhere"])),
    # chat data, chat generation and evaluation on the user's data
    ("chat-unknown-role", chat_unknown_role),
    ("chat-no-assistant-turn", chat_no_assistant),
    ("chat-content-not-string", chat_content_not_string),
    ("chat-template-not-verbatim", chat_template_not_verbatim),
    ("chat-template-without-end-of-turn", chat_template_without_end_of_turn),
    ("generate-system-without-chat", lambda w, t: (["generate", "--model", str(w["hf"]),
                                                    "--system", "be good"],
                                                   ["--system", "--chat"])),
    ("generate-top-p-above-1", lambda w, t: (["generate", "--model", str(w["hf"]), "--top-p",
                                              "1.5"], ["--top-p"])),
    ("generate-chat-minigpt", lambda w, t: (["generate", "--model", str(w["base"]), "--chat"],
                                            ["--chat", "transformers"])),
    ("eval-exact-match-without-data", lambda w, t: (["eval", "--model", str(w["hf"]),
                                                     "--exact-match"],
                                                    ["--exact-match", "--data"])),
    ("eval-data-minigpt", lambda w, t: (["eval", "--model", str(w["base"]), "--data",
                                         str(w["data"])], ["--data", "transformers"])),
    # several named adapters on one base
    ("adapter-duplicate-name", lambda w, t: (
        named_adapters(w, "generate", f"a={w['mg'] / 'adapter'}", f"a={w['mg'] / 'adapter'}"),
        ["--adapter", "adapter 'a'", "duplicate"])),
    ("adapter-unnamed-among-several", lambda w, t: (
        named_adapters(w, "generate", str(w["mg"] / "adapter"), f"b={w['mg'] / 'adapter'}"),
        ["--adapter", "NAME=DIR"])),
    ("adapter-of-another-base", adapter_of_another_base),
    ("adapter-of-another-model", lambda w, t: (
        named_adapters(w, "generate", f"a={w['mg'] / 'adapter'}", f"h={w['hf'] / 'adapter'}"),
        ["adapter 'h'", "another architecture"])),
    ("packing-sliding-window", packing_sliding_window),
    ("packing-minigpt", lambda w, t: (finetune(w, t / "o", "--packing"),
                                      ["--packing", "Mini-GPT"])),
    ("plan-minigpt", lambda w, t: (finetune(w, t / "o", "--plan"), ["--plan", "hf:"])),
]


def run_cli(argv: list, capsys) -> tuple:
    """(exit code, stderr) of ``minituner argv`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


def progress_free(stderr: str) -> list:
    """The stderr lines that are not a progress bar's redraws (tqdm writes '\\r' frames)."""
    return [line for line in stderr.split("\n") if line.strip() and "\r" not in line
            and "step/s]" not in line and "s/step]" not in line]


@pytest.mark.parametrize("build", [case[1] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_touches_nothing_outside_out(build, world, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    takes_patch = build.__code__.co_argcount == 3
    argv, names = build(world, tmp_path, monkeypatch) if takes_patch else build(world, tmp_path)
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else tmp_path / "no-out"
    before = snapshot(tmp_path, world["root"], world["base"], world["toy"], skip=out)
    code, stderr = run_cli(argv, capsys)
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr
    lines = progress_free(stderr)
    assert len(lines) == 1, stderr
    for name in names:
        assert name in lines[0], lines[0]
    assert len(lines[0]) < 1000 and LONG[:50] not in lines[0]  # never echo 10 KB of data
    assert snapshot(tmp_path, world["root"], world["base"], world["toy"], skip=out) == before


def test_data_is_an_alias_of_train_data_for_minigpt(world, tmp_path, capsys):
    from minituner.cli import build_parser
    from minituner.cli.trainflags import config_from_args

    parser = build_parser()
    common = ["finetune", "--base", str(world["base"]), "--out", str(tmp_path / "o")]
    by_data = config_from_args(parser.parse_args([*common, "--data", str(world["data"])]))
    by_train = config_from_args(parser.parse_args([*common, "--train-data", str(world["data"])]))
    assert by_data == by_train and by_data.train_data == str(world["data"])


def test_a_rank_up_to_the_width_is_accepted(world):
    from minituner.cli import build_parser
    from minituner.cli.trainflags import config_from_args

    args = build_parser().parse_args(["finetune", "--base", str(world["base"]), "--out", "o",
                                      "--rank", "64"])
    assert config_from_args(args).rank == 64


def test_hf_commands_drop_only_the_torchao_and_pytree_lines(world, caplog):
    import logging

    assert main(["generate", "--model", str(world["hf"]), "--max-new-tokens", "2"]) == 0
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile", "E")
        logging.getLogger("torchao").warning("a real torchao warning")
    assert "Failed to load" not in caplog.text and "Enum subclass" not in caplog.text
    assert "a real torchao warning" in caplog.text


def test_hf_command_in_a_fresh_process_prints_only_minituners_lines(world):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run([sys.executable, "-m", "minituner", "generate", "--model",
                             str(world["hf"]), "--max-new-tokens", "2"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


# Property tests: random inputs to the loaders load or raise one ValueError.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)
RECORDS = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"prompt": JSON_VALUES | st.text(max_size=20),
                           "completion": JSON_VALUES | st.text(max_size=20)}),
    st.fixed_dictionaries({"text": JSON_VALUES | st.text(max_size=20)}),
)
LINES = st.lists(
    st.one_of(RECORDS.map(lambda r: json.dumps(r).encode()), st.binary(max_size=12),
              st.just(b"")),
    max_size=6,
)
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line_value_error(call) -> None:
    """``call()`` returns, or raises a ValueError whose message is one line."""
    try:
        call()
    except ValueError as exc:
        assert len(str(exc).strip().splitlines()) == 1, str(exc)


@FUZZ
@given(lines=LINES)
def test_jsonl_loaders_load_or_raise_one_value_error(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    one_line_value_error(lambda: load_user_examples(path))
    one_line_value_error(lambda: read_examples(path))


CONFIG_VALUES = st.dictionaries(
    st.sampled_from(["model", "train_data", "val_data", "val_fraction", "method", "rank", "alpha",
                     "steps", "epochs", "batch_size", "lr", "warmup", "replay", "kl", "dropout",
                     "targets", "seed", "dtype", "max_len", "quant_scheme", "nonsense"]),
    JSON_VALUES | st.sampled_from(["lora", "qlora", "full", "hf:x", "auto"]),
    max_size=5,
)


@FUZZ
@given(values=CONFIG_VALUES)
def test_config_values_load_or_raise_one_value_error(values):
    one_line_value_error(lambda: FinetuneConfig.from_dict(values).validate())


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """A saved adapter of a one-Linear model, and a factory of that plain model."""
    def plain():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4))

    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(apply_lora(plain(), ["0"], r=2), directory)
    return directory, plain


ADAPTER_KEYS = ["r", "lora_alpha", "lora_dropout", "peft_type", "target_modules", "use_rslora",
                "fan_in_fan_out", "bias", "rank_pattern", "alpha_pattern", "init_lora_weights",
                "minituner", "use_dora"]


@FUZZ
@given(change=st.dictionaries(st.sampled_from(ADAPTER_KEYS), JSON_VALUES, max_size=3),
       whole=st.none() | JSON_VALUES)
def test_adapter_configs_load_or_raise_one_value_error(tiny_adapter, tmp_path, change, whole):
    directory, plain = tiny_adapter
    target = tmp_path / "adapter"
    shutil.copytree(directory, target, dirs_exist_ok=True)
    config = json.loads((directory / "adapter_config.json").read_text())
    config = whole if whole is not None else {**config, **change}
    (target / "adapter_config.json").write_text(json.dumps(config))
    one_line_value_error(lambda: load_adapter(plain(), target))
