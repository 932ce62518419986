"""Kernel by kernel, where a decode step's device time goes: torch-profile steady decode steps of a batch
(CUDA graphs on or off) and time them, for one engine configuration per run.

    python bench/decode_profile.py --batch 64 --input-len 1024 --out $OUT            # graphs on
    python bench/decode_profile.py --eager --llm-kw '{"fuse_norm": false}' --tag nofuse

Every prompt is distinct random tokens (identical prompts would share their KV blocks through the
prefix cache, and attention would then read L2 instead of HBM). Only the public engine surface is used
(`LLM`, `llm.engine.add_request` / `step`), so the same script also profiles an older tree put first on
PYTHONPATH (bench/h200_pending.sh does this with the 2026-11-26 tree). Prints the table and writes
decode_profile_<gpu>_<date>_<tag>.json: the step time (synchronized, mean of the timed steps), the
per-step device time of each kernel and their sum.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time

import torch


def start_decoding(eng, batch: int, input_len: int, params, warm_steps: int = 4) -> None:
    """Add ``batch`` requests of distinct random prompts (no two share a KV block through the prefix cache),
    step until every prompt is computed (chunked prompts stay in ``waiting``), then ``warm_steps`` decode steps."""
    rng = random.Random(0)
    vocab = min(eng.model_config.vocab_size, 32000)
    for _ in range(batch):
        eng.add_request(None, [rng.randrange(1, vocab) for _ in range(input_len)], params)
    for _ in range(400):
        eng.step()
        if not eng.scheduler.waiting:
            break
    for _ in range(warm_steps):
        eng.step()


def device_gaps(prof, steps: int, short_us: float = 20.0) -> dict:
    """Per step, the device's idle time between consecutive kernels/copies of the profiled window: gaps
    shorter than ``short_us`` (launch bubbles inside a graph or a burst) and longer ones (the device waited
    for the host), in ms, with the count of long gaps."""
    try:
        evs = sorted((e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
                     if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0)
    except Exception as exc:  # noqa: BLE001 - a profiler without this API: report why, keep the rest
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    short = long = 0.0
    n_long = 0
    end = evs[0][1] if evs else 0
    for start, stop in evs[1:]:
        gap = (start - end) / 1e3
        if gap > 0:
            if gap < short_us:
                short += gap
            else:
                long += gap
                n_long += 1
        end = max(end, stop)
    return {"short_gaps_ms": round(short / 1e3 / steps, 3), "long_gaps_ms": round(long / 1e3 / steps, 3),
            "long_gaps": round(n_long / steps, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b", help="preset (random weights) or path")
    ap.add_argument("--dtype", default=None, help="float16 | bfloat16 (default: float16 on CUDA, float32 on the CPU)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="profiled decode steps")
    ap.add_argument("--timed-steps", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (as bench/e2e.py); > 0: sampled")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--by-module", action="store_true",
                    help="(eager) also the device time of each projection kind (qkv_proj, o_proj, gate_up_proj, "
                    "down_proj, lm_head), of attention and of each layer's self_attn / mlp per step, with the "
                    "projections' TB/s")
    ap.add_argument("--llm-kw", default="{}", help="JSON of extra LLM keyword arguments")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--device", default="cuda", help="cuda (the profile's subject) or cpu (a smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    import fdpp
    from fdpp import LLM, SamplingParams

    kw = json.loads(args.llm_kw)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    need = args.steps + args.timed_steps + 16
    llm = LLM(args.model, dtype=args.dtype or ("float16" if cuda else "float32"), device=args.device, max_num_seqs=args.batch,
              max_model_len=args.input_len + need + 16, enforce_eager=args.eager, show_progress=False,
              max_num_batched_tokens=max(8192, args.input_len), **kw)
    eng = llm.engine
    if args.by_module and not args.eager:
        sys.exit("--by-module needs --eager (a graph replay runs no Python hooks)")
    module_bytes = annotate_modules(eng.model) if args.by_module else {}
    start_decoding(eng, args.batch, args.input_len,
                   SamplingParams(temperature=args.temperature, max_tokens=need, ignore_eos=True))
    sync()
    t = time.perf_counter()
    for _ in range(args.timed_steps):
        eng.step()
    sync()
    step_ms = (time.perf_counter() - t) * 1e3 / args.timed_steps
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            eng.step()
        sync()
    def self_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    kernels = sorted(((e.key, self_us(e) / 1e3 / args.steps, e.count / args.steps) for e in events),
                     key=lambda r: -r[1])
    total = sum(k[1] for k in kernels)
    gaps = device_gaps(prof, args.steps) if cuda else {}
    print(f"{args.tag}: fdpp from {os.path.dirname(fdpp.__file__)}; graphs {not args.eager}; B{args.batch} x "
          f"{args.input_len}; step {step_ms:.3f} ms (synchronized mean of {args.timed_steps}); device time "
          f"{total:.3f} ms per step; device idle {gaps}")
    for name, ms, n in kernels[:25]:
        print(f"  {ms:8.3f} ms  {n:6.1f}/step  {ms / max(n, 1e-9) * 1e3:9.1f} us  {name[:90]}")
    by_module = []
    for e in prof.key_averages():
        if e.key.startswith("mod::"):
            name = e.key[5:]
            ms = (e.device_time_total if cuda else e.cpu_time_total) / 1e3 / args.steps
            nbytes = module_bytes.get(name, 0)
            by_module.append({"module": name, "ms_per_step": ms, "calls_per_step": e.count / args.steps,
                              "weight_bytes": nbytes, "tbps": nbytes / (ms * 1e-3) / 1e12 if ms and nbytes else None})
    for r in sorted(by_module, key=lambda r: -r["ms_per_step"]):
        tb = f"{r['tbps']:.2f} TB/s" if r["tbps"] else ""
        print(f"  module {r['module']:14s} {r['ms_per_step']:8.3f} ms/step  {r['calls_per_step']:5.1f} calls  {tb}")
    llm.close()
    os.makedirs(args.out, exist_ok=True)
    gpu_name = torch.cuda.get_device_name() if cuda else "cpu"
    gpu = gpu_name.replace(" ", "_")
    path = os.path.join(args.out, f"decode_profile_{gpu}_{datetime.date.today().isoformat()}_{args.tag}.json")
    with open(path, "w") as f:
        json.dump({"gpu": gpu_name, "date": datetime.date.today().isoformat(),
                   "torch": torch.__version__, "argv": sys.argv, "fdpp": os.path.dirname(fdpp.__file__),
                   "step_ms": step_ms, "device_ms_per_step": total,
                   "temperature": args.temperature, "device_idle_per_step": gaps,
                   "kernels": [{"name": n, "ms_per_step": ms, "calls_per_step": c} for n, ms, c in kernels],
                   "by_module": by_module,
                   "targets": [{"name": f"e2e.{args.model}.b{args.batch}_in{args.input_len}.{args.tag}.decode_step_ms",
                                "value": round(step_ms, 3), "goal": "report", "met": True}]}, f, indent=1)
    print("wrote", path)


def annotate_modules(model) -> dict[str, int]:
    """Wrap each projection (a module with a 2-D ``weight``: qkv_proj, o_proj, gate_up_proj, down_proj,
    lm_head, ...), each attention module and each decoder layer's self_attn (qkv + rotary + attention + o:
    what a fused-rope layer runs outside any projection module) and mlp in a profiler range ``mod::<name>``
    (its last path component); returns the weight bytes per projection name, all layers together."""
    from torch.profiler import record_function

    nbytes: dict[str, int] = {}
    for path, mod in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        w = getattr(mod, "weight", None)
        is_proj = isinstance(w, torch.Tensor) and w.dim() == 2 and name != "embed_tokens"
        if not (is_proj or name in ("attn", "self_attn", "mlp")):
            continue
        if is_proj:
            q = getattr(w, "quant", None)
            nbytes[name] = nbytes.get(name, 0) + (q.data.numel() * q.data.element_size() if q is not None
                                                  else w.numel() * w.element_size())
        ranges = []
        mod.register_forward_pre_hook(lambda m, a, name=name, ranges=ranges: ranges.append(
            record_function(f"mod::{name}").__enter__()))
        mod.register_forward_hook(lambda m, a, out, ranges=ranges: ranges.pop().__exit__(None, None, None))
    return nbytes


if __name__ == "__main__":
    main()
