"""Quantized linear weights: one ``QuantTensor`` per weight, its formats, and the plain-PyTorch
dequantization that the CPU reference path runs per matmul.

A ``QuantTensor`` is a linear weight of logical shape ``[N, K]`` (out_features, in_features) kept in a
packed format. Every format is row-major over N (each output row owns its bytes and scales), so row
ranges concatenate: a merged QKV / gate-up built from separately quantized tensors is the row-wise
concatenation of its shards, each keeping its own scales (``QuantTensor.cat``).

Formats (``fmt``), with the tensors each keeps (``data`` / ``scale`` / ``zero``):

* ``fp8``  -- data float8_e4m3fn [N, K]; scale float32 [N] (per output channel, ``group_size`` 0) or
  [N, K/G] (per group of G along K); w = data * scale.
* ``int8`` -- data int8 [N, K]; scale float32 [N] or [N, K/G] as fp8; w = data * scale (symmetric).
  Online quantization: int8 per group of 128 (else the largest of 64 / 32 dividing K, else per channel),
  fp8 per channel with a searched scale (``online_group_size``, ``quantize``; why in docs/QUANTIZATION.md).
* ``int4`` -- data uint8 [N, K/2] (byte j holds k = 2j in its low nibble and k = 2j+1 in its high one);
  scale float16 [N, K/G]; zero uint8 [N, K/G] (0..15); w = (q - zero) * scale per group of G along K.
  AWQ and GPTQ checkpoints are repacked into this layout at load (``fdpp.quant.packing``).
* GGUF blocks (``q8_0``, ``q4_0``, ``q4_1``, ``q4_k``, ``q5_k``, ``q6_k``) -- data uint8
  [N, K / QK * block_bytes]: llama.cpp's blocks exactly as stored in the file (QK = 32 or 256 weights
  per block), row by row; scale and zero are unused.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

# GGUF block formats: (weights per block, bytes per block), as in ggml.
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
}
CHANNEL_FORMATS = ("fp8", "int8")  # float32 scales: one per output row, or one per group along K
FORMATS = (*CHANNEL_FORMATS, "int4", *GGUF_BLOCKS)
INT4_GROUP_SIZES = (32, 64, 128)
SCALED_GROUP_SIZES = (32, 64, 128, 256)  # fp8 / int8 groups (0: per channel)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class QuantTensor:
    """A linear weight of logical shape ``shape = (N, K)`` in format ``fmt`` (see the module docstring)."""

    fmt: str
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_size: int = 0  # int4; fp8 / int8 (0: per channel)
    # CPU reference path only: keep the dequantized weight after its first matmul (``plan_cpu_memoization``)
    memoize: bool = field(default=False, compare=False)
    # CPU: keep the product at float32 resolution (the LM head: logits), so not PyTorch's packed int4 kernel,
    # whose output is bfloat16 (``fdpp.quant.cpu_int4``)
    precise_output: bool = field(default=False, compare=False)
    _dense: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _cpu_int4: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown weight format {self.fmt!r}; known formats: {', '.join(FORMATS)}")
        n, k = self.shape = (int(self.shape[0]), int(self.shape[1]))
        want = packed_shape(self.fmt, n, k, self.group_size)
        if tuple(self.data.shape) != want:
            raise ValueError(f"{self.fmt} weight of shape [{n}, {k}] needs data of shape {list(want)}, "
                             f"got {list(self.data.shape)}")
        if self.fmt == "int4":
            groups = (n, k // self.group_size)
            if self.scale is None or self.zero is None or tuple(self.scale.shape) != groups \
                    or tuple(self.zero.shape) != groups:
                raise ValueError(f"int4 weight [{n}, {k}] with group size {self.group_size} needs scale and "
                                 f"zero of shape {list(groups)}")
        elif self.fmt in CHANNEL_FORMATS:
            want_s = (n, k // self.group_size) if self.group_size else (n,)
            if self.scale is None or tuple(self.scale.shape) != want_s:
                raise ValueError(f"{self.fmt} weight [{n}, {k}] with group size {self.group_size or 'none'} needs a "
                                 f"scale of shape {list(want_s)}")

    # ---- properties -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes a matmul streams: the packed data plus scales and zero points."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scale, self.zero) if t is not None]

    def layout_key(self) -> tuple:
        """What must match for two weights to be concatenated row-wise."""
        return (self.fmt, self.shape[1], self.group_size)

    # ---- transforms ---------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> QuantTensor:
        def mv(t):
            return None if t is None else t.to(device)

        return replace(self, data=mv(self.data), scale=mv(self.scale), zero=mv(self.zero))

    def rows(self, index: torch.Tensor) -> QuantTensor:
        """The weight restricted to output rows ``index`` (1-D long tensor): embedding lookups."""
        def take(t):
            return None if t is None else t.index_select(0, index)

        return replace(self, shape=(int(index.numel()), self.shape[1]), data=take(self.data),
                       scale=take(self.scale), zero=take(self.zero))

    def permute_rows(self, perm: torch.Tensor) -> QuantTensor:
        """Reorder output rows (rows are independent in every format)."""
        return self.rows(perm)

    @staticmethod
    def cat(parts: list[QuantTensor]) -> QuantTensor:
        """Row-wise concatenation of weights of one layout; each part keeps its own scales."""
        first = parts[0]
        for p in parts[1:]:
            if p.layout_key() != first.layout_key():
                raise ValueError(f"cannot concatenate weights of layouts {first.layout_key()} and {p.layout_key()}")

        def cat(ts):
            return None if ts[0] is None else torch.cat(ts, dim=0)

        return replace(first, shape=(sum(p.shape[0] for p in parts), first.shape[1]),
                       data=cat([p.data for p in parts]), scale=cat([p.scale for p in parts]),
                       zero=cat([p.zero for p in parts]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense ``[N, K]`` tensor of ``dtype`` (computed in float32)."""
        return dequantize(self).to(dtype)

    def dense_for_matmul(self, dtype: torch.dtype) -> torch.Tensor:
        """``dequantize(dtype)`` for the reference path's matmul; memoized when ``memoize`` is set."""
        if not self.memoize:
            return self.dequantize(dtype)
        w = self._dense.get(dtype)
        if w is None:
            w = self._dense[dtype] = self.dequantize(dtype)
        return w

    def cpu_int4(self):
        """This weight in PyTorch's packed int4 CPU layout (``fdpp.quant.cpu_int4``), made on first use and kept."""
        if not self._cpu_int4:
            from fdpp.quant.cpu_int4 import pack

            self._cpu_int4.append(pack(self))
        return self._cpu_int4[0]

    def __repr__(self) -> str:
        extra = f", group_size={self.group_size}" if self.group_size else ""
        return f"QuantTensor({self.fmt}, shape={list(self.shape)}{extra}, {self.nbytes} bytes, {self.device})"


class QuantParts:
    """A merged weight whose row blocks are in different formats (e.g. a GGUF Q4_K_M file's QKV: q and k
    in Q4_K, v in Q6_K). Each part is a ``QuantTensor`` or a dense tensor; y = concat of each part's x W^T."""

    def __init__(self, parts: list) -> None:
        if not parts or len({int(p.shape[1]) for p in parts}) != 1:
            raise ValueError("QuantParts needs parts with one K")
        self.parts = list(parts)
        self.shape = (sum(int(p.shape[0]) for p in parts), int(parts[0].shape[1]))
        self.memoize = False  # as QuantTensor.memoize
        self._dense: dict = {}

    @property
    def fmt(self) -> str:
        return "+".join(p.fmt if isinstance(p, QuantTensor) else "dense" for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in (p.tensors() if isinstance(p, QuantTensor) else [p])]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) if isinstance(p, QuantTensor) else p.to(dtype) for p in self.parts])

    def dense_for_matmul(self, dtype: torch.dtype) -> torch.Tensor:
        """The reference path's dense weight (memoized when ``memoize`` is set)."""
        w = self._dense.get(dtype)
        if w is None:
            w = torch.cat([p.dequantize(dtype) if isinstance(p, QuantTensor) else p.to(dtype) for p in self.parts])
            if self.memoize:
                self._dense[dtype] = w
        return w

    def __repr__(self) -> str:
        return f"QuantParts({self.parts})"


def packed_shape(fmt: str, n: int, k: int, group_size: int = 0) -> tuple[int, int]:
    """Shape of ``data`` for a weight [N, K] in ``fmt``; raises ValueError when K does not fit the format."""
    if fmt in CHANNEL_FORMATS:
        if group_size and (group_size not in SCALED_GROUP_SIZES or k % group_size):
            raise ValueError(f"{fmt} with per-group scales needs K divisible by its group size (one of "
                             f"{SCALED_GROUP_SIZES}); got K={k}, group size {group_size}; use group size 0 "
                             "(per channel) or online_group_size()")
        return (n, k)
    if fmt == "int4":
        if group_size not in INT4_GROUP_SIZES or k % group_size:
            raise ValueError(f"int4 needs K divisible by its group size (one of {INT4_GROUP_SIZES}); "
                             f"got K={k}, group size {group_size}")
        return (n, k // 2)
    qk, bb = GGUF_BLOCKS[fmt]
    if k % qk:
        raise ValueError(f"{fmt} needs K divisible by {qk}, got K={k}")
    return (n, k // qk * bb)


# ------------------------------------------------------------------------------------------------
# Dequantization (float32), the CPU reference path
# ------------------------------------------------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 stored in the last dim (2 bytes) of a uint8 tensor -> float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (qs & 0xF), (qs >> 4)


def _k_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 8 six-bit (scale, min) pairs packed in 12 bytes [..., 12] -> two [..., 8]."""
    s = sc.int()
    lo_sc = s[..., 0:4] & 63
    lo_m = s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], -1).float(), torch.cat([lo_m, hi_m], -1).float()


def dequantize_gguf(fmt: str, data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Dequantize raw GGUF blocks ``data`` [N, row_bytes] (uint8) to float32 [N, K], as ggml does."""
    qk, bb = GGUF_BLOCKS[fmt]
    b = data.reshape(n, k // qk, bb)  # [N, blocks, bytes]
    if fmt == "q8_0":
        d = _f16(b[..., 0:2])
        w = b.view(torch.int8)[..., 2:] * d[..., None]  # int8 x float32 -> float32, one pass
    elif fmt in ("q4_0", "q4_1"):
        hdr = 2 if fmt == "q4_0" else 4
        lo, hi = _nibbles(b[..., hdr:])
        q = torch.cat([lo, hi], -1).float()  # byte j: weights j (low) and j + 16 (high)
        d = _f16(b[..., 0:2])[..., None]
        w = d * (q - 8.0) if fmt == "q4_0" else d * q + _f16(b[..., 2:4])[..., None]
    elif fmt in ("q4_k", "q5_k"):
        d = _f16(b[..., 0:2])[..., None]
        dmin = _f16(b[..., 2:4])[..., None]
        sc, mn = _k_scales(b[..., 4:16])  # [N, blocks, 8] per 32-weight sub-block
        qs = b[..., 48:] if fmt == "q5_k" else b[..., 16:]
        qs = qs.reshape(n, -1, 4, 32)  # 4 chunks of 64 weights: low nibbles first 32, high the next 32
        lo, hi = _nibbles(qs)
        q = torch.stack([lo, hi], 3).reshape(n, -1, 8, 32).int()  # [N, blocks, sub-block, 32]
        if fmt == "q5_k":
            qh = b[..., 16:48].int()  # bit s of byte l: the fifth bit of weight l of sub-block s
            bits = torch.arange(8, device=data.device, dtype=torch.int32)
            q = q + ((qh[..., None, :] >> bits[:, None]) & 1) * 16
        w = (d * sc)[..., None] * q.float() - (dmin * mn)[..., None]
    elif fmt == "q6_k":
        ql = b[..., 0:128].reshape(n, -1, 2, 2, 32)  # [.., half, ql-offset 0/32, l]
        qh = b[..., 128:192].reshape(n, -1, 2, 32).int()  # [.., half, l]
        sc = b[..., 192:208].contiguous().view(torch.int8).float().reshape(n, -1, 2, 4, 2)  # [.., half, quarter, l//16]
        d = _f16(b[..., 208:210]).reshape(n, -1, 1, 1, 1, 1)
        lo, hi = _nibbles(ql.int())
        low4 = torch.stack([lo[..., 0, :], lo[..., 1, :], hi[..., 0, :], hi[..., 1, :]], 3)  # [.., half, quarter, l]
        shifts = torch.tensor([0, 2, 4, 6], device=data.device, dtype=torch.int32)[:, None]
        high2 = (qh[..., None, :] >> shifts) & 3
        q = (low4 | (high2 << 4)).float() - 32.0
        q = q.reshape(n, -1, 2, 4, 2, 16)
        w = d * sc[..., None] * q
    else:
        raise ValueError(f"{fmt!r} is not a GGUF block format")
    return w.reshape(n, k)


def dequantize(qt: QuantTensor) -> torch.Tensor:
    """Float32 [N, K] of any ``QuantTensor``."""
    n, k = qt.shape
    if qt.fmt in CHANNEL_FORMATS:
        if not qt.group_size:
            return qt.data.float() * qt.scale.float()[:, None]
        g = qt.data.float().reshape(n, k // qt.group_size, qt.group_size)
        return (g * qt.scale.float()[..., None]).reshape(n, k)
    if qt.fmt == "int4":
        lo, hi = _nibbles(qt.data)
        q = torch.stack([lo, hi], -1).reshape(n, k // qt.group_size, qt.group_size).float()
        w = (q - qt.zero.float()[..., None]) * qt.scale.float()[..., None]
        return w.reshape(n, k)
    return dequantize_gguf(qt.fmt, qt.data, n, k)


# ------------------------------------------------------------------------------------------------
# Quantization of float weights (online quantization at load, and tests)
# ------------------------------------------------------------------------------------------------


ONLINE_GROUP_SIZE = 128


def online_group_size(fmt: str, k: int, requested: int | None = None) -> int:
    """The scale group size online quantization uses for a weight with K inputs in ``fmt``.

    int4: ``requested`` (default 128), else the largest of 128 / 64 / 32 dividing K (ValueError if none).
    int8: the same, else 0 (per channel): per-group scales measured better (docs/QUANTIZATION.md).
    fp8: always 0 (per channel, with an MSE-searched scale: it measured better than per-group scales;
    ``quantize(w, "fp8", G)`` still makes per-group fp8). Other formats: 0 (their blocks carry their scales)."""
    if fmt not in ("int4", "int8"):
        return 0
    req = ONLINE_GROUP_SIZE if requested is None or (fmt == "int4" and not requested) else int(requested)
    if req == 0 and fmt != "int4":
        return 0
    allowed = INT4_GROUP_SIZES if fmt == "int4" else SCALED_GROUP_SIZES
    for g in dict.fromkeys((req, 128, 64, 32)):
        if g in allowed and g <= max(req, 32) and k % g == 0:
            return g
    if fmt == "int4":
        raise ValueError(f"cannot quantize to int4: K={k} is not a multiple of 32")
    return 0


# fp8 scale candidates: absmax / 448 times 2^(i/16), i = 0..15 (one octave: every alignment of e4m3's grid)
FP8_SCALE_STEPS = 16


def _fp8_search(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 data, float32 scale) of ``g`` [..., G] with one scale per last-dim row, chosen among
    ``FP8_SCALE_STEPS`` candidates from absmax / 448 up to an octave above it by the squared error.

    NOTE: e4m3's relative step is fixed (1/16), so the scale's range hardly matters; what it sets is where
    the logarithmic grid falls relative to the weights, and absmax / 448 is just one arbitrary alignment."""
    amax = g.abs().amax(-1, keepdim=True)
    best_s = best_e = None
    for i in range(FP8_SCALE_STEPS):
        s = (amax / FP8_MAX * 2.0 ** (i / FP8_SCALE_STEPS)).clamp_min(1e-12)
        err = ((g / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s - g).square().sum(-1, True)
        if best_s is None:
            best_s, best_e = s, err
        else:
            better = err < best_e
            best_s, best_e = torch.where(better, s, best_s), torch.where(better, err, best_e)
    return (g / best_s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), best_s.squeeze(-1)


def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None) -> QuantTensor:
    """Quantize a float weight [N, K] to ``fmt`` (fp8 | int8 | int4; GGUF q8_0 | q4_0 | q4_1 through the
    ``gguf`` package, q4_k | q5_k | q6_k through ``fdpp.quant.kquants``).

    ``group_size``: None = fdpp's online choice for K (``online_group_size``); else exact (it must divide K).
    int4: asymmetric min/max groups along K. int8: symmetric absmax scales per group (0: per output
    channel). fp8: one scale per group or channel (0), searched for the least squared error (``_fp8_search``)."""
    if w.dim() != 2:
        raise ValueError(f"quantize: expected a 2-D weight [N, K], got shape {list(w.shape)}")
    n, k = w.shape
    wf = w.detach().float()
    if group_size is None:
        group_size = online_group_size(fmt, k)
    if fmt in CHANNEL_FORMATS:
        packed_shape(fmt, n, k, group_size)  # validates the group size
        g = wf.reshape(n, k // group_size, group_size) if group_size else wf[:, None, :]
        if fmt == "fp8":
            data, scale = _fp8_search(g)
        else:
            scale = (g.abs().amax(-1) / 127.0).clamp_min(1e-12)
            data = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8)
        scale = scale.contiguous() if group_size else scale[:, 0].contiguous()
        return QuantTensor(fmt, (n, k), data.reshape(n, k).contiguous(), scale, group_size=group_size)
    if fmt == "int4":
        packed_shape("int4", n, k, group_size)
        g = wf.reshape(n, k // group_size, group_size)
        lo, hi = g.amin(-1).clamp(max=0.0), g.amax(-1).clamp(min=0.0)
        scale = ((hi - lo) / 15.0).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
        data = q[:, 0::2] | (q[:, 1::2] << 4)
        # NOTE: the kernels read the float16 scale: quantize against it so that rounding matches.
        return QuantTensor("int4", (n, k), data.contiguous(), scale.half(), zero.to(torch.uint8), group_size)
    if fmt in ("q8_0", "q4_0", "q4_1"):
        import gguf

        raw = gguf.quants.quantize(wf.cpu().numpy(), getattr(gguf.GGMLQuantizationType, fmt.upper()))
        return QuantTensor(fmt, (n, k), torch.from_numpy(raw.copy()).reshape(n, -1).to(w.device))
    if fmt in ("q4_k", "q5_k", "q6_k"):
        from fdpp.quant.kquants import quantize_k

        return QuantTensor(fmt, (n, k), quantize_k(wf, fmt))
    raise ValueError(f"cannot quantize to {fmt!r}; online quantization supports {', '.join(FORMATS)}")


# llama.cpp's fallbacks for tensors whose K is not a multiple of a k-quant's 256-weight super-block
K_QUANT_FALLBACK = {"q4_k": "q4_1", "q5_k": "q8_0", "q6_k": "q8_0"}


def online_format(fmt: str, k: int, name: str = "") -> str:
    """The format a weight with K inputs is quantized into when ``fmt`` is asked for: ``fmt`` itself, or for
    a k-quant and a K that is not a multiple of 256, its 32-block fallback (as llama.cpp's quantizer does)."""
    if fmt in K_QUANT_FALLBACK and k % GGUF_BLOCKS[fmt][0]:
        import logging

        logging.getLogger(__name__).debug("%s: K=%d is not a multiple of 256; %s instead of %s", name or "weight",
                                          k, K_QUANT_FALLBACK[fmt], fmt)
        return K_QUANT_FALLBACK[fmt]
    return fmt


def random_quant(fmt: str, n: int, k: int, *, group_size: int | None = None, device: torch.device | str = "cpu",
                 seed: int = 0) -> QuantTensor:
    """A random weight directly in ``fmt`` (benchmarks with real shapes; weights of magnitude ~0.02).

    GGUF blocks get random quant bits and small float16 block scales; nothing is quantized, so a 7B
    model's worth is built in seconds. ``group_size``: as ``quantize`` (None: the online choice)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if fmt in CHANNEL_FORMATS or fmt in ("int4", "q4_k", "q5_k", "q6_k"):
        # NOTE: k-quants are quantized for real (in PyTorch, on the device): random 6-bit sub-block scales
        # would make weights ~10x too large and a deep model's activations overflow fp16.
        w = torch.randn(n, k, generator=gen, device=device) * 0.02
        return quantize(w, fmt, group_size)
    qk, bb = GGUF_BLOCKS[fmt]
    raw = torch.randint(0, 256, (n, k // qk, bb), generator=gen, device=device, dtype=torch.int32).to(torch.uint8)
    d = 0.002 if qk == 32 else 0.0002  # k-quants multiply d by 6-8 bit sub-block scales
    scale = torch.full((n, k // qk, 1), d, device=device, dtype=torch.float16).view(torch.uint8)
    if fmt == "q6_k":
        raw[..., 208:210] = scale
    else:
        raw[..., 0:2] = scale
        if fmt in ("q4_1", "q4_k", "q5_k"):
            raw[..., 2:4] = scale  # the block min
    return QuantTensor(fmt, (n, k), raw.reshape(n, -1))
