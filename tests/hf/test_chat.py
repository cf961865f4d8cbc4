"""Conversational data: assistant-only loss masks for a Llama-style and a Qwen-style chat
template, token by token; bad messages lines; the KV-cache sampler."""

from __future__ import annotations

import pytest
import torch

from minituner.hf.chat import (
    ChatTemplate,
    assistant_spans,
    chat_messages,
    chat_prompt_ids,
    check_messages,
    encode_messages,
    end_of_turn,
    template_from_record,
    template_record,
    tokenizer_template,
)
from minituner.hf.data import encode_record, read_examples
from minituner.hf.generation import (
    SamplingSettings,
    apply_repetition_penalty,
    generate_ids,
    top_p_filter,
)
from minituner.hf.toy import toy_tokenizer

CONVERSATION = [
    {"role": "system", "content": "you are a good friend"},
    {"role": "user", "content": "who is he ?"},
    {"role": "assistant", "content": "he is my friend ."},
    {"role": "user", "content": "and she ?"},
    {"role": "assistant", "content": "she is a cat"},
]
# (tokens that open an assistant turn, the end-of-turn token) of each style
STYLES = {
    "llama": (["<|start_header_id|>", "assistant", "<|end_header_id|>"], "<|eot_id|>"),
    "qwen": (["<|im_start|>", "assistant"], "<|im_end|>"),
}


def expected_flags(tokens: list, opener: list, end: str) -> list:
    """Per token, read off the token strings alone: inside an assistant turn (after its
    opener, up to and including its end-of-turn token)."""
    flags, inside, i = [], False, 0
    while i < len(tokens):
        if not inside and tokens[i:i + len(opener)] == opener:
            flags += [False] * len(opener)
            inside, i = True, i + len(opener)
            continue
        flags.append(inside)
        if tokens[i] == end:
            inside = False
        i += 1
    return flags


@pytest.mark.parametrize("style", sorted(STYLES))
def test_mask_covers_assistant_turns_and_end_of_turn_only(style):
    tokenizer = toy_tokenizer(style)
    sequence = encode_messages(tokenizer, CONVERSATION)
    tokens = tokenizer.convert_ids_to_tokens(sequence["ids"])
    assert "<unk>" not in tokens
    opener, end = STYLES[style]
    flags = expected_flags(tokens, opener, end)
    assert sequence["mask"] == flags[1:]  # target i predicts token i + 1
    scored = [t for t, m in zip(tokens[1:], sequence["mask"], strict=True) if m]
    assert scored == ["he", "is", "my", "friend", ".", end, "she", "is", "a", "cat", end]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_mask_matches_the_rendered_text(style):
    """The scored tokens spell exactly the assistant spans of the rendered text."""
    tokenizer = toy_tokenizer(style)
    template = tokenizer_template(tokenizer)
    text, spans = assistant_spans(tokenizer, template, CONVERSATION)
    assert [text[a:b] for a, b in spans] == [
        f"he is my friend .{STYLES[style][1]}", f"she is a cat{STYLES[style][1]}"]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(encoded["input_ids"]) == encode_messages(tokenizer, CONVERSATION)["ids"]


def test_single_turn_and_system_turn_carry_no_loss():
    tokenizer = toy_tokenizer("qwen")
    one = encode_messages(tokenizer, CONVERSATION[1:3])
    two = encode_messages(tokenizer, CONVERSATION)
    assert sum(one["mask"]) == 6 and sum(two["mask"]) == 11
    assert len(two["ids"]) > len(one["ids"])


def test_messages_lines_go_through_the_data_reader(tmp_path):
    tokenizer = toy_tokenizer("llama")
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "yes"}]}\n{"prompt": "a", '
                    '"completion": " b"}\n')
    (_, record), _ = read_examples(path)
    assert encode_record(tokenizer, record) == encode_messages(tokenizer, record["messages"])


@pytest.mark.parametrize("record, words", [
    ({"messages": [{"role": "tool", "content": "x"}]}, ["messages[0].role", "'tool'"]),
    ({"messages": [{"role": "user", "content": "x"}]}, ["no assistant turn"]),
    ({"messages": [{"role": "assistant", "content": 3}]}, ["messages[0].content", "int"]),
    ({"messages": []}, ["'messages'"]),
    ({"messages": ["hi"]}, ["messages[0]"]),
])
def test_bad_messages_name_file_line_and_field(record, words):
    with pytest.raises(ValueError) as error:
        check_messages(record, "chat.jsonl:7")
    message = str(error.value)
    assert message.startswith("chat.jsonl:7: ") and "\n" not in message
    assert all(word in message for word in words)


def test_template_that_changes_the_content_is_refused_by_name():
    tokenizer = toy_tokenizer("qwen")
    template = ChatTemplate(tokenizer.chat_template.replace("message['content']",
                                                            "message['content'] | upper"),
                            "my-model")
    with pytest.raises(ValueError, match=r"chat template of my-model .*verbatim.*'he is my"):
        encode_messages(tokenizer, CONVERSATION, template)


def test_template_without_end_of_turn_and_tokenizer_without_template():
    tokenizer = toy_tokenizer()  # the toy's default template closes no turn
    with pytest.raises(ValueError, match="end-of-turn"):
        encode_messages(tokenizer, CONVERSATION)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer_template(tokenizer, "hf:base")


def test_template_record_round_trip_and_end_of_turn():
    tokenizer = toy_tokenizer("qwen")
    template = tokenizer_template(tokenizer, "hf:q")
    record = template_record(tokenizer, template)
    assert record["end_of_turn"] == "<|im_end|>" and record["sha256"] == template.sha256
    assert template_from_record(record, "config.json") == template
    with pytest.raises(ValueError, match="sha256"):
        template_from_record({**record, "text": record["text"] + " "}, "config.json")
    assert end_of_turn(toy_tokenizer("llama"), tokenizer_template(toy_tokenizer("llama"))) \
        == "<|eot_id|>"


def test_chat_prompt_ends_with_the_assistant_header():
    tokenizer = toy_tokenizer("qwen")
    ids = chat_prompt_ids(tokenizer, tokenizer_template(tokenizer),
                          chat_messages("who is he ?", system="you are a dog"))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<|im_start|>", "system"] and tokens[-2:] == ["<|im_start|>",
                                                                         "assistant"]


@pytest.fixture(scope="module")
def llama(toy_hf_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(toy_hf_model("llama"))).eval()


def full_recompute_greedy(model, prompt: list, n: int) -> list:
    ids = torch.tensor([prompt])
    for _ in range(n):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_kv_cache_greedy_equals_full_recompute(llama):
    prompt = [1, 40, 41, 42]
    cached = generate_ids(llama, prompt, SamplingSettings(max_new_tokens=8))[0]
    assert cached == full_recompute_greedy(llama, prompt, 8)


def test_seeded_sampling_repeats_and_stops(llama):
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=0.9,
                                repetition_penalty=1.2)

    def sample(seed):
        return generate_ids(llama, [1, 40], settings, rows=3,
                            generator=torch.Generator().manual_seed(seed))

    assert sample(5) == sample(5) and sample(5) != sample(6)
    first = sample(5)[0]
    stopped = generate_ids(llama, [1, 40], settings, rows=3, stop_ids={first[2]},
                           generator=torch.Generator().manual_seed(5))[0]
    assert stopped == first[:first.index(first[2])]
    by_text = generate_ids(llama, [1, 40], SamplingSettings(12, 1.0, None, 0.9, 1.2,
                                                            stop=(str(first[1]),)), rows=3,
                           generator=torch.Generator().manual_seed(5),
                           text_of=lambda ids: " ".join(map(str, ids)))[0]
    assert by_text == first[:2]


def test_top_p_and_repetition_penalty():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1
    penalised = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]),
                                         torch.tensor([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]
    with pytest.raises(ValueError, match="--top-p"):
        SamplingSettings(top_p=0)
