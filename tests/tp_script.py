"""Run under torchrun by tests/test_tensor_parallel.py: every family's tiny checkpoint at TP = WORLD_SIZE.

Rank 0 builds an engine per checkpoint (joining torchrun's rendezvous) and writes, per model, the prompt
logits and the greedy tokens to ``--out`` (JSON); the other ranks serve each engine with ``run_worker``.
One process group serves all the models in turn."""
from __future__ import annotations

import argparse
import json
import os

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("models", nargs="+")
    args = p.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from tests.tp_models import PROMPT, greedy_and_logits

    results = {}
    for path in args.models:
        if rank != 0:
            from fdpp.engine.executor import run_worker

            run_worker("cpu")
            continue
        results[path] = greedy_and_logits(path, tensor_parallel_size=world)
        results[path]["logits"] = results[path]["logits"].tolist()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"prompt": PROMPT, "results": results}, f)


if __name__ == "__main__":
    main()
