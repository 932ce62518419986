"""``fdpp bench latency|throughput``: engine speed against the hardware's limit."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    from fdpp.cli.common import add_model_args

    p = sub.add_parser("bench", help="benchmark latency or throughput",
                       description="Benchmark the engine. Models by preset name (llama-2-7b, llama-2-13b, "
                       "llama-3-8b, ...) run with random weights and the real shapes; any local checkpoint works "
                       "too. Prompts are random token ids.")
    bsub = p.add_subparsers(dest="bench_command", metavar="MODE", required=True)
    lat = bsub.add_parser("latency", help="prefill time, decode step time, tokens/s and achieved bandwidth",
                          description="Prefill --batch-size prompts of --input-len tokens, then decode "
                          "--output-len tokens; report time to first token, the median decode step, tokens/s, "
                          "achieved bandwidth (weights + KV read per step / step time) and its share of the "
                          "GPU's measured copy bandwidth.")
    lat.add_argument("--batch-size", type=int, nargs="+", default=[1], help="batch size(s)")
    lat.add_argument("--input-len", type=int, nargs="+", default=[128], help="prompt length(s) in tokens")
    lat.add_argument("--output-len", type=int, default=128, help="tokens to generate")
    lat.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
    lat.add_argument("--wall-clock", action=argparse.BooleanOptionalAction, default=True,
                     help="also time LLM.generate end to end: TTFT = wall(1 token), decode tok/s = "
                     "B x (N-1) / (wall(N) - wall(1)), medians of --repeats runs after a warm-up, and the "
                     "host overhead per step (wall-clock step - per-step median)")
    lat.add_argument("--repeats", type=int, default=3, help="wall-clock runs per figure (median)")
    add_model_args(lat)
    lat.set_defaults(func=run_latency)
    thr = bsub.add_parser("throughput", help="many requests with random lengths: output tokens/s",
                          description="Submit --num-prompts requests at once with input and output lengths "
                          "drawn uniformly from the given ranges; report total output tokens per second.")
    thr.add_argument("--num-prompts", type=int, default=200, help="number of requests")
    thr.add_argument("--input-len", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX"),
                     help="prompt length range")
    thr.add_argument("--output-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"),
                     help="output length range")
    thr.add_argument("--json", default=None, metavar="FILE", help="also write the result to this JSON file")
    add_model_args(thr)
    thr.set_defaults(func=run_throughput)


def _llm(args: argparse.Namespace, max_len: int):
    from fdpp.cli.common import llm_from_args

    if args.max_model_len is None:
        args.max_model_len = max_len
    return llm_from_args(args)


def _fmt_gbs(gbs: float | None) -> str:
    """Achieved GB/s with 3 significant digits: hundreds on a GPU, fractions on a CPU."""
    if not gbs:
        return "-"
    return f"{gbs:.0f}" if gbs >= 100 else f"{gbs:.3g}"


def run_latency(args: argparse.Namespace) -> int:
    from fdpp.benchmark import copy_bandwidth
    from fdpp.benchmark import run_latency as bench

    args.max_num_seqs = max(args.max_num_seqs, max(args.batch_size))
    llm = _llm(args, max(args.input_len) + args.output_len + 8)
    bw = copy_bandwidth(llm.engine.device)
    results = []
    eng = llm.engine
    print(f"async scheduling: {'on' if eng.async_scheduling else 'off'}, "
          f"fused norm: {'on' if eng.fuse_norm else 'off'}")
    if args.wall_clock:
        print("wall: LLM.generate end to end (TTFT = wall(1); tok/s = B x (N-1) / (wall(N) - wall(1)));"
              " host ms = wall step - per-step median")
    wall_head = f" {'wall TTFT':>9} {'wall ms':>8} {'wall tok/s':>10} {'host ms':>8}" if args.wall_clock else ""
    print(f"{'batch':>5} {'input':>6} {'TTFT ms':>9} {'step ms':>8} {'tok/s':>9} {'GB/s':>8} {'% copy':>7}"
          + wall_head)
    for bs in args.batch_size:
        for n_in in args.input_len:
            r = bench(llm, args.model or "smollm2-135m", bs, n_in, args.output_len, copy_bw=bw,
                      wall_clock=args.wall_clock, repeats=args.repeats)
            results.append(r.as_dict())
            pct = f"{r.pct_of_copy_bw:.1f}" if r.pct_of_copy_bw else "-"  # no copy bandwidth off CUDA
            gbs = _fmt_gbs(r.achieved_bw_gbs)
            wall = ""
            if r.wall_step_ms is not None:
                host = f"{r.host_overhead_ms:.3f}" if r.host_overhead_ms is not None else "-"
                wall = (f" {r.wall_ttft_ms:>9.2f} {r.wall_step_ms:>8.3f} {r.wall_decode_tokens_per_s:>10.1f} "
                        f"{host:>8}")
            print(f"{bs:>5} {n_in:>6} {r.prefill_ms:>9.2f} {r.decode_step_ms:>8.3f} "
                  f"{r.decode_tokens_per_s * 1:>9.1f} {gbs:>8} {pct:>7}" + wall, flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def run_throughput(args: argparse.Namespace) -> int:
    from fdpp.benchmark import run_throughput as bench

    llm = _llm(args, args.input_len[1] + args.output_len[1] + 8)
    r = bench(llm, args.num_prompts, tuple(args.input_len), tuple(args.output_len), seed=args.seed)
    print(f"{'requests':>8} {'input':>9} {'output':>9} {'elapsed s':>9} {'out tok/s':>9} {'req/s':>7} "
          f"{'preempt':>7}")
    print(f"{r['num_prompts']:>8} {r['total_input_tokens']:>9} {r['total_output_tokens']:>9} "
          f"{r['elapsed_s']:>9.2f} {r['output_tokens_per_s']:>9.1f} {r['requests_per_s']:>7.2f} "
          f"{r['preemptions']:>7}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0
