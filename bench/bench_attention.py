"""Attention kernel benchmark: fdpp paged decode / prefill (unified max and synchronized) vs torch SDPA.

Decode: batch {1, 8, 32, 64} x KV length {1k, 4k, 16k, 32k} x heads (32/32, 32/8), head_dim 128, fp16
and bf16 (`--dtypes`). fdpp variants in the same run: unified max with the in-launch fallback (what
ships), unified with the old two-launch fallback (`fused_fallback=False`), unified without fallback,
and the synchronized kernel.
Prefill: causal, 32 heads (32/32 and 32/8), head_dim 128: 1x1k, 1x4k, 4x2k, 1x8k, 1x16k.
Peers: SDPA with the cuDNN backend and with the flash backend on contiguous [B, H, L, D] K/V, measured
in the same run. fdpp reads K/V through its block table (block_size 16) from the paged cache.

Timing: triton.testing.do_bench_cudagraph (median); inputs smaller than ~512 MB are rotated through
several copies inside the captured graph so L2 (50-60 MB) does not serve them. Decode bandwidth =
K and V bytes read / time. Correctness: relative norm error vs a float64 reference on smaller points.

Self-checking: before a point is timed, every fdpp variant is compared with a float64 reference (on
points up to 8 x 4k; the assertion stops the run) and the unified run must flag no row.

  python bench/bench_attention.py [--quick] [--dtypes fp16,bf16] [--tune] [--out DIR]
--out DIR (default $OUT when set) writes attention_bench.json (with `attention.*` targets), .md, .png.
--quick (< 3 min on an H200): decode batch {1, 8} x {1k, 4k}, prefill 1k and 4k.
"""
# ruff: noqa: C408, BLE001 - result rows read best as dict(...); a failing peer is recorded, not fatal
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fdpp.benchmark import graph_median_us
from fdpp.kernels import attention_decode as dec
from fdpp.kernels.attention_prefill import paged_prefill_attention
from fdpp.kernels.device import num_sms
from fdpp.ops.attention import safe_window

DTYPE = torch.float16  # the dtype of the pass in progress (main() sets it per --dtypes entry)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}  # relative norm error vs float64 (tests/kernels/paged_utils)
HEAD_DIM = 128
BLOCK_SIZE = 16
ROTATE_BYTES = 512 << 20 if os.environ.get("FDPP_BENCH_SMOKE") != "1" else 1
PHI = 4.0  # random q/k at scale 1/sqrt(d): scores ~ N(0, 1); phi keeps them inside the fp16 window
# FDPP_BENCH_SMOKE=1: run the script's logic on the CPU (Triton interpreter, tiny shapes, no timing).
SMOKE = os.environ.get("FDPP_BENCH_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"


def bench(fn) -> float:
    """Median microseconds of fn() replayed from a CUDA graph."""
    return graph_median_us(fn, smoke=SMOKE, rep=30)


def copy_bandwidth() -> float:
    if SMOKE:
        return 0.0
    a = torch.empty(1 << 30, dtype=torch.uint16, device=DEV)  # 2 GB
    b = torch.empty_like(a)
    # NOTE: event-timed: a graph-captured copy_ measured 2.7 TB/s on an H200 whose plain copy does 4.3.
    us = triton.testing.do_bench(lambda: b.copy_(a), rep=200, return_mode="median") * 1e3
    return 2 * (2 << 30) / (us * 1e-6) / 1e12


def _empty_cache():
    if not SMOKE:
        torch.cuda.empty_cache()


def rel_err(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# ------------------------------------------------------------------------------------------------
# Decode
# ------------------------------------------------------------------------------------------------

class PagedDecodeCase:
    """num_copies stacked paged caches; copy c of sequence b owns blocks [(c*B + b)*nb, ... + nb)."""

    def __init__(self, batch, kv_len, num_heads, num_kv_heads, num_copies):
        nb = kv_len // BLOCK_SIZE
        total_blocks = num_copies * batch * nb
        shape = (total_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
        self.k_cache = torch.randn(shape, dtype=DTYPE, device=DEV)
        self.v_cache = torch.randn(shape, dtype=DTYPE, device=DEV)
        base = torch.arange(batch * nb, dtype=torch.int32, device=DEV).view(batch, nb)
        # Random physical order of the blocks within each copy (paged, not contiguous).
        perm = torch.randperm(batch * nb, device=DEV).to(torch.int32)
        base = perm[base.view(-1).long()].view(batch, nb)
        self.block_tables = [base + c * batch * nb for c in range(num_copies)]
        self.context_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=DEV)
        self.q = torch.randn(batch, num_heads, HEAD_DIM, dtype=DTYPE, device=DEV)
        self.kv_len = kv_len
        self.stats = torch.zeros(2, dtype=torch.int64, device=DEV)
        self.out = torch.empty_like(self.q)

    def run(self, copy, phi, **kw):
        return dec.paged_decode_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables[copy], self.context_lens,
            scale=HEAD_DIM ** -0.5, max_context_len=self.kv_len, phi=phi, window=safe_window(DTYPE),
            stats=self.stats, out=self.out, **kw)

    def timer(self, phi, **kw):
        n = len(self.block_tables)

        def fn():
            for c in range(n):
                self.run(c, phi, **kw)
        return bench(fn) / n

    def reference(self, copy=0):
        """float64 reference for copy `copy`: [B, H, D]."""
        B, H, _ = self.q.shape
        kvh = self.k_cache.shape[2]
        bt = self.block_tables[copy].long()
        k = self.k_cache[bt].reshape(B, -1, kvh, HEAD_DIM).double().repeat_interleave(H // kvh, 2)
        v = self.v_cache[bt].reshape(B, -1, kvh, HEAD_DIM).double().repeat_interleave(H // kvh, 2)
        s = torch.einsum("bhd,blhd->bhl", self.q.double(), k) * HEAD_DIM ** -0.5
        return torch.einsum("bhl,blhd->bhd", torch.softmax(s, -1), v)


def sdpa_decode_timer(batch, kv_len, num_heads, num_kv_heads, backend, num_copies):
    q = torch.randn(batch, num_heads, 1, HEAD_DIM, dtype=DTYPE, device=DEV)
    ks = [torch.randn(batch, num_kv_heads, kv_len, HEAD_DIM, dtype=DTYPE, device=DEV) for _ in range(num_copies)]
    vs = [torch.randn_like(k) for k in ks]
    gqa = num_heads != num_kv_heads

    def fn():
        with sdpa_kernel([backend]):
            for k, v in zip(ks, vs):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    try:
        return bench(fn) / num_copies
    except Exception as e:  # a backend may reject a shape (e.g. GQA): record, do not abort
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def decode_bytes(batch, kv_len, num_kv_heads):
    return 2 * batch * kv_len * num_kv_heads * HEAD_DIM * 2


def decode_grid(args, results, tuned: dict):
    batches = [1, 8, 32, 64] if not args.quick else [1, 8]
    lens = [1024, 4096, 16384, 32768] if not args.quick else [1024, 4096]
    heads = [(32, 32), (32, 8)]
    if SMOKE:
        batches, lens, heads = [2], [256], [(4, 4), (4, 1)]
    rows = []
    for num_heads, num_kv_heads in heads:
        for batch in batches:
            for kv_len in lens:
                nbytes = decode_bytes(batch, kv_len, num_kv_heads)
                copies = max(1, min(32, math.ceil(ROTATE_BYTES / nbytes)))
                row = dict(dtype=str(DTYPE).replace("torch.", ""), batch=batch, kv_len=kv_len,
                           num_heads=num_heads, num_kv_heads=num_kv_heads, kv_mb=nbytes / 1e6, copies=copies)
                try:
                    case = PagedDecodeCase(batch, kv_len, num_heads, num_kv_heads, copies)
                    kw = tuned.get("decode_kwargs", {})
                    row["splits"] = dec.choose_num_splits(batch, num_kv_heads, kv_len, num_sms(case.q.device))
                    if batch * kv_len <= 8 * 4096:  # self-check before timing
                        ref = case.reference()
                        row["err_unified"] = rel_err(case.run(0, PHI, **kw), ref)
                        row["err_unified_2launch"] = rel_err(case.run(0, PHI, fused_fallback=False, **kw), ref)
                        row["err_sync"] = rel_err(case.run(0, None, **kw), ref)
                        row["err_forced_fallback"] = rel_err(case.run(0, -40.0, **kw), ref)
                        row["err_forced_fallback_2launch"] = rel_err(case.run(0, -40.0, fused_fallback=False, **kw), ref)
                        ref = None
                        for key in [k for k in row if k.startswith("err_")]:
                            assert row[key] < TOL[DTYPE], (key, row[key], row)
                    case.stats.zero_()
                    case.run(0, PHI, **kw)
                    assert int(case.stats[1]) == 0, f"unified decode flagged rows at phi={PHI}: {case.stats.tolist()}"
                    row["fdpp_unified_us"] = case.timer(PHI, **kw)
                    row["fdpp_unified_2launch_us"] = case.timer(PHI, fused_fallback=False, **kw)
                    row["fdpp_unified_nofallback_us"] = case.timer(PHI, fallback=False, **kw)
                    row["fdpp_sync_us"] = case.timer(None, **kw)
                    case = None
                    _empty_cache()
                    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                        row[f"{name}_us"] = sdpa_decode_timer(batch, kv_len, num_heads, num_kv_heads, backend, copies)
                    _empty_cache()
                except AssertionError:
                    raise
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    traceback.print_exc()
                    _empty_cache()
                for key in list(row):
                    if key.endswith("_us") and isinstance(row[key], float):
                        row[key.replace("_us", "_tbs")] = nbytes / (row[key] * 1e-6) / 1e12
                peers = [row[k] for k in ("cudnn_us", "flash_us") if isinstance(row.get(k), float)]
                if peers and isinstance(row.get("fdpp_unified_us"), float):
                    row["speedup_vs_best_peer"] = min(peers) / row["fdpp_unified_us"]
                    row["speedup_vs_cudnn"] = (row["cudnn_us"] / row["fdpp_unified_us"]
                                               if isinstance(row.get("cudnn_us"), float) else None)
                    row["unified_vs_sync"] = row["fdpp_sync_us"] / row["fdpp_unified_us"]
                    row["fused_vs_2launch"] = row["fdpp_unified_2launch_us"] / row["fdpp_unified_us"]
                rows.append(row)
                print("decode", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    results.setdefault("decode", []).extend(rows)


def decode_tune(args, results):
    """Pick the decode kernel config and the split heuristic's constants on representative points,
    then install them as the module defaults (the grid below measures exactly what ships)."""
    cfg_points = [(1, 4096, 32, 32), (1, 16384, 32, 32), (1, 32768, 32, 8), (8, 4096, 32, 8),
                  (8, 4096, 32, 32), (64, 4096, 32, 8), (32, 4096, 32, 32), (64, 1024, 32, 32)]
    cfgs = [dict(block_n=bn, num_warps=w, num_stages=s) for bn, w, s in
            [(64, 4, 2), (64, 2, 3), (128, 4, 2), (64, 4, 3), (32, 4, 3), (128, 8, 3), (64, 8, 3), (128, 4, 3)]]
    split_points = [(1, 1024, 32, 32), (1, 4096, 32, 32), (1, 16384, 32, 32), (1, 1024, 32, 8), (1, 4096, 32, 8),
                    (1, 32768, 32, 8), (8, 1024, 32, 8), (8, 4096, 32, 32), (8, 16384, 32, 8), (32, 1024, 32, 8)]
    heuristics = [dict(target_programs_per_sm=t, min_tokens_per_split=m)
                  for t in (1, 2, 4, 8, 16) for m in (64, 128, 256, 512)]
    if SMOKE:
        cfg_points, cfgs, split_points = [(1, 256, 4, 4), (64, 64, 4, 4)], cfgs[:2], [(1, 256, 4, 1)]
    log = dict(cfg={}, splits={})
    sms = 132 if SMOKE else num_sms(torch.device("cuda"))
    chosen = {}
    for regime, target in (("split", dec.DECODE_CONFIG_SPLIT), ("batch", dec.DECODE_CONFIG_BATCH)):
        points = [p for p in cfg_points if (p[0] * p[3] >= sms) == (regime == "batch")]
        if not points:
            continue
        scores = {str(c): 0.0 for c in cfgs}
        for point in points:
            batch, kv_len, nh, nkv = point
            nbytes = decode_bytes(batch, kv_len, nkv)
            case = PagedDecodeCase(batch, kv_len, nh, nkv, max(1, min(32, math.ceil(ROTATE_BYTES / nbytes))))
            times = {}
            for cfg in cfgs:
                try:
                    times[str(cfg)] = case.timer(PHI, **cfg)
                except Exception as e:
                    times[str(cfg)] = f"failed: {e}"[:200]
            best = min(v for v in times.values() if isinstance(v, float))
            for k, v in times.items():
                scores[k] += math.log(v / best) if isinstance(v, float) else 10.0
            log["cfg"][str(point)] = {k: (nbytes / v / 1e6 if isinstance(v, float) else v) for k, v in times.items()}
            print("tune cfg", regime, point, {k: (round(v, 2) if isinstance(v, float) else v)
                                              for k, v in log["cfg"][str(point)].items()}, flush=True)
            case = None
            _empty_cache()
        best_cfg = eval(min(scores, key=scores.get))
        target.update(best_cfg)
        chosen[regime] = best_cfg
        print("tune: decode config", regime, best_cfg, flush=True)
    best_cfg = chosen

    penalty = {str(h): 0.0 for h in heuristics}
    for point in split_points:
        batch, kv_len, nh, nkv = point
        nbytes = decode_bytes(batch, kv_len, nkv)
        case = PagedDecodeCase(batch, kv_len, nh, nkv, max(1, min(32, math.ceil(ROTATE_BYTES / nbytes))))
        wanted = {dec.choose_num_splits(batch, nkv, kv_len, sms, **h) for h in heuristics}
        wanted |= {s for s in (1, 2, 4, 8, 16, 32, 64) if s * 64 <= kv_len}
        times = {sp: case.timer(PHI, num_splits=sp) for sp in sorted(wanted)}
        best = min(times.values())
        for h in heuristics:
            penalty[str(h)] += math.log(times[dec.choose_num_splits(batch, nkv, kv_len, sms, **h)] / best)
        log["splits"][str(point)] = {sp: nbytes / t / 1e6 for sp, t in times.items()}
        print("tune splits", point, {sp: round(v, 2) for sp, v in log["splits"][str(point)].items()}, flush=True)
        case = None
        _empty_cache()
    best_h = eval(min(penalty, key=penalty.get))
    dec.DECODE_TARGET_PROGRAMS_PER_SM = best_h["target_programs_per_sm"]
    dec.DECODE_MIN_TOKENS_PER_SPLIT = best_h["min_tokens_per_split"]
    print("tune: split heuristic", best_h, {k: round(v, 3) for k, v in penalty.items()}, flush=True)
    log["chosen_config"] = best_cfg
    log["chosen_heuristic"] = best_h
    log["heuristic_penalty"] = penalty
    results["decode_tune"] = log


# ------------------------------------------------------------------------------------------------
# Prefill
# ------------------------------------------------------------------------------------------------

class PagedPrefillCase:
    def __init__(self, batch, seq_len, num_heads, num_kv_heads):
        nb = seq_len // BLOCK_SIZE
        shape = (batch * nb, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
        self.k_cache = torch.randn(shape, dtype=DTYPE, device=DEV)
        self.v_cache = torch.randn(shape, dtype=DTYPE, device=DEV)
        perm = torch.randperm(batch * nb, device=DEV).to(torch.int32)
        self.block_tables = perm.view(batch, nb)
        self.context_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=DEV)
        self.cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=DEV)
        self.q = torch.randn(batch * seq_len, num_heads, HEAD_DIM, dtype=DTYPE, device=DEV)
        self.seq_len = seq_len
        self.stats = torch.zeros(2, dtype=torch.int64, device=DEV)
        self.out = torch.empty_like(self.q)

    def run(self, phi, **kw):
        return paged_prefill_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, self.cu,
            scale=HEAD_DIM ** -0.5, max_seqlen_q=self.seq_len, phi=phi, window=safe_window(DTYPE),
            stats=self.stats, out=self.out, **kw)

    def reference(self, seq=0, rows=256):
        """float64 reference for the last `rows` queries of sequence `seq`: [rows, H, D]."""
        H = self.q.shape[1]
        kvh = self.k_cache.shape[2]
        bt = self.block_tables[seq].long()
        k = self.k_cache[bt].reshape(-1, kvh, HEAD_DIM).double().repeat_interleave(H // kvh, 1)
        v = self.v_cache[bt].reshape(-1, kvh, HEAD_DIM).double().repeat_interleave(H // kvh, 1)
        L = self.seq_len
        rows = min(rows, L)
        q = self.q[seq * L + L - rows: (seq + 1) * L].double()
        s = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM ** -0.5
        qpos = torch.arange(L - rows, L, device=DEV)
        s = s.masked_fill(torch.arange(L, device=DEV)[None, :] > qpos[:, None], float("-inf"))
        return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v), (seq * L + L - rows, (seq + 1) * L)


def prefill_flops(batch, seq_len, num_heads):
    return 4 * batch * num_heads * seq_len * seq_len * HEAD_DIM / 2  # causal: half of QK^T and PV


def sdpa_prefill_timer(batch, seq_len, num_heads, num_kv_heads, backend):
    q = torch.randn(batch, num_heads, seq_len, HEAD_DIM, dtype=DTYPE, device=DEV)
    k = torch.randn(batch, num_kv_heads, seq_len, HEAD_DIM, dtype=DTYPE, device=DEV)
    v = torch.randn_like(k)
    gqa = num_heads != num_kv_heads

    def fn():
        with sdpa_kernel([backend]):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    try:
        return bench(fn)
    except Exception as e:
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def prefill_grid(args, results, tuned: dict):
    points = [(1, 1024), (1, 4096), (4, 2048), (1, 8192), (1, 16384)]
    heads = [(32, 32), (32, 8)]
    if args.quick:
        points = points[:2]
    if SMOKE:
        points, heads = [(2, 64)], [(2, 2), (2, 1)]
    rows = []
    for num_heads, num_kv_heads in heads:
        for batch, seq_len in points:
            flops = prefill_flops(batch, seq_len, num_heads)
            row = dict(dtype=str(DTYPE).replace("torch.", ""), batch=batch, seq_len=seq_len,
                       num_heads=num_heads, num_kv_heads=num_kv_heads)
            try:
                case = PagedPrefillCase(batch, seq_len, num_heads, num_kv_heads)
                kw = tuned.get("prefill_kwargs", {})
                ref, (a, b) = case.reference()  # self-check before timing
                row["err_unified"] = rel_err(case.run(PHI, **kw)[a:b], ref)
                row["err_sync"] = rel_err(case.run(None, **kw)[a:b], ref)
                row["err_forced_fallback"] = rel_err(case.run(-40.0, **kw)[a:b], ref)
                ref = None
                for key in [k for k in row if k.startswith("err_")]:
                    assert row[key] < TOL[DTYPE], (key, row[key], row)
                case.stats.zero_()
                case.run(PHI, **kw)
                assert int(case.stats[1]) == 0, f"unified prefill flagged rows at phi={PHI}: {case.stats.tolist()}"
                row["fdpp_unified_us"] = bench(lambda case=case, kw=kw: case.run(PHI, **kw))
                row["fdpp_unified_nofallback_us"] = bench(lambda case=case, kw=kw: case.run(PHI, fallback=False, **kw))
                row["fdpp_sync_us"] = bench(lambda case=case, kw=kw: case.run(None, **kw))
                case = None  # free the cache before the peers allocate theirs
                _empty_cache()
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                    row[f"{name}_us"] = sdpa_prefill_timer(batch, seq_len, num_heads, num_kv_heads, backend)
            except AssertionError:
                raise
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                traceback.print_exc()
            for key in list(row):
                if key.endswith("_us") and isinstance(row[key], float):
                    row[key.replace("_us", "_tflops")] = flops / (row[key] * 1e-6) / 1e12
            peers = {k: row[k] for k in ("cudnn_us", "flash_us") if isinstance(row.get(k), float)}
            if isinstance(row.get("fdpp_unified_us"), float):
                for k, v in peers.items():
                    row[f"speedup_vs_{k[:-3]}"] = v / row["fdpp_unified_us"]
                row["unified_vs_sync"] = row["fdpp_sync_us"] / row["fdpp_unified_us"]
            rows.append(row)
            print("prefill", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            _empty_cache()
    results.setdefault("prefill", []).extend(rows)


def prefill_tune(args, results):
    cfgs = [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in
            [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4),
             (64, 128, 4, 2), (128, 64, 8, 4), (128, 128, 8, 3)]]
    out = []
    for batch, seq_len, nkv in ([(1, 64, 2)] if SMOKE else [(1, 4096, 32), (1, 8192, 8)]):
        case = PagedPrefillCase(batch, seq_len, 32 if not SMOKE else 2, nkv)
        res = dict(point=[batch, seq_len, 32, nkv], unified={}, sync={})
        for cfg in (cfgs[:1] if SMOKE else cfgs):
            for mode, phi in (("unified", PHI), ("sync", None)):
                try:
                    us = bench(lambda case=case, phi=phi, cfg=cfg: case.run(phi, fallback=False, **cfg))
                    res[mode][str(cfg)] = prefill_flops(batch, seq_len, 32) / (us * 1e-6) / 1e12
                except Exception as e:
                    res[mode][str(cfg)] = f"failed: {type(e).__name__}: {e}"[:200]
        out.append(res)
        print("prefill_tune", json.dumps(res), flush=True)
        case = None
        _empty_cache()
    results["prefill_tune"] = out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def _f(x, nd=2):
    return f"{x:.{nd}f}" if isinstance(x, float) else ("-" if x is None else str(x)[:20])


def _geomean(xs):
    xs = [x for x in xs if isinstance(x, float) and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _target(name, value, goal, met, **extra):
    return dict(name=name, value=value, goal=goal, met=bool(met) if value is not None else False, **extra)


def targets(results) -> list:
    """The issue #11 targets (`attention.*`), each with the worst point where it is a minimum."""
    out = []
    dec_rows = [r for r in results.get("decode", []) if isinstance(r.get("fdpp_unified_us"), float)]
    if dec_rows:
        def worst(key, rows):
            rows = [r for r in rows if isinstance(r.get(key), float)]
            if not rows:
                return None, None
            r = min(rows, key=lambda r: r[key])
            return r[key], f"{r['dtype']} {r['batch']}x{r['kv_len']} {r['num_heads']}/{r['num_kv_heads']}"
        v, at = worst("speedup_vs_cudnn", dec_rows)
        out.append(_target("attention.decode_vs_cudnn_min", v, ">= 1.0 at every point", v is not None and v >= 1.0,
                           worst_point=at))
        copy = results.get("copy_tbs") or 0.0
        big = [dict(r, copy_frac=r["fdpp_unified_tbs"] / copy) for r in dec_rows if r["kv_mb"] >= 64 and copy > 0]
        v, at = worst("copy_frac", big)
        out.append(_target("attention.decode_copy_bw_frac_min", v, ">= 0.9 of copy bandwidth where KV >= 64 MB",
                           v is not None and v >= 0.9, worst_point=at, copy_tbs=copy))
        v, at = worst("unified_vs_sync", dec_rows)
        out.append(_target("attention.decode_unified_vs_sync_min", v, ">= 1.0 at every point",
                           v is not None and v >= 1.0, worst_point=at))
        g = _geomean([r.get("unified_vs_sync") for r in dec_rows])
        out.append(_target("attention.decode_unified_vs_sync_geomean", g, "report (paper: 1.14x)", True))
        g = _geomean([r.get("fused_vs_2launch") for r in dec_rows])
        out.append(_target("attention.decode_fused_vs_2launch_geomean", g, ">= 1.0 (one launch per layer)",
                           g is not None and g >= 1.0))
    pre_rows = [r for r in results.get("prefill", []) if isinstance(r.get("fdpp_unified_us"), float)]
    if pre_rows:
        def worst_p(key, rows):
            rows = [r for r in rows if isinstance(r.get(key), float)]
            if not rows:
                return None, None
            r = min(rows, key=lambda r: r[key])
            return r[key], f"{r['dtype']} {r['batch']}x{r['seq_len']} {r['num_heads']}/{r['num_kv_heads']}"
        v, at = worst_p("speedup_vs_cudnn", pre_rows)
        out.append(_target("attention.prefill_vs_cudnn_min", v, ">= 0.9 at 1k-16k", v is not None and v >= 0.9,
                           worst_point=at))
        v, at = worst_p("speedup_vs_cudnn", [r for r in pre_rows if r["seq_len"] >= 8192])
        if v is not None:
            out.append(_target("attention.prefill_vs_cudnn_min_8k_plus", v, ">= 1.0 at >= 8k", v >= 1.0,
                               worst_point=at))
        v, at = worst_p("unified_vs_sync", pre_rows)
        out.append(_target("attention.prefill_unified_vs_sync_min", v, ">= 1.05", v is not None and v >= 1.05,
                           worst_point=at))
    return out


def plot(results, path: str) -> bool:
    """TB/s (decode) and TFLOP/s (prefill) of fdpp unified vs cuDNN per point, one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return False
    dec_rows = [r for r in results.get("decode", []) if isinstance(r.get("fdpp_unified_tbs"), float)]
    pre_rows = [r for r in results.get("prefill", []) if isinstance(r.get("fdpp_unified_tflops"), float)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(dec_rows)), 9))
    for ax, rows, unit, lab in ((axes[0], dec_rows, "tbs", "TB/s"), (axes[1], pre_rows, "tflops", "TFLOP/s")):
        names = [f"{ {'float16': 'fp16', 'bfloat16': 'bf16'}.get(r['dtype'], r['dtype'])} {r['batch']}x{r.get('kv_len', r.get('seq_len'))} {r['num_heads']}/{r['num_kv_heads']}"
                 for r in rows]
        x = list(range(len(rows)))
        for key, label, off in ((f"fdpp_unified_{unit}", "fdpp unified", -0.3), (f"fdpp_sync_{unit}", "fdpp sync", -0.1),
                                (f"cudnn_{unit}", "cuDNN", 0.1), (f"flash_{unit}", "flash", 0.3)):
            ax.bar([i + off for i in x], [r.get(key) if isinstance(r.get(key), float) else 0 for r in rows],
                   width=0.2, label=label)
        if unit == "tbs" and results.get("copy_tbs"):
            ax.axhline(results["copy_tbs"], color="k", ls="--", lw=0.8, label="copy (read+write)")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=70, fontsize=7)
        ax.set_ylabel(lab)
        ax.set_title(("Decode" if unit == "tbs" else "Prefill") + f" ({results['gpu']}, {results['date']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(results) -> str:
    lines = [f"# Attention benchmark: {results['gpu']}, {results['date']}", "",
             f"`{results.get('command', '')}`; decode defaults: {results.get('decode_defaults')}",
             "", f"torch {results['torch']}, triton {results['triton']}, head_dim 128, "
             f"copy bandwidth {_f(results.get('copy_tbs'))} TB/s (eager 2 GB device-to-device copy, read + write"
             + ("" if results.get("copy_timing") == "events" else
                "; graph-timed in this run, which under-reads it: ANCHORS.md measured 4.27 TB/s on an H200")
             + "). Attention: CUDA-graph timed medians, inputs rotated through > L2.", ""]
    if results.get("targets"):
        lines += ["## Targets", "", "| target | value | goal | met | worst point |", "|---|---|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['name']} | {_f(t['value'], 3)} | {t['goal']} | {'yes' if t['met'] else 'NO'} | "
                         f"{t.get('worst_point', '')} |")
        lines.append("")
    if results.get("decode"):
        lines += ["## Decode (one query token; fdpp paged, block 16, random block order; peers contiguous)", "",
                  ("| dtype | batch x len (q/kv) | KV MB | splits | fdpp unified us (TB/s) | 2-launch us | "
                   "no-fallback us | fdpp sync us (TB/s) | cuDNN us (TB/s) | flash us (TB/s) | vs cuDNN | "
                   "vs best peer | unified/sync | err unified |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["decode"]:
            lines.append(
                f"| {r.get('dtype', 'float16')} | {r['batch']} x {r['kv_len']} ({r['num_heads']}/{r['num_kv_heads']}) | "
                f"{r['kv_mb']:.0f} | {r.get('splits', '-')} | "
                f"{_f(r.get('fdpp_unified_us'), 1)} ({_f(r.get('fdpp_unified_tbs'))}) | "
                f"{_f(r.get('fdpp_unified_2launch_us'), 1)} | {_f(r.get('fdpp_unified_nofallback_us'), 1)} | "
                f"{_f(r.get('fdpp_sync_us'), 1)} ({_f(r.get('fdpp_sync_tbs'))}) | "
                f"{_f(r.get('cudnn_us'), 1)} ({_f(r.get('cudnn_tbs'))}) | {_f(r.get('flash_us'), 1)} ({_f(r.get('flash_tbs'))}) | "
                f"{_f(r.get('speedup_vs_cudnn'))}x | {_f(r.get('speedup_vs_best_peer'))}x | "
                f"{_f(r.get('unified_vs_sync'))}x | {_f(r.get('err_unified'), 6)} |")
    if results.get("prefill"):
        lines += ["", "## Prefill (causal; TFLOP/s)", "",
                  ("| dtype | batch x len (q/kv) | fdpp unified | fdpp sync | cuDNN | flash | vs cuDNN | vs flash | "
                   "unified/sync | err unified |"), "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["prefill"]:
            lines.append(
                f"| {r.get('dtype', 'float16')} | {r['batch']} x {r['seq_len']} ({r['num_heads']}/{r['num_kv_heads']}) | "
                f"{_f(r.get('fdpp_unified_tflops'), 0)} | {_f(r.get('fdpp_sync_tflops'), 0)} | "
                f"{_f(r.get('cudnn_tflops'), 0)} | {_f(r.get('flash_tflops'), 0)} | {_f(r.get('speedup_vs_cudnn'))}x | "
                f"{_f(r.get('speedup_vs_flash'))}x | {_f(r.get('unified_vs_sync'))}x | {_f(r.get('err_unified'), 6)} |")
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few points only")
    ap.add_argument("--tune", action="store_true", help="pick the decode config and split heuristic first")
    ap.add_argument("--tune-prefill", action="store_true", help="also sweep prefill tile configs")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16 (default both)")
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="write attention_bench.json/.md/.png here (default: $OUT when set)")
    ap.add_argument("--results-dir", default=None, help="also write attention_<gpu>_<date>.json/.md/.png here")
    ap.add_argument("--from-json", default=None, help="only render the markdown of an earlier JSON")
    args = ap.parse_args()
    global DTYPE
    try:
        dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    except KeyError as e:
        ap.error(f"--dtypes: unknown dtype {e}; use a comma-separated subset of {sorted(DTYPES)}")

    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        print(markdown(results))
        if args.results_dir:
            stem = os.path.splitext(os.path.basename(args.from_json))[0]
            _write(os.path.join(args.results_dir, stem + ".md"), markdown(results))
        return

    torch.manual_seed(0)
    results = dict(gpu="cpu-smoke" if SMOKE else torch.cuda.get_device_name(),
                   command=" ".join(sys.argv), date=datetime.date.today().isoformat(),
                   torch=torch.__version__, triton=triton.__version__, phi=PHI)
    t0 = time.time()
    results["copy_tbs"] = copy_bandwidth()
    results["copy_timing"] = "events"
    print("copy TB/s", results["copy_tbs"], flush=True)
    tuned: dict = {}
    out_dir = args.out
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    def save():
        if out_dir:
            _write(os.path.join(out_dir, "attention_bench.json"), json.dumps(results, indent=1))

    if args.tune and not args.skip_decode:
        decode_tune(args, results)
        save()
    if args.tune_prefill and not args.skip_prefill:
        prefill_tune(args, results)
        save()
    results["decode_defaults"] = dict(config_split=dict(dec.DECODE_CONFIG_SPLIT),
                                      config_batch=dict(dec.DECODE_CONFIG_BATCH),
                                      target_programs_per_sm=dec.DECODE_TARGET_PROGRAMS_PER_SM,
                                      min_tokens_per_split=dec.DECODE_MIN_TOKENS_PER_SPLIT)
    for dtype in dtypes:
        DTYPE = dtype
        if not args.skip_decode:
            decode_grid(args, results, tuned)
            save()
        if not args.skip_prefill:
            prefill_grid(args, results, tuned)
            save()
    results["wall_s"] = time.time() - t0
    results["targets"] = targets(results)
    save()
    md = markdown(results)
    print(md)
    if out_dir:
        _write(os.path.join(out_dir, "attention_bench.md"), md)
        plot(results, os.path.join(out_dir, "attention_bench.png"))
    if args.results_dir:
        gpu = results["gpu"].replace(" ", "_").replace("/", "_")
        stem = os.path.join(args.results_dir, f"attention_{gpu}_{results['date']}")
        _write(stem + ".json", json.dumps(results, indent=1))
        _write(stem + ".md", md)
        plot(results, stem + ".png")


if __name__ == "__main__":
    main()
