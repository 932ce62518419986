"""``fdpp generate PROMPT...``: batched generation, printed as text or JSON."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fdpp.cli.common import add_model_args, add_sampling_args, llm_from_args, sampling_from_args
from fdpp.errors import InvalidRequestError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate completions for one or more prompts (batched)",
        description="Generate for each PROMPT in one continuous batch. Prompts are wrapped in the "
        "model's chat template unless --raw is given. Reads prompts from stdin, one per line, with '-'. "
        "A model without a tokenizer (a random-weight preset) needs --raw: the prompt's UTF-8 bytes are "
        "its token ids and the output is printed as token ids.",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text ('-' reads prompts from stdin)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template; complete the text as is")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: text, token ids, finish reason, token counts and "
                   "timing (time to first token, total time, decode tokens/s)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)  # before loading: a bad flag costs no load time
    prompts = []
    for p in args.prompts:
        if p == "-":
            prompts.extend(line.rstrip("\n") for line in sys.stdin if line.strip())
        else:
            prompts.append(p)
    llm = llm_from_args(args)
    has_tokenizer = llm.get_tokenizer() is not None
    if not has_tokenizer and not args.raw:
        raise InvalidRequestError(
            f"{args.model} has no tokenizer (random weights), so it has no chat template: add --raw to "
            "complete the prompt as raw bytes"
        )
    show_bar = not args.quiet and len(prompts) > 1
    t0 = time.perf_counter()
    if args.raw:
        inputs: list[Any] = prompts if has_tokenizer else [_bytes_as_ids(p, llm) for p in prompts]
        outputs = llm.generate(inputs, params, use_tqdm=show_bar)
    else:
        convs = []
        for p in prompts:
            msgs = [{"role": "system", "content": args.system}] if args.system else []
            msgs.append({"role": "user", "content": p})
            convs.append(msgs)
        outputs = llm.chat(convs, params, use_tqdm=show_bar)
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    for prompt, out in zip(prompts, outputs):
        c = out.outputs[0]
        if args.json:
            print(json.dumps({
                "prompt": prompt,
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
                "num_prompt_tokens": len(out.prompt_token_ids),
                "num_output_tokens": len(c.token_ids),
                "timing": _timing(out),
            }, ensure_ascii=False))
        else:
            if len(prompts) > 1:
                print(f"### {prompt}")
            print(c.text.strip() if has_tokenizer else " ".join(map(str, c.token_ids)))
    if not args.quiet and not args.json:
        print(f"[{num_out} tokens in {elapsed:.2f} s, {num_out / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _bytes_as_ids(text: str, llm: Any) -> list[int]:
    """A tokenizer-less model's prompt: its UTF-8 bytes (every preset's vocabulary has >= 256 ids)."""
    vocab = llm.engine.model_config.vocab_size
    return [b % vocab for b in text.encode("utf-8")]


def _timing(out: Any) -> dict[str, float | None]:
    """Seconds from the request's arrival to its first and last token, and the decode rate after the first."""
    m = out.metrics
    if m is None or m.first_token_time is None:
        return {"time_to_first_token_s": None, "total_s": None, "decode_tokens_per_s": None}
    end = m.finished_time or m.last_token_time or m.first_token_time
    n = len(out.outputs[0].token_ids)
    decode_s = end - m.first_token_time
    return {
        "time_to_first_token_s": round(m.first_token_time - m.arrival_time, 4),
        "total_s": round(end - m.arrival_time, 4),
        "decode_tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
    }
