"""``fdpp calibrate``: measure attention-score statistics and choose the unified max value (phi)."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose the unified max value of the asynchronized softmax for a model",
        description="Runs a few hundred tokens of built-in text (or --text/--file) through the model, "
        "records every layer's attention-score distribution, and stores phi (per layer or per model) "
        "and the safe window in the calibration cache, where the engine finds it. A model whose "
        "score range is too wide for one phi (as OPT-6.7B in the paper) is marked 'synchronized'.",
    )
    from fdpp.cli.common import add_model_args

    p.add_argument("--text", action="append", default=None, help="calibration text (repeatable)")
    p.add_argument("--file", default=None, help="a text file to calibrate on")
    p.add_argument("--output", "-o", default=None, help="also write the result JSON here")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fdpp.cli.common import llm_from_args
    from fdpp.engine.loading import calibrate_engine, set_phi

    args.calibration = "off"  # calibrating: do not load (or make) a cached one first
    llm = llm_from_args(args)
    texts = list(args.text or [])
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            texts.append(f.read())
    result = calibrate_engine(llm.engine, texts or None, save=True)
    set_phi(llm.engine.model, result)
    if args.output:
        result.save(args.output)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        from fdpp.calibration import cache_path

        print(result.summary())
        print(f"saved to {cache_path(result.model_key)}")
    return 0
