"""Latency and throughput benchmarks of the engine (``fdpp bench``), reported against the hardware."""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fdpp.sampling_params import SamplingParams
from fdpp.utils import dtype_name


def graph_median_us(fn: Any, *, smoke: bool = False, rep: int = 30) -> float:
    """Median microseconds of ``fn()`` replayed from a CUDA graph (Triton's do_bench_cudagraph), after
    one warm-up call. ``smoke``: one timed eager call (the CPU smoke runs of the bench scripts)."""
    fn()
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    import triton.testing

    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def rel_norm_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN when ``out`` holds a non-finite value."""
    if not torch.isfinite(out).all():
        return float("nan")
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


@contextlib.contextmanager
def triton_compiles() -> Iterator[list[tuple[float, str]]]:
    """Record the Triton kernels JIT-compiled inside the block: a list of (perf_counter time, the kernel's
    signature: name, options and argument specializations). A compile in a timed window is a stall of
    ~1 s that no steady-state figure shows. Empty where Triton has no compile hook (``triton.knobs``)."""
    events: list[tuple[float, str]] = []
    try:
        from triton import knobs
        runtime = knobs.runtime
        previous = runtime.jit_cache_hook
    except (ImportError, AttributeError):
        yield events
        return

    def hook(*_args, **kw) -> bool:
        events.append((time.perf_counter(), str(kw.get("repr", "?"))))
        return bool(previous(*_args, **kw)) if previous is not None else False  # False: compile it

    runtime.jit_cache_hook = hook
    try:
        yield events
    finally:
        runtime.jit_cache_hook = previous


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + written), median of 10."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    t = sorted(times[2:])[len(times[2:]) // 2]
    return nbytes / t


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step streams: every parameter once (quantized ones as packed), except token-embedding
    tables, of which a step reads only a few rows (unless the table is also the LM head)."""
    from fdpp.layers.embedding import LMHead, VocabEmbedding

    heads = {id(m.weight) for m in model.modules() if isinstance(m, LMHead)}
    skip = {id(m.weight) for m in model.modules() if isinstance(m, VocabEmbedding)} - heads
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # shared parameters are listed once
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        quant = getattr(p, "quant", None)  # a quantized weight streams its packed bytes
        total += quant.nbytes if quant is not None else p.numel() * p.element_size()
    return total


@dataclass
class LatencyResult:
    model: str
    device: str
    dtype: str
    batch_size: int
    input_len: int
    output_len: int
    prefill_ms: float  # time to first token of the batch
    decode_step_ms: float  # median decode step
    decode_tokens_per_s: float  # batch_size / decode step
    total_s: float
    weight_bytes: int
    kv_bytes_per_step: float  # mean over the decode steps
    achieved_bw_gbs: float | None
    copy_bw_gbs: float | None
    pct_of_copy_bw: float | None
    cuda_graphs: bool
    # Wall clock through LLM.generate (what a user sees): TTFT = wall(1 token); decode tok/s =
    # B x (N - 1) / (wall(N) - wall(1)), medians after a warm-up. host_overhead_ms: wall-clock step minus
    # the per-step median above (the time the device waits for Python between steps, roughly).
    wall_ttft_ms: float | None = None
    wall_step_ms: float | None = None
    wall_decode_tokens_per_s: float | None = None
    host_overhead_ms: float | None = None
    async_scheduling: bool | None = None
    fuse_norm: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def wall_clock_decode(llm: Any, batch_size: int, input_len: int, output_len: int, repeats: int = 3,
                      seed: int = 0) -> dict[str, float]:
    """Time ``LLM.generate`` end to end for ``output_len`` tokens and for 1 token (same prompts, prefix
    cache reset before each run, CUDA synchronized): returns wall_ttft_ms (median wall(1)),
    wall_step_ms and wall_decode_tokens_per_s (B x (N - 1) / (wall(N) - wall(1)), medians), after one
    warm-up of each."""
    if output_len < 2:
        raise ValueError(f"wall_clock_decode: output_len must be >= 2 (decode = wall(N) - wall(1)), got {output_len}")
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(batch_size)]
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)

    def wall(n: int) -> float:
        eng.reset_prefix_cache()
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        sync()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
        dt = time.perf_counter() - t0
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [n] * batch_size:
            raise RuntimeError(f"wall_clock_decode: expected {n} tokens per prompt, got {got}")
        return dt

    wall(output_len)
    wall(1)
    t_n = sorted(wall(output_len) for _ in range(repeats))[repeats // 2]
    t_1 = sorted(wall(1) for _ in range(repeats))[repeats // 2]
    step = (t_n - t_1) / (output_len - 1)
    return {
        "wall_ttft_ms": t_1 * 1e3,
        "wall_step_ms": step * 1e3,
        "wall_decode_tokens_per_s": batch_size / step if step > 0 else float("nan"),
    }


def run_latency(llm: Any, model_name: str, batch_size: int, input_len: int, output_len: int,
                warmup: bool = True, copy_bw: float | None = None, wall_clock: bool = True,
                repeats: int = 3) -> LatencyResult:
    """Prefill ``batch_size`` random prompts of ``input_len`` tokens, then decode ``output_len`` tokens,
    timing each engine step; with ``wall_clock`` also the user's view (``wall_clock_decode``)."""
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, output_kind="final_only")

    def one_run() -> tuple[float, list[float], float]:
        rids = [eng.add_request(None, [rng.randrange(vocab) for _ in range(input_len)], params)
                for _ in range(batch_size)]
        sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        steps: list[float] = []
        prefill = None
        while eng.has_unfinished_requests():
            ts = time.perf_counter()
            eng.step()
            te = time.perf_counter()
            if prefill is None:
                # every request has its first token (or is already done)
                if all(r not in eng.requests or eng.requests[r].metrics.first_token_time for r in rids):
                    prefill = te - t0
            else:
                steps.append(te - ts)
        return prefill or 0.0, steps, time.perf_counter() - t0

    # NOTE: the per-step timer runs synchronous steps: with async scheduling a step() returns before its
    # forward finishes and the medians of alternating short and long steps under-read the GPU time (B64 x 1k,
    # H200: 9.2 ms "per step" against 11.8 ms for its bytes at copy bandwidth). The wall clock below runs
    # the engine as configured.
    was_async = bool(getattr(eng, "async_scheduling", False))
    eng.async_scheduling = False
    try:
        if warmup:
            one_run()
        prefill, steps, total = one_run()
    finally:
        eng.async_scheduling = was_async
    steps = steps[1:] if len(steps) > 2 else steps  # the first decode step after prefill may pay set-up
    step = sorted(steps)[len(steps) // 2] if steps else float("nan")
    wbytes = weight_bytes(eng.model)
    per_tok = eng.stats()["kv_bytes_per_token"]
    kv = batch_size * per_tok * (input_len + output_len / 2)
    achieved = (wbytes + kv) / step if steps else None
    wall = wall_clock_decode(llm, batch_size, input_len, output_len, repeats) if wall_clock and output_len > 1 else {}
    if wall and steps:
        wall["host_overhead_ms"] = wall["wall_step_ms"] - step * 1e3
    return LatencyResult(
        model=model_name,
        device=device_name(eng.device),
        dtype=dtype_name(eng.dtype),
        batch_size=batch_size,
        input_len=input_len,
        output_len=output_len,
        prefill_ms=prefill * 1e3,
        decode_step_ms=step * 1e3,
        decode_tokens_per_s=batch_size / step if steps else float("nan"),
        total_s=total,
        weight_bytes=wbytes,
        kv_bytes_per_step=kv,
        achieved_bw_gbs=achieved / 1e9 if achieved else None,
        copy_bw_gbs=copy_bw / 1e9 if copy_bw else None,
        pct_of_copy_bw=100 * achieved / copy_bw if achieved and copy_bw else None,
        cuda_graphs=bool(eng.runner.graphs),
        async_scheduling=bool(getattr(eng, "async_scheduling", False)),
        fuse_norm=bool(getattr(eng, "fuse_norm", False)),
        **wall,
    )


def run_throughput(llm: Any, num_prompts: int, input_range: tuple[int, int], output_range: tuple[int, int],
                   seed: int = 0) -> dict[str, Any]:
    """Submit ``num_prompts`` random requests at once; total output tokens per second."""
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_prompts):
        n_in = rng.randint(*input_range)
        n_out = rng.randint(*output_range)
        reqs.append(([rng.randrange(vocab) for _ in range(n_in)], n_out))
    # warm-up with one short request
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    for ids, n_out in reqs:
        eng.add_request(None, ids, SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True,
                                                  output_kind="final_only"))
    out_tokens = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    stats = eng.stats()
    return {
        "device": device_name(eng.device),
        "num_prompts": num_prompts,
        "input_range": list(input_range),
        "output_range": list(output_range),
        "total_output_tokens": out_tokens,
        "total_input_tokens": sum(len(r[0]) for r in reqs),
        "elapsed_s": dt,
        "output_tokens_per_s": out_tokens / dt,
        "requests_per_s": num_prompts / dt,
        "preemptions": eng.scheduler.num_preemptions,
        # prefix cache over the whole run (the warm-up request included), in prompt tokens
        "prefix_caching": stats["prefix_caching"],
        "prefix_cache_queries": stats["prefix_cache_queries"],
        "prefix_cache_hits": stats["prefix_cache_hits"],
        "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
    }
