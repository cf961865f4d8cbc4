"""Random-init transformers models with a small word-level tokenizer, for offline trials.

``write_toy_model(DIR, arch)`` writes a ``save_pretrained`` directory (config, safetensors
weights, tokenizer with a chat template) that ``hf:DIR`` loads; nothing is downloaded. Sizes:
``tiny`` (64 wide, 2 layers, vocab 512) for tests, ``gpt2-small`` (768 wide, 12 layers,
vocab 50257) to measure real-shape speed and memory. The weights are random: such a model
only shows that the machinery works.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minituner.hf.models import quiet_transformers
from minituner.util.files import atomic_directory

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>", "<system>")
WORDS = (
    "the a an and or but if then so to of in on at by for with from up down out over under "
    "i you he she it we they me him her us them my your his its our their this that these "
    "those is are was were be been being have has had do does did go goes went gone come came "
    "see saw seen eat ate eaten write wrote written work worked play played walk walked talk "
    "talked yesterday today tomorrow now always never often sometimes morning night day week "
    "year time cat dog bird fish tree house car book word name city road water food friend "
    "question answer yes no not what who where when why how which good bad big small new old "
    "red blue green happy sad fast slow one two three four five six seven eight nine ten . , ? !"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)
# Chat templates in the shape of two real families, for chat-data tests and demos (the toy's
# default template above has no end-of-turn marker). Each adds its markup tokens to the vocab.
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nyou are a good friend .<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_STYLES = {
    "llama": {"template": LLAMA_TEMPLATE,
              "specials": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
    "qwen": {"template": QWEN_TEMPLATE, "specials": ["<|im_start|>", "<|im_end|>"]},
}
ROLE_WORDS = ("system", "user", "assistant")  # plain added tokens of the chat styles
SIZES = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "ffn": 256, "vocab": 512, "positions": 128},
    "gpt2-small": {"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072, "vocab": 50257,
                   "positions": 1024},
}
TOY_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def toy_tokenizer(chat_style: str | None = None):
    """A word-level PreTrainedTokenizerFast over :data:`WORDS`, specials and a chat template
    (``chat_style`` "llama" or "qwen": that family's template shape and markup tokens)."""
    if chat_style is not None and chat_style not in CHAT_STYLES:
        raise ValueError(f"chat_style must be one of {list(CHAT_STYLES)}, got {chat_style!r}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate((*SPECIALS, *WORDS))}
    engine = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    engine.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if chat_style is not None:  # decode with spaces between words
        engine.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=engine, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=list(SPECIALS[4:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if chat_style is not None:
        style = CHAT_STYLES[chat_style]
        tokenizer.add_special_tokens({"additional_special_tokens": [*SPECIALS[4:],
                                                                    *style["specials"]]})
        tokenizer.add_tokens(list(ROLE_WORDS))
        tokenizer.chat_template = style["template"]
    return tokenizer


def toy_config(arch: str = "gpt2", size: str = "tiny", dropout: float = 0.0):
    """A transformers config of the given architecture and size (ids of <pad>/<bos>/<eos>)."""
    if arch not in TOY_ARCHITECTURES:
        raise ValueError(f"arch must be one of {list(TOY_ARCHITECTURES)}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    shape = SIZES[size]
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            n_embd=shape["hidden"], n_layer=shape["layers"], n_head=shape["heads"],
            n_inner=shape["ffn"], vocab_size=shape["vocab"], n_positions=shape["positions"],
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **ids,
        )
    from transformers import AutoConfig

    return AutoConfig.for_model(
        arch, hidden_size=shape["hidden"], intermediate_size=shape["ffn"] // 2,
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=max(1, shape["heads"] // 2), vocab_size=shape["vocab"],
        max_position_embeddings=shape["positions"], attention_dropout=dropout,
        tie_word_embeddings=arch == "qwen2", head_dim=shape["hidden"] // shape["heads"], **ids,
    )


def write_toy_model(
    directory: str | os.PathLike, arch: str = "gpt2", size: str = "tiny", seed: int = 0,
    dropout: float = 0.0, dtype: torch.dtype = torch.float32, chat_style: str | None = None,
) -> Path:
    """Save a random-init model (seeded) and the toy tokenizer into ``directory`` atomically
    (``chat_style``: see :func:`toy_tokenizer`; its added tokens fit in the vocab)."""
    from transformers import AutoModelForCausalLM

    config = toy_config(arch, size, dropout)
    out = Path(directory)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: folder exists and is not empty")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with atomic_directory(out) as staging:
        with quiet_transformers():
            model.save_pretrained(str(staging))
        toy_tokenizer(chat_style).save_pretrained(str(staging))
    return out
