"""``fdpp generate PROMPT...``: batched generation, printed as text or JSON."""
from __future__ import annotations

import argparse
import json
import sys
import time

from fdpp.cli.common import add_model_args, add_sampling_args, llm_from_args, sampling_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate completions for one or more prompts (batched)",
        description="Generate for each PROMPT in one continuous batch. Prompts are wrapped in the "
        "model's chat template unless --raw is given. Reads prompts from stdin, one per line, with '-'.",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text ('-' reads prompts from stdin)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template; complete the text as is")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (text, tokens, timing)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompts = []
    for p in args.prompts:
        if p == "-":
            prompts.extend(line.rstrip("\n") for line in sys.stdin if line.strip())
        else:
            prompts.append(p)
    llm = llm_from_args(args)
    params = sampling_from_args(args)
    t0 = time.perf_counter()
    if args.raw:
        outputs = llm.generate(prompts, params, use_tqdm=not args.quiet and len(prompts) > 1)
    else:
        convs = []
        for p in prompts:
            msgs = [{"role": "system", "content": args.system}] if args.system else []
            msgs.append({"role": "user", "content": p})
            convs.append(msgs)
        outputs = llm.chat(convs, params, use_tqdm=not args.quiet and len(prompts) > 1)
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
            }, ensure_ascii=False))
        else:
            if len(prompts) > 1:
                print(f"### {prompt}")
            print(c.text.strip())
    if not args.quiet and not args.json:
        print(f"[{num_out} tokens in {elapsed:.2f} s, {num_out / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0
