"""Small helpers shared across fdpp's layers (no fdpp imports, and no torch import, so that the CLI can
print status before torch loads: anything may use them)."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


@functools.lru_cache(maxsize=64)  # NOTE: called on the dispatch path: one dict lookup after the first
def dtype_name(dtype: Any) -> str:
    """"float16" for torch.float16 (and for "float16" / "fp16" / "half" / "torch.float16")."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def cache_dir(*parts: str) -> str:
    """fdpp's cache directory ($FDPP_CACHE_DIR, else ~/.cache/fdpp), joined with ``parts``."""
    base = os.environ.get("FDPP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fdpp")
    return os.path.join(base, *parts)


@contextlib.contextmanager
def phase(desc: str, enabled: bool = True) -> Iterator[None]:
    """One status line on stderr for a start-up phase that has no progress bar of its own:
    ``desc ...`` when it starts, `` done (2.3 s)`` appended when it ends (nothing when disabled)."""
    if not enabled:
        yield
        return
    t0 = time.perf_counter()
    sys.stderr.write(f"{desc} ...")
    sys.stderr.flush()
    ok = False
    try:
        yield
        ok = True
    finally:
        sys.stderr.write(f" {'done' if ok else 'failed'} ({time.perf_counter() - t0:.1f} s)\n")
        sys.stderr.flush()


def free_cpu_cores() -> int:
    """CPU cores this process may use that are not busy now: the cores of its affinity mask minus the
    one-minute load average of the machine (at least 1). A default for torch's intra-op threads: on a
    shared machine, more threads than free cores slows every matmul down (threads wait on each other)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        allowed = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(allowed, allowed - int(busy + 0.5)))
