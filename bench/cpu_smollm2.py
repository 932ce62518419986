"""CPU speed on the embedded SmolLM2-135M-Instruct: fdpp vs Hugging Face transformers, same prompt,
same machine, fp32, greedy, batch 1.

    python bench/cpu_smollm2.py --new-tokens 64 --out bench/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

PROMPT = "Explain in a few sentences why the sky is blue."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for the JSON result")
    args = ap.parse_args()

    from fdpp import LLM, SamplingParams
    from fdpp.models.default_model import default_model_path

    llm = LLM(dtype="float32", device="cpu", show_progress=False)
    ids = llm.apply_chat_template([{"role": "user", "content": PROMPT}])
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate([ids], params, use_tqdm=False)  # warm-up
    fdpp_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = llm.generate([ids], params, use_tqdm=False)[0]
        fdpp_times.append(time.perf_counter() - t0)
    fdpp_tokens = out.outputs[0].token_ids

    import transformers

    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    x = torch.tensor([ids])
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=llm.get_tokenizer().eos_token_id)
    with torch.no_grad():
        hf.generate(x, **kw)
        hf_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref = hf.generate(x, **kw)
            hf_times.append(time.perf_counter() - t0)
    hf_tokens = ref[0, len(ids):].tolist()
    n = args.new_tokens
    res = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to fp32",
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "fdpp_tokens_per_s": n / min(fdpp_times),
        "transformers_tokens_per_s": n / min(hf_times),
        "ratio": min(hf_times) / min(fdpp_times),
        "same_greedy_tokens": fdpp_tokens == hf_tokens,
        "note": "end-to-end generate() wall time incl. prefill, best of repeats",
    }
    print(json.dumps(res, indent=1))
    if args.out:
        with open(os.path.join(args.out, f"cpu_smollm2_{datetime.date.today().isoformat()}.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
