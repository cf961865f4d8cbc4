"""Conversational data (TRL's ``{"messages": [...]}`` lines) and chat prompts, rendered with a
tokenizer's chat template, with a loss mask over the assistant turns only.

How the assistant tokens are found: the whole conversation is rendered once, and for every
assistant turn the template also renders the conversation before it (with the generation
prompt) and the conversation up to and including it. The turn's text is what the second
rendering adds to the first: the assistant content plus whatever the template writes after it
(its end-of-turn token, e.g. ``<|im_end|>`` or ``<|eot_id|>``), trailing whitespace left out.
The rendered text is tokenized once with character offsets, and a token carries loss exactly
when its characters overlap an assistant turn's text. Matching characters rather than token
counts keeps the mask right for BPEs that merge text across a turn boundary.

A template must render each assistant content verbatim (stripped of surrounding whitespace)
and write something after it (the end-of-turn marker the model learns to stop on); renderings
that do not extend each other turn by turn cannot be masked. Each case is a one-line
ValueError naming the template and what was looked for.

A tokenizer without a chat template is an error (there is no built-in default): give the
model a tokenizer whose ``tokenizer_config.json`` carries ``chat_template``, for example the
instruct model's tokenizer of the same family.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
PROBE_CONTENT = "ok"  # the assistant content rendered to find a template's end-of-turn marker


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the name errors call it by."""

    text: str
    source: str

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the template text (what a run folder records)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def name(self) -> str:
        """'chat template of SOURCE (sha256 1234abcd)'."""
        return f"chat template of {self.source} (sha256 {self.sha256[:12]})"


def tokenizer_template(tokenizer, source: str | None = None) -> ChatTemplate:
    """The tokenizer's own chat template, or a ValueError naming the model that has none."""
    source = source or getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    text = getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):  # several named templates: the default one
        text = text.get("default")
    if not isinstance(text, str) or not text:
        raise ValueError(f"{source}: the tokenizer has no chat template (tokenizer_config.json "
                         "'chat_template'); chat data and --chat need one")
    return ChatTemplate(text, source)


def check_messages(record: dict, where: str) -> None:
    """Refuse a messages record with an unknown role, a non-string content or no assistant
    turn, in one line naming ``where`` (file:line) and the field."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of "
                         "{\"role\", \"content\"} objects")
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: field '{field}' must be an object with 'role' and "
                             "'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: field '{field}.role' is {role!r}; expected one of "
                             f"{', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where}: field '{field}.content' must be a string, got "
                             f"{type(content).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: field 'messages' has no assistant turn (nothing to learn)")


def render(tokenizer, template: ChatTemplate, messages: list,
           generation_prompt: bool = False) -> str:
    """The text ``template`` makes of ``messages`` (a template error names the template)."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template.text, tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except Exception as exc:  # jinja2's TemplateError, or the template's raise_exception
        message = str(exc).strip().splitlines()
        raise ValueError(f"{template.name}: rendering failed: "
                         f"{message[0] if message else type(exc).__name__}") from None


def _turn_span(tokenizer, template: ChatTemplate, messages: list, index: int,
               whole: str) -> tuple:
    """(start, end) characters of assistant turn ``index`` in ``whole``."""
    before = render(tokenizer, template, messages[:index], generation_prompt=True)
    upto = render(tokenizer, template, messages[: index + 1])
    if not upto.startswith(before) or not whole.startswith(upto):
        raise ValueError(f"{template.name}: rendering turn by turn does not extend the same "
                         f"text (looked for the conversation before message {index} as a "
                         "prefix of the whole conversation)")
    turn = upto[len(before):]
    content = messages[index]["content"].strip()
    found = turn.find(content)
    if found < 0:
        raise ValueError(f"{template.name}: does not render the assistant content verbatim "
                         f"(looked for {content[:40]!r} in the turn's text {turn[:60]!r})")
    if not turn[found + len(content):].strip():
        raise ValueError(f"{template.name}: writes nothing after the assistant content, so "
                         f"the turn has no end-of-turn token to learn (looked after "
                         f"{content[:40]!r})")
    return len(before), len(before) + len(turn.rstrip())


def assistant_spans(tokenizer, template: ChatTemplate, messages: list) -> tuple:
    """(rendered text, [(start, end) characters of each assistant turn])."""
    whole = render(tokenizer, template, messages)
    spans = [_turn_span(tokenizer, template, messages, index, whole)
             for index, message in enumerate(messages) if message["role"] == "assistant"]
    return whole, spans


def encode_messages(tokenizer, messages: list, template: ChatTemplate | None = None) -> dict:
    """{"ids", "mask"} of a conversation: target i (predicting ids[i + 1]) counts when that
    token overlaps an assistant turn (content and end-of-turn marker)."""
    template = template or tokenizer_template(tokenizer)
    text, spans = assistant_spans(tokenizer, template, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    in_turn = [any(start < end and start < b and end > a for a, b in spans)
               for start, end in encoded["offset_mapping"]]
    return {"ids": ids, "mask": in_turn[1:]}


def end_of_turn(tokenizer, template: ChatTemplate) -> str | None:
    """The special token the template writes right after an assistant content (e.g.
    ``<|im_end|>``), or None when the first token there is ordinary text."""
    messages = [{"role": "user", "content": PROBE_CONTENT},
                {"role": "assistant", "content": PROBE_CONTENT}]
    before = render(tokenizer, template, messages[:1], generation_prompt=True)
    turn = render(tokenizer, template, messages)[len(before):]
    after = turn[turn.find(PROBE_CONTENT) + len(PROBE_CONTENT):].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    token = tokenizer.convert_ids_to_tokens(ids[0])
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return token if token in specials and after.startswith(token) else None


def template_record(tokenizer, template: ChatTemplate) -> dict:
    """What a run folder's config.json records of the template a run trained with."""
    return {"source": template.source, "sha256": template.sha256, "text": template.text,
            "end_of_turn": end_of_turn(tokenizer, template)}


def template_from_record(record: dict, where: str) -> ChatTemplate:
    """The template a run recorded (:func:`template_record`); a damaged record names ``where``."""
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{where}: field 'chat_template' must hold the template 'text'")
    template = ChatTemplate(record["text"], str(record.get("source", where)))
    if record.get("sha256") not in (None, template.sha256):
        raise ValueError(f"{where}: field 'chat_template' text does not match its sha256")
    return template


def chat_messages(prompt: str, system: str | None = None) -> list:
    """One user turn (after a system turn when ``system`` is given)."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": prompt}]


def chat_prompt_ids(tokenizer, template: ChatTemplate, messages: list) -> list:
    """Token ids of ``messages`` rendered with the generation prompt (the assistant's turn
    opened), ready to continue."""
    text = render(tokenizer, template, messages, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def uses_template(records: list, chat_prompts: bool = False) -> bool:
    """True when a run renders with the chat template: a messages record, or ``chat_prompts``
    (``--chat-template`` on prompt/completion data)."""
    return chat_prompts or any(isinstance(r, dict) and "messages" in r for r in records)
