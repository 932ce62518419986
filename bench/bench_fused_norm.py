"""RMSNorm in the GEMV / flat-GEMM prologue against the norm kernel + the same linear, per M: where does
fusing pay? The evidence for ``fdpp.ops.linear.fuses_norm``.

    python bench/bench_fused_norm.py --out $OUT       # Llama-2-7B and Llama-3-8B qkv and gate_up, fp16 + bf16

Each point: the dispatched implementation (the dataflow table's choice at that M), ``linear(x, W,
norm_weight=g)`` forced fused and forced separate (``rms_norm`` kernel, then ``linear``), both timed by
CUDA-graph replay with weights rotated through more memory than L2 (fdpp.dataflow.tuner.GraphTimer,
medians), and the relative error of each against a float64 reference. Writes
fused_norm_<gpu>_<date>.json/.md with a target per (model, layer, dtype): the engine's rule
(``fuses_norm``) picks the faster side at every M, within 2%.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
LAYERS = {"qkv": None, "gate_up": "silu_and_mul"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-2-7b", "llama-3-8b"])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--ms", type=int, nargs="+", default=MS)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--update-table", default=None, metavar="PATH",
                    help="write the per-shape decision into this dataflow table (e.g. "
                    "fdpp/dataflow/tables/nvidia-h200.json): each measured GEMV range gets \"separate_norm\": true "
                    "where the norm kernel + the plain GEMV was > 2%% faster, else loses the key")
    args = ap.parse_args()

    from fdpp.dataflow.shapes import PRESET_SHAPES
    from fdpp.dataflow.table import choose_impl
    from fdpp.dataflow.tuner import GraphTimer
    from fdpp.kernels.flat_gemm import flat_gemm
    from fdpp.kernels.gemv import gemv
    from fdpp.ops.linear import fuses_norm
    from fdpp.ops.norm import rms_norm

    kernels = {"gemv": gemv, "flat": flat_gemm}
    dev = torch.device("cuda")
    rows, targets = [], []
    for model in args.models:
        for layer, act in LAYERS.items():
            n, k = PRESET_SHAPES[model][layer]
            for dt in args.dtypes:
                dtype = getattr(torch, dt)
                timer = GraphTimer(dev)
                g = (torch.rand(k, device=dev) + 0.5).to(dtype)
                picked_ok = True
                for m in args.ms:
                    impl, cfg = choose_impl(dev, dtype, n, k, m)
                    if impl not in kernels:
                        print(f"{model} {layer} {dt} M={m}: {impl} (never fused)", flush=True)
                        continue
                    fn = kernels[impl]

                    def fused(x, w, fn=fn, cfg=cfg, act=act, g=g):
                        return fn(x, w, act=act, config=cfg, norm_weight=g, norm_eps=1e-5)

                    def separate(x, w, fn=fn, cfg=cfg, act=act, g=g):
                        return fn(rms_norm(x, g, 1e-5), w, act=act, config=cfg)

                    t_f = timer.time_fn(fused, n, k, m, dtype)
                    t_s = timer.time_fn(separate, n, k, m, dtype)
                    x, w = timer.inputs(m, k, dtype), timer.weights(n, k, dtype)[0]
                    xd = x.double()
                    xn = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * g.double()
                    ref = xn @ w.double().T
                    if act:
                        gate, up = ref.chunk(2, dim=-1)
                        ref = torch.nn.functional.silu(gate) * up
                    errs = [((f(x, w).double() - ref).norm() / ref.norm()).item() for f in (fused, separate)]
                    rule = fuses_norm(impl, cfg)
                    best_fused = t_f < t_s
                    ok = (t_f if rule else t_s) <= 1.02 * min(t_f, t_s)
                    picked_ok &= ok
                    rows.append({"model": model, "layer": layer, "n": n, "k": k, "dtype": dt, "m": m, "impl": impl,
                                 "fused_us": t_f, "separate_us": t_s, "fused_over_separate": t_f / t_s,
                                 "rel_err_fused": errs[0], "rel_err_separate": errs[1], "rule_fuses": rule,
                                 "rule_ok": ok})
                    print(f"{model} {layer} {dt} M={m:3d} {impl:5s}: fused {t_f:7.1f} us, separate {t_s:7.1f} us "
                          f"({t_f / t_s:.3f}x){' <- faster fused' if best_fused else ''}; rule "
                          f"{'fuses' if rule else 'separate'}{'' if ok else ' (WRONG SIDE)'}; err {errs[0]:.1e} / "
                          f"{errs[1]:.1e}", flush=True)
                targets.append({"name": f"gemm.{model}.{layer}.{dt}.fused_norm_rule_picks_faster",
                                "value": picked_ok, "goal": "rule within 2% of the faster side at every M",
                                "met": bool(picked_ok)})
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    if args.update_table:
        update_table(args.update_table, rows)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"fused_norm_{gpu.replace(' ', '_')}_{date}")
    with open(stem + ".json", "w") as f:
        json.dump({"gpu": gpu, "date": date, "torch": torch.__version__, "argv": sys.argv,
                   "rows": rows, "targets": targets}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# RMSNorm fused into the linear's prologue vs separate ({gpu}, {date})\n\n"
                "`python bench/bench_fused_norm.py`; the rule (`fdpp.ops.linear.fuses_norm`) fuses the GEMV only."
                "\n\n| model | layer | dtype | M | impl | fused us | separate us | "
                "fused/separate | rule |\n|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['model']} | {r['layer']} | {r['dtype']} | {r['m']} | {r['impl']} | {r['fused_us']:.1f} | "
                    f"{r['separate_us']:.1f} | {r['fused_over_separate']:.3f} | "
                    f"{'fused' if r['rule_fuses'] else 'separate'}{'' if r['rule_ok'] else ' (wrong side)'} |\n")
    print("wrote", stem + ".json")


def update_table(path: str, rows: list[dict], margin: float = 1.02) -> list[str]:
    """Record each measured GEMV point's faster side in the table at ``path`` (``set_separate_norm``):
    separate where fused took more than ``margin`` x the separate time, fused otherwise; returns what changed."""
    from fdpp.dataflow.table import DispatchTable, set_separate_norm

    table = DispatchTable.load(path)
    changed = []
    for r in rows:
        if r["impl"] != "gemv":
            continue
        separate = r["fused_us"] > margin * r["separate_us"]
        before = (table.lookup(r["dtype"], r["n"], r["k"], r["m"]) or (None, None))[1] or {}
        if set_separate_norm(table, r["dtype"], r["n"], r["k"], r["m"], separate) and \
                bool(before.get("separate_norm")) != separate:
            changed.append(f"{r['model']} {r['layer']} {r['dtype']} M={r['m']}: {'separate' if separate else 'fused'}")
    table.meta["fused_norm_source"] = "bench/bench_fused_norm.py --update-table"
    table.save(path)
    print(f"updated {path}: {changed or 'no change'}", flush=True)
    return changed


if __name__ == "__main__":
    main()
