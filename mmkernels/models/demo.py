"""`mmkernels generate`: batched, streamed generation with a checkpoint or the tiny built-in LLaMA.

With no --model, a tiny LLaMA (LlamaConfig.tiny(), byte-level tokenizer) is built from a fixed seed. Its
weights are random, so its text is noise: the embedded default exercises the whole serving path (byte
tokenizer, left-padded batch, prefill with the padding mask, KV-cache decode, streaming) without
downloading anything. With --model DIR, a HF LLaMA checkpoint directory is loaded (safetensors, sharded
or not) with its tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import List

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF LLaMA checkpoint dir (default: the tiny built-in model)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable); default: three built-in prompts, batched")
    p.add_argument("--prompts-file", default=None, help="one prompt per line ('-' reads standard input)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in weights and of sampling")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if visible)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--no-stream", action="store_true", help="print each completion at the end instead")
    p.add_argument("--adapter", default=None,
                   help="an adapter directory written by `mmkernels train` (its base model and vision tower are "
                        "rebuilt from the run; --model overrides the base)")
    p.add_argument("--image", action="append", default=None,
                   help="an image for a multimodal adapter: one per prompt, in order (repeatable)")


def _read_prompts(args: argparse.Namespace) -> List[str]:
    prompts: List[str] = list(args.prompt or [])
    if args.prompts_file:
        if args.prompts_file == "-":
            ctx = contextlib.nullcontext(sys.stdin)
        else:
            ctx = open(args.prompts_file, encoding="utf-8")
        with ctx as fh:
            prompts += [line.rstrip("\n") for line in fh if line.strip()]
    return prompts or list(DEFAULT_PROMPTS)


def check_sampling_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens: expected a positive integer, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise SystemExit(f"--temperature: expected a number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top-p: expected a number in (0, 1], got {args.top_p}")


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from mmkernels import _checks
    from mmkernels.models.config import LlamaConfig
    from mmkernels.models.llama import Llama
    from mmkernels.models.tokenizer import ByteTokenizer, load_tokenizer

    check_sampling_args(args)
    device = _checks.device(args.device, "--device")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    if args.model is None:
        torch.manual_seed(args.seed)
        model = Llama(LlamaConfig.tiny()).to(device=device, dtype=dtype)
        tokenizer = ByteTokenizer()
        source = "tiny built-in LLaMA (random weights: the text is noise)"
    else:
        model = Llama.from_pretrained(args.model, dtype=dtype, device=device)
        tokenizer = load_tokenizer(args.model)
        source = args.model
    return generate_and_print(model, tokenizer, _read_prompts(args), args, source)


def generate_and_print(model, tokenizer, prompts: List[str], args: argparse.Namespace, source: str,
                       **generate_kwargs) -> int:
    """Generate for `prompts` (batched), streaming a single prompt's text as it comes; generate_kwargs go to
    models.generation.generate (e.g. visual_prompts)."""
    import torch

    from mmkernels import backend
    from mmkernels.models.generation import generate

    model.eval()
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    ids = [tokenizer.encode(p) for p in prompts]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {source}, {n_params:,} parameters, {dtype}, {device}; "
          f"attention backend: {backend.select('attention', device)}", file=sys.stderr)

    decoders = [tokenizer.stream_decoder() for _ in prompts]
    pieces: List[List[str]] = [[] for _ in prompts]

    def on_step(step_tokens):
        for i, tok in enumerate(step_tokens):
            if tok is None:
                continue
            text = decoders[i].step(tok)
            pieces[i].append(text)
            if not args.no_stream and len(prompts) == 1:
                print(text, end="", flush=True)

    t0 = time.perf_counter()
    with torch.no_grad():
        out = generate(
            model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            eos_id=sorted({tokenizer.eos_id, *model.config.eos_ids} - {None}), pad_id=tokenizer.pad_id, seed=args.seed,
            on_step=on_step, **generate_kwargs,
        )
    elapsed = time.perf_counter() - t0
    if len(prompts) == 1 and not args.no_stream:
        print()
    else:
        for prompt, piece in zip(prompts, pieces):
            print(f"[{prompt!r}] -> {''.join(piece)!r}")
    n_new = sum(len(o) for o in out)
    print(f"{len(prompts)} prompts, {n_new} new tokens in {elapsed:.2f} s ({n_new / elapsed:.1f} tokens/s)",
          file=sys.stderr)
    return 0
