"""Build the heuristic dataflow table: profile every implementation and its tile configs over M on the
current GPU, find the inflection points M1 (gemv -> flat) and M2 (flat -> cuBLAS), keep the best config
per M range.

The timer is injectable: ``timer(impl, config, n, k, m, dtype) -> microseconds``. ``GraphTimer`` is the
real one (CUDA-graph replay, weights rotated through more memory than L2 holds, random data); tests pass
a deterministic fake. Timing failures (a config that does not fit the GPU) count as ``inf``.
"""
from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch

from fdpp.dataflow.table import IMPLS, DispatchTable, MRange, ShapeEntry, dtype_name

Timer = Callable[[str, "dict | None", int, int, int, torch.dtype], float]
Candidates = Callable[[str, int, int, int], "list[dict | None]"]

GEMV_MAX_M = 64  # the GEMV is profiled up to here (beyond it, it re-reads W per 16 rows of x)


def default_m_grid(max_m: int = 512, *, quick: bool = False) -> list[int]:
    """The M values profiled; a value covers the M range since the previous one (M rounds up)."""
    if quick:
        grid = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    else:
        grid = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    grid = [m for m in grid if m <= max_m]
    if not grid or grid[-1] != max_m:
        grid.append(max_m)
    return grid


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _splits(num_programs: int, num_kb: int, num_sms: int, max_split: int = 8) -> list[int]:
    """Split-K factors worth trying: 1, then doublings while the grid is still under ~2 waves."""
    out, s = [1], 2
    while s <= max_split and num_programs * (s // 2) < 2 * num_sms and num_kb >= 2 * s:
        out.append(s)
        s *= 2
    return out


def candidate_configs(
    impl: str, n: int, k: int, m: int, *, num_sms: int = 132, quick: bool = False, gemv_max_m: int = GEMV_MAX_M
) -> list[dict | None]:
    """Tile configs to profile for one implementation at one (N, K, M). Empty when the impl is out of
    its range (the GEMV above ``gemv_max_m``). cuBLAS has a single ``None`` config."""
    if impl == "cublas":
        return [None]
    out: list[dict] = []
    if impl == "gemv":
        if m > gemv_max_m:
            return []
        bm = min(_next_pow2(m), 4)
        # (BLOCK_N, BLOCK_K, num_warps): the per-row fp32 accumulators hold BM*BN*BK values, kept near
        # 64 a thread (8K at 4 warps, 16K at 8).
        if bm == 1:
            tiles = [(8, 512, 4), (4, 1024, 4), (32, 256, 4), (16, 512, 4), (16, 1024, 8), (8, 1024, 8),
                     (4, 512, 2)]
        elif bm == 2:
            tiles = [(8, 512, 4), (4, 1024, 4), (16, 256, 4), (8, 1024, 8)]
        else:
            tiles = [(4, 512, 4), (8, 256, 4), (2, 1024, 4), (8, 512, 8)]
        if quick or m > 8:
            tiles = tiles[:2]
        for bn, bk, warps in tiles:
            progs = -(-n // bn) * -(-m // bm)
            for s in _splits(progs, -(-k // bk), num_sms):
                out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": warps,
                            "num_stages": 2, "PREFETCH": True})
        return out
    if impl == "flat":
        bm = max(16, min(64, _next_pow2(m)))
        # (BLOCK_N, BLOCK_K, num_stages, num_warps); all fit Hopper's 227 KB of shared memory at BM <= 64.
        # Ordered by how often each won on an H200 (--quick keeps the first three).
        tiles = [(128, 128, 4, 4), (64, 128, 4, 4), (64, 256, 3, 4), (128, 64, 5, 4), (128, 128, 3, 8),
                 (32, 256, 4, 4), (32, 128, 6, 4), (64, 128, 6, 4)]
        if quick:
            tiles = tiles[:3]
        for bn, bk, stages, warps in tiles:
            progs = -(-n // bn) * -(-m // bm)
            for s in _splits(progs, -(-k // bk), num_sms):
                out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": warps,
                            "num_stages": stages})
        return out
    raise ValueError(f"unknown implementation {impl!r}; choose one of {IMPLS}")


def ranges_from_choices(ms: Sequence[int], choices: Sequence[tuple[str, dict | None]]) -> list[MRange]:
    """Turn the best (impl, config) at each profiled M into contiguous ranges: profiled M_i covers
    (M_{i-1}, M_i] (an M between grid points takes the choice of the next larger one); equal neighbours merge."""
    ranges: list[MRange] = []
    prev_m = 0
    for m, (impl, cfg) in zip(ms, choices):
        if ranges and ranges[-1].impl == impl and ranges[-1].config == cfg:
            ranges[-1].m_max = m
        else:
            ranges.append(MRange(prev_m + 1, m, impl, cfg))
        prev_m = m
    return ranges


def tune_shape(
    n: int,
    k: int,
    dtype: torch.dtype,
    ms: Sequence[int],
    timer: Timer,
    *,
    name: str = "",
    impls: Iterable[str] = IMPLS,
    candidates: Candidates | None = None,
    progress=None,
    confirm: int = 0,
) -> ShapeEntry:
    """Profile one [N, K] shape over ``ms`` and return its table entry (raw timings kept in ``.timings``)."""
    candidates = candidates or candidate_configs
    ms = sorted({int(m) for m in ms})
    impls = tuple(impls)
    best: dict[str, list] = {impl: [] for impl in impls}  # per impl, per m: (us, config)
    for m in ms:
        for impl in impls:
            b = (math.inf, None)
            for cfg in candidates(impl, n, k, m):
                t = float(timer(impl, cfg, n, k, m, dtype))
                if progress is not None:
                    progress.update(1)
                if t < b[0]:
                    b = (t, cfg)
            if confirm and math.isfinite(b[0]):
                # The minimum over many noisy timings is biased low; re-time the winner so that impls are
                # compared on the mean of unbiased repeats.
                reps = [float(timer(impl, b[1], n, k, m, dtype)) for _ in range(confirm)]
                if progress is not None:
                    progress.update(confirm)
                b = (statistics.fmean(reps), b[1])
            best[impl].append(b)
    choices = []
    for i, m in enumerate(ms):
        impl = min(impls, key=lambda name_: best[name_][i][0])
        if math.isinf(best[impl][i][0]):
            raise RuntimeError(f"tuning {n}x{k} at M={m}: every implementation failed to run")
        choices.append((impl, best[impl][i][1]))
    timings = {
        "m": list(ms),
        "us": {impl: [None if math.isinf(t) else round(t, 3) for t, _ in best[impl]] for impl in impls},
        "config": {impl: [c for _, c in best[impl]] for impl in impls},
    }
    return ShapeEntry(dtype=dtype_name(dtype), n=n, k=k, name=name, ranges=ranges_from_choices(ms, choices),
                      timings=timings)


def count_candidates(shapes: dict[str, tuple[int, int]], ms: Sequence[int], impls=IMPLS, candidates=None,
                     confirm: int = 0) -> int:
    """Number of timer calls ``build_table`` makes (for the progress bar)."""
    candidates = candidates or candidate_configs
    total = 0
    for n, k in shapes.values():
        for m in ms:
            for impl in impls:
                c = len(candidates(impl, n, k, m))
                total += c + (confirm if c else 0)
    return total


def build_table(
    shapes: dict[str, tuple[int, int]],
    dtype: torch.dtype,
    ms: Sequence[int],
    timer: Timer,
    *,
    gpu_name: str,
    impls: Iterable[str] = IMPLS,
    candidates: Candidates | None = None,
    show_progress: bool = True,
    table: DispatchTable | None = None,
    confirm: int = 0,
) -> DispatchTable:
    """Tune every distinct [N, K] of ``shapes`` and add the entries to ``table`` (a new one by default).
    ``confirm``: extra timings of each implementation's best config, averaged, before choosing."""
    impls = tuple(impls)
    table = table if table is not None else DispatchTable(gpu_name)
    unique: dict[tuple[int, int], str] = {}
    for name, nk in shapes.items():
        unique[nk] = f"{unique[nk]},{name}" if nk in unique else name
    total = count_candidates({v: k for k, v in unique.items()}, ms, impls, candidates, confirm)
    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc=f"fdpp tune {dtype_name(dtype)}", unit="run")
    try:
        for (n, k), name in unique.items():
            if progress is not None:
                progress.set_postfix_str(f"{name} {n}x{k}")
            table.add(tune_shape(n, k, dtype, ms, timer, name=name, impls=impls, candidates=candidates,
                                 progress=progress, confirm=confirm))
    finally:
        if progress is not None:
            progress.close()
    return table


# ----------------------------------------------------------------------------------------------------
# The real timer
# ----------------------------------------------------------------------------------------------------


def make_runner(impl: str, config: dict | None, act: str | None = None) -> Callable:
    """``f(x, weight) -> y`` running one implementation with a fixed config (no dispatch)."""
    if impl == "gemv":
        from fdpp.kernels.gemv import gemv

        return lambda x, w: gemv(x, w, act=act, config=config)
    if impl == "flat":
        from fdpp.kernels.flat_gemm import flat_gemm

        return lambda x, w: flat_gemm(x, w, act=act, config=config)
    if impl == "cublas":
        import torch.nn.functional as F

        def run(x, w):
            y = F.linear(x, w)
            if act == "silu_and_mul":
                gate, up = y.chunk(2, dim=-1)
                y = F.silu(gate) * up
            return y

        return run
    raise ValueError(f"unknown implementation {impl!r}; choose one of {IMPLS}")


class GraphTimer:
    """Median time of one call, replayed from a CUDA graph, with weights rotated through more memory
    than L2 holds (``rotate_bytes`` of random copies), so that HBM streaming is what gets measured.

    Call as ``timer(impl, config, n, k, m, dtype)`` (the tuner's Timer) or ``timer.time_fn(fn, n, k, m,
    dtype)`` for any ``fn(x, weight)``.
    """

    def __init__(self, device: str | torch.device = "cuda", *, rotate_bytes: float = 400e6, replays: int = 11,
                 min_graph_us: float = 800.0, act: str | None = None, strict: bool = False):
        self.device = torch.device(device)
        self.strict = strict  # False: a config that fails for any reason times as inf (with a warning)
        self.errors: list[str] = []
        self.rotate_bytes = rotate_bytes
        self.replays = replays
        self.min_graph_us = min_graph_us
        self.act = act
        self._key = None
        self._weights: list[torch.Tensor] = []
        self._x: dict[int, torch.Tensor] = {}

    def weights(self, n: int, k: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """The rotated copies of a random [N, K] weight (kept until another shape is asked for)."""
        key = (n, k, dtype)
        if key != self._key:
            self._weights, self._x, self._key = [], {}, None
            torch.cuda.empty_cache()
            nbytes = n * k * torch.finfo(dtype).bits // 8
            copies = max(2, math.ceil(self.rotate_bytes / nbytes))
            gen = torch.Generator(device=self.device).manual_seed(n * 7919 + k)
            self._weights = [torch.randn(n, k, device=self.device, dtype=dtype, generator=gen) * 0.05
                             for _ in range(copies)]
            self._key = key
        return self._weights

    def inputs(self, m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        x = self._x.get(m)
        if x is None:
            x = self._x[m] = torch.randn(m, k, device=self.device, dtype=dtype)
        return x

    def __call__(self, impl: str, config: dict | None, n: int, k: int, m: int, dtype: torch.dtype) -> float:
        return self.time_fn(make_runner(impl, config, self.act), n, k, m, dtype)

    def time_fn(self, fn: Callable, n: int, k: int, m: int, dtype: torch.dtype) -> float:
        """Microseconds per call of ``fn(x, weight)`` (median of graph replays); inf if it fails to run."""
        ws = self.weights(n, k, dtype)
        x = self.inputs(m, k, dtype)

        def sweep():
            for w in ws:
                fn(x, w)

        try:
            sweep()  # compiles / loads the kernel outside the capture
            torch.cuda.synchronize(self.device)
        except Exception as exc:
            if not _is_resource_error(exc):
                if self.strict:
                    raise
                msg = f"{type(exc).__name__}: {str(exc)[:300]}"
                if msg not in self.errors:
                    warnings.warn(f"GraphTimer: a candidate failed and is skipped: {msg}", stacklevel=2)
                self.errors.append(msg)
            return math.inf
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        sweep()
        end.record()
        end.synchronize()
        est_us = max(start.elapsed_time(end) * 1e3, 1.0)
        reps = max(1, min(50, math.ceil(self.min_graph_us / est_us)))
        stream = torch.cuda.Stream(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            sweep()  # warm the side stream (allocator pools) before capture
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                sweep()
        graph.replay()
        torch.cuda.synchronize(self.device)
        times = []
        for _ in range(self.replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        del graph
        return statistics.median(times) / (reps * len(ws))


def _is_resource_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("OutOfResources", "out of resource", "shared memory", "PassManager", "CompilationError"))


def tune_model(
    shapes: dict[str, tuple[int, int]],
    dtype: torch.dtype,
    *,
    max_m: int = 512,
    quick: bool = False,
    device: str | torch.device = "cuda",
    show_progress: bool = True,
    table: DispatchTable | None = None,
    gemv_max_m: int = 8,
) -> DispatchTable:
    """``fdpp tune``'s core: profile ``shapes`` on the current GPU with the graph timer, return the table.

    The GEMV is profiled only up to ``gemv_max_m`` (on Hopper it wins at M = 1 only; the benchmark
    profiles it to 64 for the static all-GEMV comparison)."""
    from fdpp.kernels.device import num_sms

    device = torch.device(device)
    sms = num_sms(device)
    ms = default_m_grid(max_m, quick=quick)

    def candidates(impl: str, n: int, k: int, m: int) -> list[dict | None]:
        return candidate_configs(impl, n, k, m, num_sms=sms, quick=quick, gemv_max_m=gemv_max_m)

    gpu = torch.cuda.get_device_name(device)
    table = table if table is not None else DispatchTable(gpu)
    table.gpu = gpu
    return build_table(shapes, dtype, ms, GraphTimer(device), gpu_name=gpu, candidates=candidates,
                       show_progress=show_progress, table=table, confirm=2)
