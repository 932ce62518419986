"""Write a dataflow table that overrides one shape's choice at one M, for A/B runs through FDPP_DATAFLOW_TABLE
(the engine merges it over the shipped table, fdpp.dataflow.table.table_paths):

    python bench/table_override.py --dtype bfloat16 --n 6144 --k 4096 --m 1 --impl gemv \\
        --config '{"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 1024, "SPLIT_K": 1, "num_warps": 4}' --out /tmp/t.json
    FDPP_DATAFLOW_TABLE=/tmp/t.json python bench/decode_profile.py --model llama-3-8b --dtype bfloat16 ...

The shape's shipped entry (or, without one, a single range of ``--impl``) is copied and the range holding M
is split so that M alone takes ``--impl`` / ``--config``; the other M keep their choice.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def override(table, dtype: str, n: int, k: int, m: int, impl: str, config: dict | None, name: str = ""):
    """A new one-entry DispatchTable: ``table``'s (dtype, n, k) entry with M = m served by (impl, config)."""
    from fdpp.dataflow.table import DispatchTable, MRange, ShapeEntry

    entry = table.get(dtype, n, k) if table is not None else None
    ranges = [MRange(r.m_min, r.m_max, r.impl, r.config) for r in entry.ranges] if entry else [
        MRange(1, max(m, 1), impl, config)]
    out = []
    for r in ranges:
        if r.m_min <= m <= r.m_max:
            if r.m_min < m:
                out.append(MRange(r.m_min, m - 1, r.impl, r.config))
            out.append(MRange(m, m, impl, config))
            if m < r.m_max:
                out.append(MRange(m + 1, r.m_max, r.impl, r.config))
        else:
            out.append(r)
    if out[-1].m_max < m:  # M past the entry's last range
        out.append(MRange(out[-1].m_max + 1, m, impl, config))
    gpu = table.gpu if table is not None else ""
    return DispatchTable(gpu, [ShapeEntry(dtype, n, k, out, name=entry.name if entry else name)],
                         meta={"source": "bench/table_override.py"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default="fdpp/dataflow/tables/nvidia-h200.json", help="the table to start from")
    ap.add_argument("--dtype", required=True, choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--impl", required=True, choices=["gemv", "flat", "cublas"])
    ap.add_argument("--config", default=None, help="JSON kernel config (none for cublas)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from fdpp.dataflow.table import DispatchTable

    base = DispatchTable.load(args.table) if os.path.exists(args.table) else None
    t = override(base, args.dtype, args.n, args.k, args.m, args.impl, json.loads(args.config) if args.config else None)
    print("wrote", t.save(args.out), [r.to_dict() for r in t.get(args.dtype, args.n, args.k).ranges])


if __name__ == "__main__":
    main()
