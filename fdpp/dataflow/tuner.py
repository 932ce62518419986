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
        # NOTE: M = 1 keeps every tile even when quick: it is one point per shape, and the 2026-11-26 H200
        # tables' bf16 pass (tuned quick) never tried (4, 512, 2), the fp16 winner of 10 of 15 shapes
        if (quick and bm > 1) or m > 8:
            tiles = tiles[:2]
        for bn, bk, warps in tiles:
            progs = -(-n // bn) * -(-m // bm)
            for s in _splits(progs, -(-k // bk), num_sms):
                out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": warps,
                            "num_stages": 2, "PREFETCH": True})
        return out
    if impl == "flat":
        # (BLOCK_N, BLOCK_K, num_stages, num_warps); all fit Hopper's 227 KB of shared memory at BM <= 64.
        # Ordered by how often each won on an H200 (--quick keeps the first three).
        tiles = [(128, 128, 4, 4), (64, 128, 4, 4), (64, 256, 3, 4), (128, 64, 5, 4), (128, 128, 3, 8),
                 (32, 256, 4, 4), (32, 128, 6, 4), (64, 128, 6, 4)]
        return _flat_configs(tiles[:3] if quick else tiles, n, k, m, num_sms)
    raise ValueError(f"unknown implementation {impl!r}; choose one of {IMPLS}")


def _flat_configs(tiles: Sequence[tuple[int, int, int, int]], n: int, k: int, m: int, num_sms: int,
                  min_block_k: int = 1) -> list[dict]:
    """Flat-GEMM configs from (BLOCK_N, BLOCK_K, num_stages, num_warps) tiles, each with its split-K
    candidates; BLOCK_K is raised to ``min_block_k`` (a quantized format's scale group)."""
    bm = max(16, min(64, _next_pow2(m)))
    out = []
    for bn, bk, stages, warps in tiles:
        bk = max(bk, min_block_k)
        progs = -(-n // bn) * -(-m // bm)
        for s in _splits(progs, -(-k // bk), num_sms):
            out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": warps,
                        "num_stages": stages})
    return out


def quant_candidate_configs(
    impl: str, n: int, k: int, m: int, weight_format: str, *, group_size: int = 128, num_sms: int = 132,
    quick: bool = False, gemv_max_m: int = GEMV_MAX_M,
) -> list[dict | None]:
    """Tile configs of the quantized kernels (quant_gemv.py, quant_flat_gemm.py) for one weight format.

    BLOCK_K stays a multiple of the format's scale group (its sub-block); the dequantized tile lives in
    registers, so the flat GEMM's tiles are smaller than the dense ones."""
    from fdpp.kernels.quant_gemv import sub_block

    if impl == "cublas":
        return [None]
    sb = sub_block(weight_format, group_size)
    out: list[dict] = []
    if impl == "gemv":
        if m > gemv_max_m:
            return []
        tiles = [(8, 256, 4), (4, 512, 4), (16, 256, 4), (8, 512, 8), (2, 1024, 4)]
        if quick or m > 8:
            tiles = tiles[:2]
        for bn, bk, warps in tiles:
            bk = max(bk, sb)
            progs = -(-n // bn) * m
            for s in _splits(progs, -(-k // bk), num_sms, max_split=16):
                out.append({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": warps, "num_stages": 2})
        return out
    if impl == "flat":
        tiles = [(64, 128, 3, 4), (128, 64, 3, 4), (64, 64, 4, 4), (128, 128, 3, 8), (32, 128, 4, 4)]
        return _flat_configs(tiles[:3] if quick else tiles, n, k, m, num_sms, min_block_k=sb)
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
    weight_format: str | None = None,
) -> ShapeEntry:
    """Profile one [N, K] shape over ``ms`` and return its table entry (raw timings kept in ``.timings``).
    ``weight_format``: the packed format the timer runs (recorded in the entry; None for dense weights)."""
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
                reps = [t for t in reps if math.isfinite(t)]  # a timer out of budget may decline (inf)
                if reps:
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
                      timings=timings, weight_format=weight_format)


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
    weight_format: str | None = None,
) -> DispatchTable:
    """Tune every distinct [N, K] of ``shapes`` and add the entries to ``table`` (a new one by default).
    ``confirm``: extra timings of each implementation's best config, averaged, before choosing.
    ``weight_format``: the entries' packed weight format (the timer must run that format)."""
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
                                 progress=progress, confirm=confirm, weight_format=weight_format))
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


def make_quant_runner(impl: str, config: dict | None) -> Callable:
    """``f(x, qweight) -> y`` running one quantized-weight implementation with a fixed config (no dispatch):
    the packed GEMV, the packed flat GEMM, or ``cublas`` (FP8 W8A8 / dequantize + dense GEMM)."""
    if impl == "gemv":
        from fdpp.kernels.quant_gemv import quant_gemv

        return lambda x, w: quant_gemv(x, w.data, w.fmt, *w.shape, w.scale, w.zero, w.group_size, config=config)
    if impl == "flat":
        from fdpp.kernels.quant_flat_gemm import quant_flat_gemm

        return lambda x, w: quant_flat_gemm(x, w.data, w.fmt, *w.shape, w.scale, w.zero, w.group_size,
                                            config=config)
    if impl == "cublas":
        from fdpp.ops.linear import quant_large_m

        return lambda x, w: quant_large_m(x, w)
    raise ValueError(f"unknown implementation {impl!r}; choose one of {IMPLS}")


class GraphTimer:
    """Median time of one call, replayed from a CUDA graph, with weights rotated through more memory
    than L2 holds (``rotate_bytes`` of random copies), so that HBM streaming is what gets measured.

    Call as ``timer(impl, config, n, k, m, dtype)`` (the tuner's Timer) or ``timer.time_fn(fn, n, k, m,
    dtype)`` for any ``fn(x, weight)``.
    """

    def __init__(self, device: str | torch.device = "cuda", *, rotate_bytes: float = 400e6, replays: int = 11,
                 min_graph_us: float = 800.0, act: str | None = None, strict: bool = False,
                 weight_format: str | None = None, group_size: int = 128):
        self.device = torch.device(device)
        self.weight_format = weight_format  # packed weights (fdpp.quant) instead of dense ones
        self.group_size = group_size
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
            if self.weight_format is not None:
                from fdpp.quant.formats import online_group_size, random_quant

                group = online_group_size(self.weight_format, k, self.group_size)  # as online quantization picks
                first = random_quant(self.weight_format, n, k, group_size=group, device=self.device)
                copies = max(2, math.ceil(self.rotate_bytes / first.nbytes))
                self._weights = [first] + [random_quant(self.weight_format, n, k, group_size=group,
                                                        device=self.device, seed=i) for i in range(1, copies)]
            else:
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
        if self.weight_format is not None:
            return self.time_fn(make_quant_runner(impl, config), n, k, m, dtype)
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
    weight_format: str | None = None,
    group_size: int = 128,
) -> DispatchTable:
    """``fdpp tune``'s core: profile ``shapes`` on the current GPU with the graph timer, return the table.

    The GEMV is profiled only up to ``gemv_max_m`` (on Hopper it wins at M = 1 only; the benchmark
    profiles it to 64 for the static all-GEMV comparison). ``weight_format``: profile the quantized kernels
    on random weights packed in that format (fdpp.quant; int4 with ``group_size``) instead of dense ones."""
    from fdpp.kernels.device import num_sms

    device = torch.device(device)
    sms = num_sms(device)
    ms = default_m_grid(max_m, quick=quick)

    def candidates(impl: str, n: int, k: int, m: int) -> list[dict | None]:
        if weight_format is not None:
            return quant_candidate_configs(impl, n, k, m, weight_format, group_size=group_size, num_sms=sms,
                                           quick=quick, gemv_max_m=gemv_max_m)
        return candidate_configs(impl, n, k, m, num_sms=sms, quick=quick, gemv_max_m=gemv_max_m)

    if weight_format is not None:
        shapes = tunable_shapes(shapes, weight_format)
    gpu = torch.cuda.get_device_name(device)
    table = table if table is not None else DispatchTable(gpu)
    table.gpu = gpu
    timer = GraphTimer(device, weight_format=weight_format, group_size=group_size)
    return build_table(shapes, dtype, ms, timer, gpu_name=gpu, candidates=candidates,
                       show_progress=show_progress, table=table, confirm=2, weight_format=weight_format)


def tunable_shapes(shapes: dict[str, tuple[int, int]], weight_format: str) -> dict[str, tuple[int, int]]:
    """The shapes a weight format can hold (K a multiple of its block: GGUF blocks hold 32 or 256 weights,
    fp8 / int8 / int4 any K the model has)."""
    from fdpp.quant.formats import GGUF_BLOCKS

    qk = GGUF_BLOCKS.get(weight_format, (32,))[0]
    return {name: (n, k) for name, (n, k) in shapes.items() if k % qk == 0}
