"""``fdpp tune``: build the heuristic-dataflow table for the current GPU.

Profiles every linear shape of a model with each GEMM implementation (gemv, flat, cuBLAS) and their
tile configs over M = 1..max-m, finds the inflection points M1/M2 and writes a JSON table that the
``table`` linear backend then uses on this GPU (found by GPU name).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DTYPES = ("float16", "bfloat16")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``tune`` subcommand on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "tune",
        help="profile GEMM implementations on this GPU and write the dataflow lookup table",
        description=(
            "Profile the GEMV (CUDA cores), flat GEMM (tensor cores) and cuBLAS on every linear shape of a "
            "model over M = 1..max-m, pick the fastest implementation and kernel config per M range, and "
            "write the lookup table the 'table' linear backend dispatches with on this GPU."
        ),
    )
    p.add_argument(
        "--model",
        default="llama-2-7b",
        help="a preset name (llama-2-7b, llama-2-13b, llama-3-8b, opt-6.7b, chatglm2-6b) or a model folder "
        "holding a Hugging Face config.json; repeat the command for more models, entries accumulate in --out "
        "(default: %(default)s)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float16",
                   help="weight and activation dtype to tune for (default: %(default)s)")
    p.add_argument("--weight-format", default=None, metavar="FORMAT",
                   help="profile the quantized-weight kernels for this packed format (fp8, int8, int4, q8_0, q4_0, "
                   "q4_1, q4_k, q5_k, q6_k) instead of dense weights; --dtype is then the activations' dtype")
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128),
                   help="int4 group size for --weight-format int4 (default: %(default)s)")
    p.add_argument("--max-m", type=int, default=512,
                   help="largest batch size M to profile; larger M uses the last range (default: %(default)s)")
    p.add_argument(
        "--out",
        default=None,
        help="table file to write (merged with its existing entries); default: the per-GPU file in "
        "$FDPP_CACHE_DIR/dataflow or ~/.cache/fdpp/dataflow, which dispatch loads automatically",
    )
    p.add_argument("--quick", action="store_true",
                   help="profile fewer M values and tile configs (about 4x faster, slightly worse choices)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="profile one rank's shapes of the model sharded over N ranks (what each rank looks up)")
    p.add_argument("--no-lm-head", action="store_true",
                   help="skip the LM head shape (its weight is the largest; it runs once per step)")
    p.set_defaults(func=run)
    return p


def resolve_shapes(model: str, *, with_lm_head: bool = True) -> dict[str, tuple[int, int]]:
    """Linear shapes of a preset name or of a folder / config.json path."""
    from fdpp.dataflow.shapes import PRESET_SHAPES, linear_shapes, preset_shapes

    path = Path(model)
    if path.exists():
        cfg_path = path / "config.json" if path.is_dir() else path
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{model}: no config.json found; pass a model folder or a preset name")
        from fdpp.config import ModelConfig

        shapes = linear_shapes(ModelConfig.from_hf_dict(json.loads(cfg_path.read_text())))
        if not with_lm_head:
            shapes.pop("lm_head", None)
        return shapes
    try:
        from fdpp.models import presets  # provided by the engine owner; optional here

        hf = presets.get_preset(model) if hasattr(presets, "get_preset") else None
        if hf is not None:
            from fdpp.config import ModelConfig

            shapes = linear_shapes(hf if hasattr(hf, "hidden_size") else ModelConfig.from_hf_dict(hf))
            if not with_lm_head:
                shapes.pop("lm_head", None)
            return shapes
    except (ImportError, KeyError):
        pass
    try:
        return preset_shapes(model, with_lm_head=with_lm_head)
    except KeyError:
        raise KeyError(f"unknown model {model!r}: pass a folder with config.json or one of "
                       f"{sorted(PRESET_SHAPES)}") from None


def run(args: argparse.Namespace) -> int:
    """Run ``fdpp tune``; returns the process exit code."""
    import torch

    from fdpp.dataflow.table import DispatchTable, gpu_slug, user_table_dir
    from fdpp.dataflow.tuner import tune_model

    if not torch.cuda.is_available():
        print("fdpp tune: no CUDA GPU is visible; tuning measures kernels on the GPU that will run them",
              file=sys.stderr)
        return 2
    if args.max_m < 1:
        print(f"fdpp tune: --max-m must be >= 1, got {args.max_m}", file=sys.stderr)
        return 2
    weight_format = getattr(args, "weight_format", None)
    if weight_format is not None:
        from fdpp.quant.formats import FORMATS

        weight_format = weight_format.lower()
        if weight_format not in FORMATS:
            print(f"fdpp tune: --weight-format {args.weight_format!r} is not a packed format; choose one of "
                  f"{', '.join(FORMATS)}", file=sys.stderr)
            return 2
    try:
        shapes = resolve_shapes(args.model, with_lm_head=not args.no_lm_head)
        tp = getattr(args, "tensor_parallel_size", 1)
        if tp > 1:
            from fdpp.distributed.shapes import model_config_for, rank_linear_shapes

            shapes = rank_linear_shapes(model_config_for(args.model), tp, with_lm_head=not args.no_lm_head)
    except (KeyError, FileNotFoundError, ValueError) as exc:
        print(f"fdpp tune: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else user_table_dir() / f"{gpu_slug(gpu)}.json"
    table = DispatchTable.load(out) if out.is_file() else DispatchTable(gpu)
    if weight_format is not None:
        from fdpp.dataflow.tuner import tunable_shapes

        shapes = tunable_shapes(shapes, weight_format)
    fmt_note = f", weights {weight_format}" if weight_format else ""
    print(f"fdpp tune: {gpu}, {args.dtype}{fmt_note}, {len(shapes)} shapes of {args.model}, M <= {args.max_m}"
          f"{' (quick)' if args.quick else ''}")
    table = tune_model(shapes, getattr(torch, args.dtype), max_m=args.max_m, quick=args.quick, table=table,
                       weight_format=weight_format, group_size=args.group_size)
    table.meta["torch"] = torch.__version__
    path = table.save(out)
    for name, (n, k) in shapes.items():
        e = table.get(args.dtype, n, k, weight_format)
        print(f"  {name:8s} {n:6d}x{k:<6d} M1={e.m1} M2={e.m2}  "
              + ", ".join(f"{r.m_min}-{r.m_max}:{r.impl}" for r in e.ranges))
    print(f"fdpp tune: wrote {path}")
    if os.environ.get("FDPP_DATAFLOW_TABLE") and Path(os.environ["FDPP_DATAFLOW_TABLE"]) != path:
        print("fdpp tune: note: $FDPP_DATAFLOW_TABLE points elsewhere and takes precedence", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m fdpp.cli.tune``) until the ``fdpp`` CLI wires the subcommand."""
    parser = argparse.ArgumentParser(prog="fdpp")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
