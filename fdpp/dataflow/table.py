"""The heuristic dataflow lookup table: which GEMM implementation (and kernel config) runs a linear layer
of shape [N, K] at batch size M on a given GPU and dtype.

ImplA = ``gemv`` (CUDA cores) for M < M1, ImplB = ``flat`` (flat GEMM on tensor cores) for M1 <= M < M2,
ImplC = ``cublas`` (torch.nn.functional.linear) for M >= M2; each M range also carries the best kernel
config found by the tuner. Tables are JSON files, one per GPU name, holding entries keyed by dtype and
[N, K]:

    {"format": "fdpp-dataflow/1", "gpu": "NVIDIA H100 80GB HBM3", "created": "...",
     "entries": [{"dtype": "float16", "n": 4096, "k": 4096, "name": "o", "m1": 4, "m2": 128,
                  "ranges": [{"m_min": 1, "m_max": 3, "impl": "gemv", "config": {...}}, ...]}]}

Quantized weights have their own entries: an entry's ``weight_format`` (absent for dense weights) is a
packed format of ``fdpp.quant`` (fp8, int8, int4, q4_k, ...), and lookups pass the weight's format; the
dtype is then the activations' dtype.

Lookup is O(1) and host-only (a dict get and a list index; the GPU name is read once per device and
cached), so it can sit on the decode hot path and inside CUDA-graph capture. Shapes or GPUs without an
entry fall back to ``rule_choice``.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fdpp.utils import cache_dir, dtype_name

FORMAT = "fdpp-dataflow/1"
IMPLS = ("gemv", "flat", "cublas")
SHIPPED_DIR = Path(__file__).resolve().parent / "tables"

# The fallback rule's inflection points (no table for this GPU, dtype or shape), from the H200 sweep
# (bench/results): the GEMV wins only at M = 1, the flat GEMM up to M = 32..64, cuBLAS above (its time is
# flat up to M ~ 64..128 because it pads M).
RULE_M1 = 1  # gemv for M <= RULE_M1
RULE_M2 = 64  # flat for RULE_M1 < M <= RULE_M2, cuBLAS above
# Quantized weights: cuBLAS means dequantize-then-GEMM (or FP8 W8A8), which pays a full dense write and
# read of the weight; the flat GEMM on packed weights stays ahead of it longer (a guess until tuned).
RULE_M2_QUANT = 128


Choice = tuple  # (impl: str, config: dict | None)


def rule_choice(m: int, weight_format: str | None = None) -> Choice:
    """The fallback when no table entry exists: gemv for M = 1, flat GEMM for M <= 64 (128 for quantized
    weights), else cuBLAS."""
    if m <= RULE_M1:
        return ("gemv", None)
    if m <= (RULE_M2 if weight_format is None else RULE_M2_QUANT):
        return ("flat", None)
    return ("cublas", None)


@dataclass
class MRange:
    """One contiguous range of M (inclusive bounds) served by one implementation and config."""

    m_min: int
    m_max: int
    impl: str
    config: dict | None = None

    def to_dict(self) -> dict:
        return {"m_min": self.m_min, "m_max": self.m_max, "impl": self.impl, "config": self.config}


@dataclass
class ShapeEntry:
    """The tuned dataflow of one [N, K] shape and dtype. Ranges must cover M = 1..max contiguously;
    M above the last range uses the last range's choice."""

    dtype: str
    n: int
    k: int
    ranges: list[MRange]
    name: str = ""
    timings: dict | None = field(default=None, repr=False)  # optional raw tuner data, kept for reports
    weight_format: str | None = None  # a packed format (fdpp.quant) or None for dense weights
    _by_m: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ValueError(f"dataflow entry {self.n}x{self.k} {self.dtype} has no M ranges")
        self.ranges = sorted(self.ranges, key=lambda r: r.m_min)
        expect = 1
        for r in self.ranges:
            if r.impl not in IMPLS:
                raise ValueError(f"dataflow entry {self.n}x{self.k}: unknown impl {r.impl!r} (know {IMPLS})")
            if r.m_min != expect or r.m_max < r.m_min:
                raise ValueError(
                    f"dataflow entry {self.n}x{self.k} {self.dtype}: M ranges must tile 1..max without gaps, "
                    f"got [{r.m_min}, {r.m_max}] where M={expect} was expected next"
                )
            expect = r.m_max + 1
        self.index()

    def index(self) -> None:
        """Precompute the per-M choice (the O(1) hot-path lookup); again after a range's config changed."""
        self._by_m = [None]
        for r in self.ranges:
            self._by_m.extend([(r.impl, r.config)] * (r.m_max - r.m_min + 1))

    @property
    def max_m(self) -> int:
        return self.ranges[-1].m_max

    @property
    def m1(self) -> int | None:
        """First M not served by the GEMV (ImplA -> B/C), None when the GEMV serves every tuned M."""
        return next((r.m_min for r in self.ranges if r.impl != "gemv"), None)

    @property
    def m2(self) -> int | None:
        """First M served by cuBLAS (ImplB -> C), None when cuBLAS is never chosen."""
        return next((r.m_min for r in self.ranges if r.impl == "cublas"), None)

    def choose(self, m: int) -> Choice:
        by_m = self._by_m
        return by_m[m] if m < len(by_m) else by_m[-1]

    def to_dict(self) -> dict:
        d = {"dtype": self.dtype, "n": self.n, "k": self.k, "name": self.name, "m1": self.m1, "m2": self.m2,
             "ranges": [r.to_dict() for r in self.ranges]}
        if self.weight_format is not None:
            d["weight_format"] = self.weight_format
        if self.timings is not None:
            d["timings"] = self.timings
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ShapeEntry:
        return cls(
            dtype=d["dtype"], n=int(d["n"]), k=int(d["k"]), name=d.get("name", ""),
            ranges=[MRange(int(r["m_min"]), int(r["m_max"]), r["impl"], r.get("config")) for r in d["ranges"]],
            timings=d.get("timings"), weight_format=d.get("weight_format"),
        )


class DispatchTable:
    """All tuned shapes of one GPU: ``{(dtype, N, K, weight_format): ShapeEntry}``."""

    def __init__(self, gpu: str, entries: list[ShapeEntry] | None = None, meta: dict | None = None):
        self.gpu = gpu
        self.meta = dict(meta or {})
        self.entries: dict[tuple[str, int, int, str | None], ShapeEntry] = {}
        for e in entries or []:
            self.add(e)

    def add(self, entry: ShapeEntry) -> None:
        """Add or replace the entry of (dtype, N, K, weight format)."""
        self.entries[(entry.dtype, entry.n, entry.k, entry.weight_format)] = entry

    def merge(self, other: DispatchTable) -> None:
        """Take every entry of ``other``, replacing ours where both have one."""
        for e in other.entries.values():
            self.add(e)

    def get(self, dtype: torch.dtype | str, n: int, k: int, weight_format: str | None = None) -> ShapeEntry | None:
        return self.entries.get((dtype_name(dtype), n, k, weight_format))

    def lookup(self, dtype: torch.dtype | str, n: int, k: int, m: int,
               weight_format: str | None = None) -> Choice | None:
        """(impl, config) for this shape, weight format and M, or None when there is no entry."""
        entry = self.entries.get((dtype_name(dtype), n, k, weight_format))
        return entry.choose(m) if entry is not None else None

    def to_dict(self) -> dict:
        return {"format": FORMAT, "gpu": self.gpu, **self.meta,
                "entries": [e.to_dict() for e in sorted(self.entries.values(),
                                                        key=lambda e: (e.weight_format or "", e.dtype, e.n, e.k))]}

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "<dict>") -> DispatchTable:
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: not a dataflow table (format {d.get('format')!r}, expected {FORMAT!r})")
        meta = {k: v for k, v in d.items() if k not in ("format", "gpu", "entries")}
        try:
            entries = [ShapeEntry.from_dict(e) for e in d.get("entries", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: malformed dataflow entry: {exc}") from exc
        return cls(d.get("gpu", ""), entries, meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (creating parent folders); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.meta.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DispatchTable:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"dataflow table {path} does not exist; build one with `fdpp tune`") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"dataflow table {path} is not valid JSON ({exc}); rebuild it with `fdpp tune`") from exc
        return cls.from_dict(d, source=str(path))


# ----------------------------------------------------------------------------------------------------
# Finding the table of a GPU
# ----------------------------------------------------------------------------------------------------


def set_separate_norm(table: DispatchTable, dtype: torch.dtype | str, n: int, k: int, m: int,
                      separate: bool) -> bool:
    """Mark the GEMV range serving M of the (dtype, N, K) entry so that a fused RMSNorm runs as its own kernel
    first (``separate``; ``"separate_norm": true`` in its config, read by ``fdpp.ops.linear.fuses_norm``) or in
    the GEMV's prologue (the key removed). Returns whether the entry has such a range (False: no entry, or
    M is not served by the GEMV)."""
    entry = table.get(dtype, n, k)
    if entry is None:
        return False
    for r in entry.ranges:
        if r.m_min <= m <= r.m_max and r.impl == "gemv":
            cfg = dict(r.config or {})
            if separate:
                cfg["separate_norm"] = True
            else:
                cfg.pop("separate_norm", None)
            r.config = cfg
            entry.index()
            return True
    return False


def gpu_slug(gpu_name: str) -> str:
    """File-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")


def user_table_dir() -> Path:
    """Where ``fdpp tune`` writes tables by default ($FDPP_CACHE_DIR or ~/.cache/fdpp, then dataflow/)."""
    return Path(cache_dir("dataflow"))


def table_paths(gpu_name: str) -> list[Path]:
    """Candidate files for a GPU, lowest priority first: shipped, user cache, $FDPP_DATAFLOW_TABLE."""
    slug = gpu_slug(gpu_name)
    paths = [SHIPPED_DIR / f"{slug}.json", user_table_dir() / f"{slug}.json"]
    env = os.environ.get("FDPP_DATAFLOW_TABLE")
    if env:
        paths.append(Path(env))
    return paths


def load_table_for_gpu(gpu_name: str) -> DispatchTable | None:
    """Merge every existing table file of ``gpu_name`` (later files override earlier); None if none exist."""
    table = None
    for path in table_paths(gpu_name):
        if not path.is_file():
            continue
        t = DispatchTable.load(path)
        if t.gpu and t.gpu != gpu_name and path.parent == SHIPPED_DIR:
            continue
        if table is None:
            table = DispatchTable(gpu_name, meta={"sources": []})
        table.merge(t)
        table.meta["sources"].append(str(path))
    return table


_UNSET = object()
_device_tables: dict[int, DispatchTable | None] = {}
_override: Any = _UNSET


def table_for_device(device: torch.device) -> DispatchTable | None:
    """The dispatch table of a CUDA device (loaded once per device, by its name), or the override."""
    if _override is not _UNSET:
        return _override
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    table = _device_tables.get(idx, _UNSET)
    if table is _UNSET:
        table = _device_tables[idx] = load_table_for_gpu(torch.cuda.get_device_name(idx))
    return table


def set_dispatch_table(table: DispatchTable | None | Any = _UNSET) -> Any:
    """Force one table for every device (None: no table, i.e. the rule); no argument restores per-GPU
    loading. Returns the previous override. Also drops the per-device cache so new files are seen."""
    global _override
    prev, _override = _override, table
    _device_tables.clear()
    return prev


@contextlib.contextmanager
def use_dispatch_table(table: DispatchTable | None) -> Iterator[None]:
    """Context manager form of ``set_dispatch_table`` (tests, benchmarks)."""
    prev = set_dispatch_table(table)
    try:
        yield
    finally:
        set_dispatch_table(prev)


def choose_impl(device: torch.device, dtype: torch.dtype, n: int, k: int, m: int,
                weight_format: str | None = None) -> Choice:
    """(impl, config) for a linear of weight [N, K] (dense, or packed in ``weight_format``) at M rows: the
    table entry, else ``rule_choice``.

    O(1), host-only (no device sync): safe on the decode hot path and during CUDA-graph capture.
    """
    table = table_for_device(device)
    if table is not None:
        choice = table.lookup(dtype, n, k, m, weight_format)
        if choice is not None:
            return choice
    return rule_choice(m, weight_format)
