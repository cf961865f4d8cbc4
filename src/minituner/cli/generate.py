"""``minituner generate``: sample text from a trained run."""

from __future__ import annotations

from minituner.cli.common import nonneg_float, nonneg_int, positive_int
from minituner.cli.runfolders import add_hf_inference_flags, load_for_inference


def register(subparsers) -> None:
    """Add the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate", help="sample from a trained run (Mini-GPT or transformers)",
        description="Continue a prompt with a trained model.",
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


def generate_text(model, tokenizer, prompt: str, args) -> list:
    """Decoded continuations of ``prompt``."""
    import torch

    prompt_ids = tokenizer.encode(prompt, bos=True)
    if tokenizer.unk_id in prompt_ids:
        raise ValueError("--prompt: contains characters the tokenizer does not know")
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.tensor([prompt_ids] * args.num_samples)
    model.eval()
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
    """Print one line per sample."""
    model, tokenizer, _ = load_for_inference(args)
    for text in generate_text(model, tokenizer, args.prompt, args):
        print(text)
    return 0
