"""A chat fine-tune on a toy transformers model from the CLI: messages data, the template
recorded in config.json, generate --chat with it, eval --data with exact match."""

from __future__ import annotations

import json

import pytest

from minituner.cli import main
from minituner.hf.toy import write_toy_model

LINES = [
    [("user", "who is he ?"), ("assistant", "he is my friend .")],
    [("system", "you are a dog"), ("user", "what is that ?"), ("assistant", "a cat"),
     ("user", "and this ?"), ("assistant", "a big dog")],
]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = write_toy_model(root / "llama-chat", "llama", chat_style="llama")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in line]})
                            + "\n" for line in LINES * 8))
    assert main(["finetune", "--model", f"hf:{model}", "--train-data", str(data), "--out",
                 str(root / "run"), "--steps", "60", "--lr", "1e-2", "--batch-size", "4"]) == 0
    return {"model": model, "data": data, "run": root / "run"}


def test_run_records_its_chat_template(chat_run):
    config = json.loads((chat_run["run"] / "config.json").read_text())
    template = (chat_run["model"] / "chat_template.jinja").read_text()
    assert config["chat_template"]["text"] == template
    assert config["chat_template"]["end_of_turn"] == "<|eot_id|>"


def test_generate_chat_uses_the_recorded_template(chat_run, capsys):
    args = ["generate", "--model", str(chat_run["run"]), "--chat", "--prompt", "who is he ?"]
    assert main(args) == 0
    assert capsys.readouterr().out == "he is my friend .\n"
    assert main([*args[:-1], "what is that ?", "--system", "you are a dog"]) == 0
    assert capsys.readouterr().out == "a cat\n"
    template = chat_run["model"] / "chat_template.jinja"
    original = template.read_text()
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    try:  # the base's tokenizer changed; the run still renders with what it trained with
        assert main(args) == 0
        assert capsys.readouterr().out == "he is my friend .\n"
    finally:
        template.write_text(original)


def test_generate_sampling_is_seeded(chat_run, capsys):
    args = ["generate", "--model", str(chat_run["run"]), "--chat", "--prompt", "who is he ?",
            "--temperature", "1.5", "--top-p", "0.95", "--repetition-penalty", "1.3",
            "--num-samples", "3", "--max-new-tokens", "6"]
    assert main([*args, "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--seed", "1"]) == 0
    assert capsys.readouterr().out == first and len(first.splitlines()) == 3
    assert main(["generate", "--model", str(chat_run["run"]), "--chat", "--prompt",
                 "who is he ?", "--stop", "friend"]) == 0
    assert capsys.readouterr().out == "he is my\n"


def test_eval_data_scores_assistant_tokens_with_exact_match(chat_run, capsys):
    assert main(["eval", "--model", str(chat_run["run"]), "--data", str(chat_run["data"]),
                 "--exact-match", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert set(trained) == {"data"}  # no built-in probes or control set unless asked
    data = trained["data"]
    assert data["examples"] == 16 and data["tokens"] == 8 * (6 + 3 + 4)
    assert data["exact_match"] == 1.0 and data["n"] == 16
    assert data["token_accuracy"] == 1.0
    assert main(["eval", "--model", f"hf:{chat_run['model']}", "--data", str(chat_run["data"]),
                 "--exact-match", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["data"]
    assert base["exact_match"] == 0.0 and base["loss"] > data["loss"]


def test_eval_data_prompt_completion_and_text(chat_run, tmp_path, capsys, toy_hf_model):
    data = tmp_path / "pc.jsonl"
    data.write_text('{"prompt": "yesterday he", "completion": " went home"}\n'
                    '{"text": "the cat saw a dog"}\n')
    assert main(["eval", "--model", f"hf:{toy_hf_model('gpt2')}", "--data", str(data),
                 "--exact-match"]) == 0
    out = capsys.readouterr().out.splitlines()
    # "went home" + EOS; the text's words after the first + EOS
    assert out[0] == f"data {data}: 2 examples, 8 scored tokens"
    assert out[1].startswith("loss ") and out[2].endswith("(n=1)")
