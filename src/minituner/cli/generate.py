"""``minituner generate``: sample text from a trained run."""

from __future__ import annotations

from minituner.cli.common import nonneg_float, nonneg_int, positive_int
from minituner.cli.runfolders import adapter_choice, add_hf_inference_flags, load_for_inference


def register(subparsers) -> None:
    """Add the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate", help="sample from a trained run (Mini-GPT or transformers)",
        description="Continue a prompt with a trained model. With --adapter NAME=DIR given "
                    "several times, the adapters share one base and one batch (each row "
                    "through its own adapter); every line starts with [NAME].",
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


def run(args) -> int:
    """Print one line per sample (``[NAME] text`` per named adapter)."""
    model, tokenizer, _ = load_for_inference(args)
    adapters = adapter_choice(args)
    if not isinstance(adapters, dict):
        for text in generate_text(model, tokenizer, args.prompt, args):
            print(text)
        return 0
    rows = [name for name in adapters for _ in range(args.num_samples)]
    for name, text in zip(rows, generate_text(model, tokenizer, args.prompt, args, rows),
                          strict=True):
        print(f"[{name}] {text}")
    return 0
