"""``minituner generate``: sample text from a trained run."""

from __future__ import annotations

from minituner.cli.common import nonneg_float, nonneg_int, positive_int
from minituner.cli.runfolders import (
    TRANSFORMERS,
    adapter_choice,
    add_hf_inference_flags,
    chat_template_for,
    load_for_inference,
)


def register(subparsers) -> None:
    """Add the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate", help="sample from a trained run (Mini-GPT or transformers)",
        description="Continue a prompt with a trained model. With --adapter NAME=DIR given "
                    "several times, the adapters share one base and one batch (each row "
                    "through its own adapter); every line starts with [NAME]. Transformers "
                    "models sample with their KV cache; --chat sends the prompt as a user turn "
                    "rendered with the run's recorded chat template and prints the reply.",
    )
    parser.add_argument("--model", default="runs/demo/base",
                        help="run folder (a Mini-GPT base, merged, full-FT or LoRA/QLoRA run, or "
                             "a transformers fine-tuning run), or hf:DIR for a transformers "
                             "model; --adapter DIR applies an adapter")
    parser.add_argument("--prompt", default="yesterday he", help="text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=20)
    parser.add_argument("--temperature", type=nonneg_float, default=0.0,
                        help="sampling temperature >= 0; 0 means greedy")
    parser.add_argument("--top-k", type=positive_int, default=None)
    parser.add_argument("--num-samples", type=positive_int, default=1)
    parser.add_argument("--seed", type=nonneg_int, default=0)
    hf_only = "transformers models: "
    parser.add_argument("--top-p", type=nonneg_float, default=None,
                        help=f"{hf_only}sample from the smallest set of tokens whose "
                             "probability reaches P (0 < P <= 1)")
    parser.add_argument("--repetition-penalty", type=nonneg_float, default=None,
                        help=f"{hf_only}> 1 discourages tokens already in the text")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help=f"{hf_only}stop a sample at this text (cut before it); repeatable")
    parser.add_argument("--chat", action="store_true", default=None,
                        help=f"{hf_only}render --prompt as a user turn with the chat template "
                             "the run trained with (else the tokenizer's) and print the reply")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help=f"{hf_only}with --chat, a system turn before the prompt")
    add_hf_inference_flags(parser)  # --adapter, --device (transformers models)
    parser.set_defaults(func=run)


def generate_text(model, tokenizer, prompt: str, args, adapter_rows=None) -> list:
    """Decoded continuations of ``prompt``; ``adapter_rows``: the named adapter of each of the
    batch's rows (``args.num_samples`` rows each), all sampled in one batch."""
    from contextlib import nullcontext

    import torch

    from minituner.lora.multi import use_adapter_rows

    prompt_ids = tokenizer.encode(prompt, bos=True)
    if tokenizer.unk_id in prompt_ids:
        raise ValueError("--prompt: contains characters the tokenizer does not know")
    generator = torch.Generator().manual_seed(args.seed)
    rows = len(adapter_rows) if adapter_rows else args.num_samples
    tokens = torch.tensor([prompt_ids] * rows)
    model.eval()
    with use_adapter_rows(model, adapter_rows) if adapter_rows else nullcontext():
        out = model.generate(
            tokens, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            stop_id=tokenizer.eos_id, generator=generator,
        )
    texts = []
    for row in out.tolist():
        generated = row[len(prompt_ids):]
        if tokenizer.eos_id in generated:
            generated = generated[: generated.index(tokenizer.eos_id)]
        continuation = getattr(tokenizer, "continuation_text", None)  # hf: tokenizers
        texts.append(prompt + (continuation(prompt_ids, generated) if continuation
                               else tokenizer.decode(generated)))
    return texts


def sampling_settings(args):
    """The transformers sampler's settings from the flags."""
    from minituner.hf.generation import SamplingSettings

    return SamplingSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=getattr(args, "top_p", None),
        repetition_penalty=getattr(args, "repetition_penalty", None),
        stop=tuple(getattr(args, "stop", None) or ()),
    )


def prompt_and_stops(args, tokenizer) -> tuple:
    """(prompt ids, stop ids, chat or not) of a transformers model: the plain prompt after BOS,
    or with --chat the prompt rendered as a user turn (after --system) with the chat template;
    generation stops at EOS and at the template's end-of-turn token."""
    from minituner.hf.chat import chat_messages, chat_prompt_ids

    stops = {tokenizer.eos_id}
    if not getattr(args, "chat", None):
        if getattr(args, "system", None) is not None:
            raise ValueError("--system: only used with --chat")
        ids = tokenizer.encode(args.prompt, bos=True)
        if tokenizer.unk_id is not None and tokenizer.unk_id in ids:
            raise ValueError("--prompt: contains characters the tokenizer does not know")
        return ids, stops, False
    template, end = chat_template_for(args, tokenizer.hf)
    ids = chat_prompt_ids(tokenizer.hf, template, chat_messages(args.prompt, args.system))
    if end is not None:
        stops.add(tokenizer.hf.convert_tokens_to_ids(end))
    return ids, stops, True


def generate_hf_text(model, tokenizer, args, adapter_rows=None) -> list:
    """Decoded samples of a transformers model (its KV cache): the prompt plus its
    continuation, or with --chat the reply alone."""
    from contextlib import nullcontext

    import torch

    from minituner.hf.generation import cut_at_stop, generate_ids
    from minituner.lora.multi import use_adapter_rows

    settings = sampling_settings(args)
    prompt_ids, stop_ids, chat = prompt_and_stops(args, tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    rows = len(adapter_rows) if adapter_rows else args.num_samples

    def text_of(ids: list) -> str:
        return tokenizer.decode(ids) if chat else tokenizer.continuation_text(prompt_ids, ids)

    model.eval()
    with use_adapter_rows(model, adapter_rows) if adapter_rows else nullcontext():
        samples = generate_ids(model.inner, prompt_ids, settings, rows, stop_ids, generator,
                               text_of, context=model.config.context_len)
    texts = [cut_at_stop(text_of(ids), settings.stop)[0] for ids in samples]
    return [text.strip() for text in texts] if chat else [args.prompt + t for t in texts]


def run(args) -> int:
    """Print one line per sample (``[NAME] text`` per named adapter)."""
    model, tokenizer, kind = load_for_inference(args)
    sample = generate_hf_text if kind == TRANSFORMERS else \
        lambda m, t, a, rows=None: generate_text(m, t, a.prompt, a, rows)
    adapters = adapter_choice(args)
    if not isinstance(adapters, dict):
        for text in sample(model, tokenizer, args):
            print(text)
        return 0
    rows = [name for name in adapters for _ in range(args.num_samples)]
    for name, text in zip(rows, sample(model, tokenizer, args, rows), strict=True):
        print(f"[{name}] {text}")
    return 0
