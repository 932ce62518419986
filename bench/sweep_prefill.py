"""Sweep of the Hopper prefill kernel's variants (fdpp.kernels.attention_prefill_tma) against peers.

Points: causal prefill, head_dim 128, seq {1k, 4k, 8k, 16k} with batch = 16k // seq (16k tokens per
call), heads 32/32 and 32/8, fp16 and bf16 (`--quick`: fp16, seq 1k/4k/16k; < 3 min on an H200).
Per point: every variant of VARIANTS (TMA vs pointer loads, tile shape, warps, pipelining depth, warp
specialization, mass check mode, causal split, launch order, with/without the always-launched
fallback, unified vs synchronized), today's paged_prefill_attention (unified and synchronized), and
torch SDPA with the cuDNN and the flash backend, all in the same run.

Full mode runs every variant in fp16 and only the 6 best of them (by worst ratio to cuDNN) in bf16,
to stay under 6 minutes; `--variants` runs the given ones in every dtype.

Self-checking: before anything at a point is timed, every output is compared with torch SDPA in fp32
(relative norm error, TOL per dtype); a unified run with the fallback must flag no row at phi = PHI
and, forced to fall back (phi = -40), must still be right. A variant that fails to compile or to run
is recorded ("failed: ...") and the sweep goes on; a variant with a WRONG result is recorded, never
timed, and makes the script exit with status 1 after writing its results.
Timing: triton.testing.do_bench_cudagraph medians; each call's inputs are >= ROTATE_BYTES or are
rotated through copies inside the graph so L2 (50-60 MB) does not serve them.

  python bench/sweep_prefill.py [--quick] [--dtypes fp16,bf16] [--out DIR]
--out DIR (default $OUT) gets sweep_prefill.json (with `attention.prefill_*` targets), .md and .png.
FDPP_BENCH_SMOKE=1 runs the logic on the CPU in Triton's interpreter with tiny shapes (no timing).
"""
# ruff: noqa: C408, BLE001 - rows read best as dict(...); a failing variant is recorded, not fatal
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

SMOKE = os.environ.get("FDPP_BENCH_SMOKE") == "1"
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fdpp.benchmark import graph_median_us, rel_norm_err  # noqa: E402
from fdpp.kernels.attention_prefill import paged_prefill_attention  # noqa: E402
from fdpp.kernels.attention_prefill_tma import prefill_attention_tma  # noqa: E402
from fdpp.ops.attention import safe_window  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}
HEAD_DIM = 128 if not SMOKE else 64
BLOCK_SIZE = 16
PHI = 4.0  # random q, k at scale 1/sqrt(d): scores ~ N(0, 1); inside the fp16 window
ROTATE_BYTES = 256 << 20

# name -> prefill_attention_tma kwargs ("mode": unified | sync; fallback defaults to True)
BASE = dict(use_tma=True, block_m=128, block_n=128, num_warps=8, num_stages=2, overlap=False, window_on="max")
VARIANTS: dict[str, dict] = {
    "default": dict(),  # default_config: what the engine's dispatch runs (by head_dim and sequence length)
    "tma_128x128_w8_s2": dict(BASE),
    "tma_128x128_w8_s3": dict(BASE, num_stages=3),
    "tma_128x64_w8_s3": dict(BASE, block_n=64, num_stages=3),
    "tma_128x64_w4_s3": dict(BASE, block_n=64, num_warps=4, num_stages=3),
    "tma_128x128_w4_s2": dict(BASE, num_warps=4),
    "tma_64x64_w4_s3": dict(BASE, block_m=64, block_n=64, num_warps=4, num_stages=3),
    "tma_128x128_w8_s2_ws": dict(BASE, warp_specialize=True),
    "tma_128x64_w8_s3_ws": dict(BASE, block_n=64, num_stages=3, warp_specialize=True),
    "ptr_128x128_w8_s2": dict(BASE, use_tma=False),
    "ptr_128x64_w8_s3": dict(BASE, use_tma=False, block_n=64, num_stages=3),
    "tma_128x128_w8_s2_massabs": dict(BASE, mass_mode="abs"),
    "tma_128x128_w8_s2_massoff_nofb": dict(BASE, mass_mode="off", fallback=False),
    "tma_128x128_w8_s2_nofb": dict(BASE, fallback=False),
    "tma_128x128_w8_s2_nosplit": dict(BASE, split_causal=False),
    "tma_128x128_w8_s2_forward": dict(BASE, reverse=False),
    "tma_128x128_w8_s2_normL": dict(BASE, norm_lc=False),
    "tma_128x128_w8_s2_ov": dict(BASE, overlap=True),
    "tma_128x128_w8_s3_ov": dict(BASE, num_stages=3, overlap=True),
    "tma_128x64_w8_s3_ov": dict(BASE, block_n=64, num_stages=3, overlap=True),
    "tma_128x64_w4_s3_ov": dict(BASE, block_n=64, num_warps=4, num_stages=3, overlap=True),
    "host_128x128_w8_s2": dict(BASE, use_tma="host"),
    "host_128x64_w8_s3": dict(BASE, use_tma="host", block_n=64, num_stages=3),
    "host_128x128_w8_s2_ov": dict(BASE, use_tma="host", overlap=True),
    "host_128x64_w8_s3_ov": dict(BASE, use_tma="host", block_n=64, num_stages=3, overlap=True),
    "host_128x128_w8_s2_ws": dict(BASE, use_tma="host", warp_specialize=True),
    "host_128x128_w4_s3_ws": dict(BASE, use_tma="host", num_warps=4, num_stages=3, warp_specialize=True),
    "tma_128x128_w8_s2_winsum": dict(BASE, window_on="sum"),
    "host_128x64_w8_s3_ov_winsum": dict(BASE, use_tma="host", block_n=64, num_stages=3, overlap=True,
                                        window_on="sum"),
}
# left out of the full sweep to keep it under 6 minutes (run them with --variants)
NOT_IN_FULL = ["ptr_128x64_w8_s3", "tma_128x64_w4_s3", "tma_128x128_w4_s2", "tma_128x64_w4_s3_ov"]
SYNC_OF = ["default", "tma_128x128_w8_s2", "tma_128x64_w8_s3", "tma_128x128_w8_s2_ws", "tma_128x128_w8_s2_ov",
           "tma_128x64_w8_s3_ov", "host_128x64_w8_s3_ov"]
QUICK_VARIANTS = ["default", "tma_128x128_w8_s2", "tma_128x64_w8_s3", "tma_128x128_w8_s2_ws", "tma_128x128_w8_s2_ov",
                  "tma_128x64_w8_s3_ov", "host_128x128_w8_s2", "host_128x64_w8_s3_ov", "ptr_128x128_w8_s2",
                  "tma_128x128_w8_s2_massabs", "tma_128x128_w8_s2_massoff_nofb", "tma_128x128_w8_s2_nofb",
                  "tma_128x128_w8_s2_winsum"]
QUICK_SYNC = ["default", "tma_128x128_w8_s2", "tma_128x64_w8_s3", "tma_128x128_w8_s2_ov"]
for _name in SYNC_OF:
    VARIANTS[_name + "_sync"] = dict(VARIANTS[_name], mode="sync")
# the variants that ship-able code may use: unified, fallback on, the fp16 mass check on
SHIPPABLE = [n for n, kw in VARIANTS.items() if kw.get("mode", "unified") == "unified"
             and kw.get("fallback", True) and kw.get("mass_mode") != "off"]


def bench_us(fn) -> float:
    return graph_median_us(fn, smoke=SMOKE, rep=20)


rel_err = rel_norm_err


def _short(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


class Case:
    """num_copies sets of (q, k, v, out, paged cache view of k/v) for batch sequences of seq_len."""

    def __init__(self, batch, seq_len, num_heads, num_kv_heads, dtype):
        T = batch * seq_len
        per_copy = T * (2 * num_heads + 2 * num_kv_heads) * HEAD_DIM * 2
        self.num_copies = 1 if SMOKE else max(1, math.ceil(ROTATE_BYTES / per_copy))
        self.sets = []
        for _ in range(self.num_copies):
            q = torch.randn(T, num_heads, HEAD_DIM, dtype=dtype, device=DEV)
            k = torch.randn(T, num_kv_heads, HEAD_DIM, dtype=dtype, device=DEV)
            v = torch.randn(T, num_kv_heads, HEAD_DIM, dtype=dtype, device=DEV)
            # the engine's cache holds this step's k/v; here the cache IS k/v (block b = tokens 16b..)
            kc = k.view(T // BLOCK_SIZE, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
            vc = v.view(T // BLOCK_SIZE, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
            self.sets.append(dict(q=q, k=k, v=v, kc=kc, vc=vc, out=torch.empty_like(q)))
        nb = seq_len // BLOCK_SIZE
        self.block_tables = torch.arange(batch * nb, dtype=torch.int32, device=DEV).view(batch, nb)
        self.context_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=DEV)
        self.cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=DEV)
        self.stats = torch.zeros(2, dtype=torch.int64, device=DEV)
        self.batch, self.seq_len, self.num_heads, self.num_kv_heads = batch, seq_len, num_heads, num_kv_heads
        self.dtype = dtype

    def reference(self) -> torch.Tensor:
        s = self.sets[0]
        B, L = self.batch, self.seq_len

        def bhld(x):
            return x.view(B, L, x.shape[1], HEAD_DIM).transpose(1, 2).float()
        g = self.num_heads // self.num_kv_heads
        # NOTE: K/V repeated to MHA so the fp32 memory-efficient kernel applies (math would hold the
        # whole [B, H, L, L] score matrix: 32 GB at 16k).
        k, v = (bhld(s[n]).repeat_interleave(g, dim=1) for n in ("k", "v"))
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            o = torch.nn.functional.scaled_dot_product_attention(bhld(s["q"]), k, v, is_causal=True)
        return o.transpose(1, 2).reshape(B * L, self.num_heads, HEAD_DIM)

    def run_tma(self, i, phi, kw):
        s = self.sets[i]
        kw = {k: v for k, v in kw.items() if k != "mode"}
        return prefill_attention_tma(
            s["q"], s["k"], s["v"], self.cu, self.context_lens, scale=HEAD_DIM ** -0.5,
            max_seqlen_q=self.seq_len, k_cache=s["kc"], v_cache=s["vc"], block_tables=self.block_tables,
            phi=phi, window=safe_window(self.dtype), stats=self.stats, out=s["out"], **kw)

    def run_paged(self, i, phi):
        s = self.sets[i]
        return paged_prefill_attention(
            s["q"], s["kc"], s["vc"], self.block_tables, self.context_lens, self.cu, scale=HEAD_DIM ** -0.5,
            max_seqlen_q=self.seq_len, phi=phi, window=safe_window(self.dtype), stats=self.stats, out=s["out"])

    def timer(self, fn):
        """fn(i) over every copy per replay; returns microseconds per call."""
        n = self.num_copies

        def all_copies():
            for i in range(n):
                fn(i)
        return bench_us(all_copies) / n


def sdpa_peer(case: Case, backend) -> float | str:
    B, L = case.batch, case.seq_len
    gqa = case.num_heads != case.num_kv_heads
    sets = []
    for s in case.sets:  # contiguous [B, H, L, D] copies of the same data
        sets.append([x.view(B, L, x.shape[1], HEAD_DIM).transpose(1, 2).contiguous() for x in (s["q"], s["k"], s["v"])])

    def fn(i):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(*sets[i], is_causal=True, enable_gqa=gqa)
    try:
        return case.timer(fn)
    except Exception as e:
        return _short(e)


def flops(batch, seq_len, num_heads) -> float:
    return 4 * batch * num_heads * seq_len * seq_len * HEAD_DIM / 2


def run_point(case: Case, variants: list[str], sync_variants: list[str], wrong: list) -> dict:
    row = dict(dtype=str(case.dtype).replace("torch.", ""), batch=case.batch, seq_len=case.seq_len,
               num_heads=case.num_heads, num_kv_heads=case.num_kv_heads, us={}, err={}, flagged={}, status={})
    ref = case.reference()
    tol = TOL[case.dtype]
    todo = []  # (name, callable(i)) to time after every check passed
    names = [(n, VARIANTS[n]) for n in variants] + [(n + "_sync", VARIANTS[n + "_sync"]) for n in sync_variants]
    for name, kw in names:
        unified = kw.get("mode", "unified") == "unified"
        phi = PHI if unified else None
        try:
            case.stats.zero_()
            out = case.run_tma(0, phi, kw)
            err = rel_err(out, ref)
            row["err"][name] = err
            if unified:
                row["flagged"][name] = int(case.stats[1])
            ok = err < tol and (not unified or not kw.get("fallback", True) or int(case.stats[1]) == 0)
            if ok and unified and kw.get("fallback", True) and name == variants[0]:
                err_fb = rel_err(case.run_tma(0, -40.0, kw), ref)  # every tile recomputed by the fallback
                row["err"][name + "_forced_fallback"] = err_fb
                ok = err_fb < tol
            if not ok:
                row["status"][name] = "WRONG"
                wrong.append((name, row["dtype"], case.batch, case.seq_len, case.num_kv_heads, err))
                continue
            row["status"][name] = "ok"
            todo.append((name, lambda i, phi=phi, kw=kw: case.run_tma(i, phi, kw)))
        except Exception as e:
            row["status"][name] = _short(e)
            traceback.print_exc()
    for name, phi in (("paged_unified", PHI), ("paged_sync", None)):
        try:
            err = rel_err(case.run_paged(0, phi), ref)
            row["err"][name] = err
            if err >= tol:
                row["status"][name] = "WRONG"
                wrong.append((name, row["dtype"], case.batch, case.seq_len, case.num_kv_heads, err))
                continue
            row["status"][name] = "ok"
            todo.append((name, lambda i, phi=phi: case.run_paged(i, phi)))
        except Exception as e:
            row["status"][name] = _short(e)
    ref = None
    for name, fn in todo:
        try:
            row["us"][name] = case.timer(fn)
        except Exception as e:
            row["status"][name] = _short(e)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        r = sdpa_peer(case, backend)
        if isinstance(r, float):
            row["us"][name] = r
            row["status"][name] = "ok"
        else:
            row["status"][name] = r
    f = flops(case.batch, case.seq_len, case.num_heads)
    row["tflops"] = {k: f / (v * 1e-6) / 1e12 for k, v in row["us"].items()}
    return row


def _ratio(row, peer, name):
    us = row["us"]
    return us[peer] / us[name] if peer in us and name in us else None


def targets(rows: list[dict]) -> tuple[list[dict], dict]:
    """Each shippable variant's worst ratio to cuDNN, and the targets of the shipped config ("default";
    else the best single shippable variant)."""
    summary = {}
    for name in SHIPPABLE:
        rs = [_ratio(r, "cudnn", name) for r in rows]
        if rs and all(x is not None for x in rs):
            summary[name] = min(rs)
    out = []
    # NOTE: the targets are those of the config the engine ships ("default"), when it ran everywhere.
    best = "default" if "default" in summary else (max(summary, key=summary.get) if summary else None)

    def tgt(name, value, goal, met, **extra):
        out.append(dict(name=name, value=value, goal=goal, met=bool(met), **extra))
    if best is None:
        tgt("attention.prefill_vs_cudnn_min", None, ">= 0.9 at 1k-16k", False, note="no variant ran at every point")
        return out, summary
    worst = min(rows, key=lambda r: _ratio(r, "cudnn", best))
    at = f"{worst['dtype']} {worst['batch']}x{worst['seq_len']} {worst['num_heads']}/{worst['num_kv_heads']}"
    tgt("attention.prefill_vs_cudnn_min", summary[best], ">= 0.9 at 1k-16k", summary[best] >= 0.9,
        variant=best, worst_point=at)
    big = [_ratio(r, "cudnn", best) for r in rows if r["seq_len"] >= 8192]
    if big:
        tgt("attention.prefill_vs_cudnn_min_8k_plus", min(big), ">= 1.0 at >= 8k", min(big) >= 1.0, variant=best)
    fl = [_ratio(r, "flash", best) for r in rows if _ratio(r, "flash", best) is not None]
    if fl:
        tgt("attention.prefill_vs_flash_min", min(fl), "report", True, variant=best)
    pg = [_ratio(r, "paged_unified", best) for r in rows if _ratio(r, "paged_unified", best) is not None]
    if pg:
        tgt("attention.prefill_tma_vs_paged_min", min(pg), "report (> 1: faster than today's kernel)", True,
            variant=best)
    base = best.removesuffix("_massabs").removesuffix("_normL").removesuffix("_winsum")
    uvs = [_ratio(r, base + "_sync", best) for r in rows if _ratio(r, base + "_sync", best) is not None]
    if uvs:
        tgt("attention.prefill_unified_vs_sync_min", min(uvs), ">= 1.05", min(uvs) >= 1.05, variant=best,
            sync=base + "_sync")
    else:  # the best variant has no synchronized twin: compare the best unified with the best synchronized
        vals = []
        for r in rows:
            syncs = [v for k, v in r["us"].items() if k.endswith("_sync") and k != "paged_sync"]
            if syncs and best in r["us"]:
                vals.append(min(syncs) / r["us"][best])
        if vals:
            tgt("attention.prefill_unified_vs_sync_min", min(vals), ">= 1.05 (vs the best synchronized variant)",
                min(vals) >= 1.05, variant=best)
    fb = [_ratio(r, "tma_128x128_w8_s2_nofb", "tma_128x128_w8_s2") for r in rows]
    fb = [x for x in fb if x is not None]
    if fb:
        tgt("attention.prefill_fallback_launch_cost_max", 1 - min(fb), "report (share of the time)", True)
    return out, summary


def markdown(res: dict) -> str:
    lines = [f"# Prefill sweep: {res['gpu']}, {res['date']}", "",
             f"`{res['command']}`; torch {res['torch']}, triton {res['triton']}, head_dim {HEAD_DIM}, phi {PHI}; "
             f"CUDA-graph medians; 16k tokens per call; wall {res['wall_s']:.0f} s; points skipped (time budget): "
             f"{res['skipped_points'] or 'none'}.", "", "## Targets", "",
             "| target | value | goal | met | variant / worst point |", "|---|---|---|---|---|"]
    for t in res["targets"]:
        v = t["value"]
        lines.append(f"| {t['name']} | {v:.3f} | {t['goal']} | {'yes' if t['met'] else 'NO'} | "
                     f"{t.get('variant', '')} {t.get('worst_point', '')} |" if isinstance(v, float) else
                     f"| {t['name']} | - | {t['goal']} | NO | {t.get('note', '')} |")
    lines += ["", "## Shippable variants ranked by their worst ratio to cuDNN", "",
              "| variant | min vs cuDNN |", "|---|---|"]
    for name, v in sorted(res["summary"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {v:.3f} |")
    for r in res["rows"]:
        lines += ["", f"## {r['dtype']} {r['batch']} x {r['seq_len']} ({r['num_heads']}/{r['num_kv_heads']})", "",
                  "| rank | variant | us | TFLOP/s | vs cuDNN | vs flash | err | flagged |", "|---|---|---|---|---|---|---|---|"]
        ranked = sorted(r["us"].items(), key=lambda kv: kv[1])
        for i, (name, us) in enumerate(ranked):
            vc, vf = _ratio(r, "cudnn", name), _ratio(r, "flash", name)
            err = r["err"].get(name)
            lines.append(f"| {i + 1} | {name} | {us:.1f} | {r['tflops'][name]:.0f} | "
                         f"{'-' if vc is None else f'{vc:.3f}'} | {'-' if vf is None else f'{vf:.3f}'} | "
                         f"{'-' if err is None else f'{err:.2e}'} | {r['flagged'].get(name, '-')} |")
        bad = {k: v for k, v in r["status"].items() if v != "ok"}
        if bad:
            lines += ["", "Not timed: " + "; ".join(f"{k}: {v}" for k, v in bad.items())]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = res["rows"]
    best = next((t["variant"] for t in res["targets"] if t["name"] == "attention.prefill_vs_cudnn_min"
                 and t.get("variant")), None)
    labels = [f"{r['dtype'][:4]} {r['batch']}x{r['seq_len'] // 1024}k {r['num_heads']}/{r['num_kv_heads']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    width = 0.2
    for j, (key, lab) in enumerate([(best, f"fdpp TMA ({best})"), ("paged_unified", "fdpp paged (today)"),
                                    ("cudnn", "cuDNN SDPA"), ("flash", "flash SDPA")]):
        vals = [r["tflops"].get(key, 0.0) if key else 0.0 for r in rows]
        ax.bar([i + (j - 1.5) * width for i in range(len(rows))], vals, width, label=lab)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=60, fontsize=7)
    ax.set_ylabel("TFLOP/s (causal)")
    ax.set_title(f"Prefill attention, {res['gpu']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fp16, seq 1k/4k/16k, fewer variants (< 3 min)")
    ap.add_argument("--dtypes", default=None, help="comma-separated subset of fp16,bf16 (default: both; quick: fp16)")
    ap.add_argument("--variants", default=None, help="comma-separated variant names (default: all / quick set)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="write sweep_prefill.json/.md/.png here")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new point after this many seconds (default 150 quick, 330 full)")
    ap.add_argument("--from-json", default=None, help="only recompute targets and render the markdown of a JSON")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
        res["targets"], res["summary"] = targets(res["rows"])
        print(markdown(res))
        return 0
    dtypes = args.dtypes or ("fp16" if args.quick else "fp16,bf16")
    try:
        dtypes = [DTYPES[d.strip()] for d in dtypes.split(",") if d.strip()]
    except KeyError as e:
        ap.error(f"--dtypes: unknown dtype {e}; use a subset of {sorted(DTYPES)}")
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS or v.endswith("_sync")]
        if unknown:
            ap.error(f"--variants: unknown {unknown}; choose from {sorted(k for k in VARIANTS if not k.endswith('_sync'))}")
        sync_variants = [v for v in variants if v in SYNC_OF]
    else:
        variants = QUICK_VARIANTS if args.quick else [k for k in VARIANTS
                                                      if not k.endswith("_sync") and k not in NOT_IN_FULL]
        sync_variants = QUICK_SYNC if args.quick else SYNC_OF
    seqs = [1024, 4096, 16384] if args.quick else [1024, 4096, 8192, 16384]
    heads = [(32, 32), (32, 8)]
    if SMOKE:
        seqs, heads = [32, 64], [(2, 2), (4, 2)]
        for kw in VARIANTS.values():  # interpreter-sized tiles
            kw.update(block_m=16, block_n=16, num_warps=4, num_stages=1)
        variants, sync_variants = variants[:3], sync_variants[:1]
    tokens = 16384 if not SMOKE else 64
    torch.manual_seed(0)
    res = dict(gpu="cpu-smoke" if SMOKE else torch.cuda.get_device_name(), command=" ".join(sys.argv),
               date=datetime.date.today().isoformat(), torch=torch.__version__, triton=triton.__version__,
               phi=PHI, head_dim=HEAD_DIM, variants={k: VARIANTS[k] for k in variants}, rows=[])
    if not SMOKE:
        res["device_capability"] = list(torch.cuda.get_device_capability())
    out_dir = args.out
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    wrong: list = []
    t0 = time.time()

    def save():
        res["wall_s"] = time.time() - t0
        res["targets"], res["summary"] = targets(res["rows"])
        res["wrong"] = wrong
        if out_dir:
            with open(os.path.join(out_dir, "sweep_prefill.json"), "w") as f:
                json.dump(res, f, indent=1)

    budget = args.budget_s or (150.0 if args.quick else 330.0)
    res["skipped_points"] = []
    for di, dtype in enumerate(dtypes):
        if di == 1 and not args.variants and not SMOKE:
            # NOTE: the later dtypes run only the fp16 pass's 6 best shippable variants (half the compiles)
            _, summary = targets(res["rows"])
            top = sorted(summary, key=summary.get, reverse=True)[:6]
            if "default" in summary and "default" not in top:
                top = ["default"] + top[:5]
            if top:
                variants = top
                sync_variants = [v for v in top if v in SYNC_OF] or sync_variants[:1]
                res["later_dtype_variants"] = variants + [v + "_sync" for v in sync_variants]
                print("later dtypes run:", res["later_dtype_variants"], flush=True)
        for nh, nkv in heads:
            for seq in seqs:
                if time.time() - t0 > budget:
                    res["skipped_points"].append(f"{dtype} {seq} {nh}/{nkv}")
                    print(f"time budget {budget:.0f}s spent: skipping {dtype} {seq} {nh}/{nkv}", flush=True)
                    continue
                case = Case(max(1, tokens // seq), seq, nh, nkv, dtype)
                row = run_point(case, variants, sync_variants, wrong)
                case = None
                if not SMOKE:
                    torch.cuda.empty_cache()
                res["rows"].append(row)
                best = sorted(row["us"].items(), key=lambda kv: kv[1])[:4]
                print(f"[{time.time() - t0:.0f}s] {row['dtype']} {row['batch']}x{seq} {nh}/{nkv}: "
                      + ", ".join(f"{k} {v:.1f}us" for k, v in best), flush=True)
                save()
    save()
    md = markdown(res)
    print(md)
    if out_dir:
        with open(os.path.join(out_dir, "sweep_prefill.md"), "w") as f:
            f.write(md)
        plot(res, os.path.join(out_dir, "sweep_prefill.png"))
    if wrong:
        print("WRONG RESULTS (not timed):", wrong, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
