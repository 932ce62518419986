"""The linear op: ``y = epilogue(x @ weight.T)`` dispatched to one of FlashDecoding++'s three GEMM
implementations.

Backends (``fdpp.ops.backend.linear_backend``):
- ``reference``: plain PyTorch; a quantized weight is dequantized (memoized on the CPU) and multiplied densely.
- ``cpu`` (the CPU default): the reference path, except that 4- and 8-bit weights (q4_0, q4_1, q4_k, int4;
  q8_0, int8) run PyTorch's packed int4 CPU kernel (``fdpp.quant.cpu_int4``); elsewhere the same as ``reference``.
- ``cublas``: torch.nn.functional.linear (cuBLAS on a GPU) plus the epilogue in PyTorch (ImplC).
- ``gemv`` / ``flat``: force the CUDA-core GEMV (ImplA) or the flat tensor-core GEMM (ImplB).
- ``table``: the heuristic dataflow (the CUDA default): an O(1), sync-free lookup of (GPU, dtype, N, K, M)
  in the tuned table (fdpp.dataflow), falling back to a rule (gemv for M = 1, flat for M <= 64, else
  cuBLAS) where the table has no entry.

Quantized weights (``fdpp.quant.QuantTensor``) take the same route with the weight format in the lookup:
``gemv`` / ``flat`` become the kernels that read packed weights and dequantize in registers; ``cublas``
(large M) is FP8 W8A8 on the FP8 tensor cores (``torch._scaled_mm``, dynamic per-token activation scales)
for fp8 weights and, for every other format, a dequantize kernel into the dense tensor-core GEMM. The
reference backend dequantizes per matmul.
"""
from __future__ import annotations

import torch

from fdpp.dataflow.table import choose_impl
from fdpp.kernels.device import capability, interpreting
from fdpp.kernels.gemv import linear_reference
from fdpp.ops.backend import linear_backend
from fdpp.quant.formats import FP8_MAX, QuantParts, QuantTensor

ACTS = (None, "silu_and_mul")


def fuses_norm(impl: str, config: dict | None = None) -> bool:
    """Whether ``impl`` with the dataflow table's ``config`` takes a ``norm_weight`` in its prologue (else the
    norm op runs first).

    Only the GEMV, unless its table entry says ``"separate_norm": true`` (set per shape from
    ``bench/bench_fused_norm.py --update-table``, where the norm kernel + the plain GEMV measured faster).
    The flat GEMM's prologue scales each x^T tile inside the pipelined K loop (the dot's shared-memory
    operand is rewritten every step) and re-reads the rows for 1/rms; measured on an H200
    (bench/bench_fused_norm.py, 2026-12-04) it is slower than the norm kernel + the plain flat GEMM at every
    M from 2 to 64: Llama-2-7B qkv fp16 1.59-2.18x, gate_up 1.01-1.40x, Llama-3-8B qkv 2.4-2.5x. The GEMV
    (one x row per program) at M = 1: Llama-2-7B fp16 qkv 0.922x, gate_up 0.963x (the B1 gain), but
    Llama-3-8B gate_up 1.04x and Llama-2-7B gate_up bf16 1.11x (before the one-pass prologue; per shape now)."""
    return impl == "gemv" and not (config or {}).get("separate_norm", False)


def dispatch(x2: torch.Tensor, n: int, k: int, backend: str,
             weight_format: str | None = None) -> tuple[str, dict | None]:
    """The implementation (and kernel config) that multiplies x2 [M, K] by an [N, K] weight (dense, or packed
    in ``weight_format``) under a Triton linear ``backend``: the dataflow table's choice (``table``), else
    the forced one."""
    if backend == "table":
        return choose_impl(x2.device, x2.dtype, n, k, int(x2.shape[0]), weight_format=weight_format)
    return backend, None


def norm_unless_fused(x2: torch.Tensor, norm_weight: torch.Tensor | None, norm_eps: float, impl: str,
                      config: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, norm_weight) as ``impl`` takes them: unchanged where it fuses the norm (``fuses_norm``), else x
    RMS-normed by the norm op and no norm_weight."""
    if norm_weight is None or fuses_norm(impl, config):
        return x2, norm_weight
    from fdpp.ops.norm import rms_norm

    return rms_norm(x2, norm_weight, norm_eps), None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantTensor | QuantParts,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    act: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """``y = x @ weight.T (+ bias)``, then ``act``, then ``+ residual``.

    ``norm_weight`` [K]: x is first replaced by ``rms_norm(x, norm_weight, norm_eps)``; the GEMV and
    flat-GEMM kernels do it in their prologue (no launch of its own), the other backends call the norm op.

    x: ``[..., K]`` (leading dims are flattened into M); weight: ``[N, K]`` (dense or quantized); bias: ``[N]``.
    ``act="silu_and_mul"``: weight is a fused [gate; up] of ``2F`` rows and y is
    ``silu(x @ gate.T) * (x @ up.T)`` with last dim F. residual: ``[..., N_out]``, added last.
    Returns ``[..., N_out]`` in x's dtype.
    """
    if act not in ACTS:
        raise ValueError(f"linear: act={act!r} is not supported; use one of {ACTS}")
    if norm_weight is not None and (isinstance(weight, (QuantTensor, QuantParts))
                                    or linear_backend(x.device) in ("reference", "cpu", "cublas")):
        from fdpp.ops.norm import rms_norm

        x, norm_weight = rms_norm(x, norm_weight, norm_eps), None
    if isinstance(weight, (QuantTensor, QuantParts)):
        return quant_linear(x, weight, bias, residual=residual, act=act)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match; expected x [..., K] "
            f"and weight [N, K]"
        )
    n, k = weight.shape
    n_out = n
    if act == "silu_and_mul":
        if n % 2:
            raise ValueError(f"linear: act='silu_and_mul' needs a fused [gate; up] weight with even N, got N={n}")
        n_out = n // 2
    lead = x.shape[:-1]
    if residual is not None and residual.shape != (*lead, n_out):
        raise ValueError(f"linear: residual must have shape {(*lead, n_out)}, got {tuple(residual.shape)}")

    backend = linear_backend(x.device)
    if backend in ("reference", "cpu", "cublas"):
        return linear_reference(x, weight, bias, residual, act)

    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    res2 = residual.reshape(-1, n_out) if residual is not None else None
    if res2 is not None and res2.stride(-1) != 1:
        res2 = res2.contiguous()

    impl, config = dispatch(x2, n, k, backend)
    x2, norm_weight = norm_unless_fused(x2, norm_weight, norm_eps, impl, config)
    if impl == "gemv":
        from fdpp.kernels.gemv import gemv

        y = gemv(x2, weight, bias, residual=res2, act=act, config=config, norm_weight=norm_weight, norm_eps=norm_eps)
    elif impl == "flat":
        from fdpp.kernels.flat_gemm import flat_gemm

        y = flat_gemm(x2, weight, bias, residual=res2, act=act, config=config,
                      norm_weight=norm_weight, norm_eps=norm_eps)
    elif impl == "cublas":
        y = tensor_core_linear(x2, weight, bias, res2, act)
    else:
        raise ValueError(f"linear: backend {impl!r} unknown; choose reference | table | gemv | flat | cublas")
    return y.reshape(*lead, n_out)


def tensor_core_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, act: str | None) -> torch.Tensor:
    """ImplC on 2-D x: the dense GEMM (cuBLAS on a GPU) with its epilogue in as few kernels as it allows.
    A residual without bias goes into the GEMM itself (``addmm``, beta = 1: no separate add); the gated
    activation is one Triton pass (``fdpp.kernels.activation``) where Triton runs (CUDA, or its interpreter),
    else PyTorch's two kernels. Same math as ``linear_reference`` up to one rounding per fused step."""
    if act is None and residual is not None and bias is None:
        return torch.addmm(residual, x, weight.t())
    y = torch.nn.functional.linear(x, weight, bias)
    if act == "silu_and_mul" and (x.is_cuda or interpreting()):
        from fdpp.kernels.activation import silu_and_mul

        y, act = silu_and_mul(y), None
    return linear_reference_epilogue(y, None, residual, act)


def quant_linear(
    x: torch.Tensor,
    weight: QuantTensor | QuantParts,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    act: str | None = None,
) -> torch.Tensor:
    """``linear`` for a quantized weight (same contract). The kernels compute ``x @ W.T (+ bias) (+ residual)``;
    a gated activation is applied after them (its residual too)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match the quantized weight [{n}, {k}]")
    lead = x.shape[:-1]
    backend = linear_backend(x.device)
    if backend == "cpu" and x.device.type == "cpu":
        from fdpp.quant.cpu_int4 import quant_matmul

        y = quant_matmul(x.reshape(-1, k), weight)
        y = linear_reference_epilogue(y, bias, None if residual is None else residual.reshape(-1, residual.shape[-1]),
                                      act)
        return y.reshape(*lead, y.shape[-1])
    if backend in ("reference", "cpu") or (backend == "cublas" and x.device.type != "cuda"):
        return linear_reference(x, weight.dense_for_matmul(x.dtype), bias, residual, act)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    fused_res = None if act is not None or residual is None else residual.reshape(-1, n).contiguous()
    if isinstance(weight, QuantParts):  # shards in different formats: one matmul per part, then concatenate
        y = torch.cat([_quant_matmul(x2, p, None, None, backend) if isinstance(p, QuantTensor)
                       else torch.nn.functional.linear(x2, p) for p in weight.parts], dim=-1)
        y = linear_reference_epilogue(y, bias, None if fused_res is None else fused_res, act)
    else:
        y = _quant_matmul(x2, weight, bias, fused_res, backend)
        if act is not None:
            y = linear_reference_epilogue(y, None, None, act)
    if residual is not None and fused_res is None:
        y = y + residual.reshape(y.shape)
    return y.reshape(*lead, y.shape[-1])


def linear_reference_epilogue(y: torch.Tensor, bias, residual, act: str | None) -> torch.Tensor:
    """The epilogue of ``linear_reference`` on an already computed ``x @ W.T``."""
    if bias is not None:
        y = y + bias
    if act == "silu_and_mul":
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual is not None:
        y = y + residual
    return y


def _quant_matmul(x2: torch.Tensor, w: QuantTensor, bias, residual, backend: str) -> torch.Tensor:
    """x2 [M, K] @ W.T (+ bias) (+ residual) with the implementation the backend / dataflow table picks."""
    n, k = w.shape
    impl, config = dispatch(x2, n, k, backend, w.fmt)
    args = (w.data, w.fmt, n, k, w.scale, w.zero, w.group_size, bias)
    if impl == "gemv":
        from fdpp.kernels.quant_gemv import quant_gemv

        return quant_gemv(x2, *args, residual=residual, config=config)
    if impl == "flat":
        from fdpp.kernels.quant_flat_gemm import quant_flat_gemm

        return quant_flat_gemm(x2, *args, residual=residual, config=config)
    if impl != "cublas":
        raise ValueError(f"linear: backend {impl!r} unknown; choose reference | table | gemv | flat | cublas")
    y = quant_large_m(x2, w, bias)
    return y if residual is None else y + residual


def quant_large_m(x2: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The large-M ("cublas") path of a quantized weight: FP8 W8A8 on the FP8 tensor cores for fp8 weights
    (where supported; per-channel scales only: per-group fp8 takes the dequantize path), else one dequantize
    kernel into a dense weight and the dense tensor-core GEMM."""
    n, k = w.shape
    if w.fmt == "fp8" and not w.group_size and fp8_w8a8_supported(x2, n, k):
        return fp8_w8a8_linear(x2, w.data, w.scale, bias)
    from fdpp.kernels.quant_gemv import quant_dequantize

    dense = quant_dequantize(w.data, w.fmt, n, k, w.scale, w.zero, w.group_size, dtype=x2.dtype)
    return torch.nn.functional.linear(x2, dense, bias)


def fp8_w8a8_supported(x: torch.Tensor, n: int, k: int) -> bool:
    """FP8 tensor cores (cuBLASLt through ``torch._scaled_mm``): CUDA compute capability >= 8.9, K and N
    multiples of 16."""
    if x.device.type != "cuda" or not hasattr(torch, "_scaled_mm") or k % 16 or n % 16:
        return False
    return capability(x.device) >= (8, 9)


def fp8_w8a8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (w_fp8 * w_scale).T`` as W8A8: x is quantized to e4m3 with a dynamic per-token (row) scale and
    multiplied on the FP8 tensor cores with row-wise scales, accumulating in fp32.

    NOTE: row-wise scaled ``_scaled_mm`` has long accepted only a bfloat16 output; fp16 callers get a cast."""
    x_scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)  # [M, 1]
    xq = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, w_fp8.t(), scale_a=x_scale, scale_b=w_scale.float().reshape(1, -1),
                         out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
