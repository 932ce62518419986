"""GGUF checkpoints (llama.cpp's format): metadata -> a Hugging Face style config dict, and the
tensors -> (Hugging Face name, dequantized torch tensor) pairs, one tensor at a time.

Everything goes through the ``gguf`` package (``gguf.GGUFReader`` memory-maps the file;
``gguf.quants.dequantize`` turns quantized blocks into float32). Only the tensor being yielded is
materialised, so peak memory is about one dequantized tensor on top of the model being filled.

GGUF quirks handled here (the engine's weight loader does not need to know them):

* Shapes: GGUF stores dimensions fastest-first (``[in, out]`` for a linear weight); tensors are
  yielded in PyTorch/HF order (``[out, in]``).
* Llama-family rotary permutation: llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of
  ``q_proj`` / ``k_proj`` (per head, from HF's "rotate half" layout to interleaved pairs) for
  ``llama`` (and Mistral, which llama.cpp stores as ``llama``). This is undone here, so the weights
  match HF's layout and are meant for the NeoX / rotate-half rotary (``is_neox=True``).
  Qwen2/Qwen3 GGUFs are not permuted.
* Tied embeddings: there is no ``output.weight`` in the file; the config says
  ``tie_word_embeddings: True`` and no ``lm_head.weight`` is yielded.
* Llama-3.1 style rope scaling is stored by llama.cpp as a ``rope_freqs.weight`` tensor (per
  rotary frequency divisors) rather than metadata. It is not yielded as a weight; its values are put
  in the config dict as ``rope_freq_factors`` (list of floats, ``head_dim // 2`` long): divide the
  inverse frequency ``theta ** (-2i/d)`` by ``rope_freq_factors[i]``.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fdpp.errors import ModelLoadError, UnsupportedModelError

__all__ = [
    "GGUF_ARCHITECTURES",
    "open_gguf",
    "is_gguf_file",
    "read_gguf_metadata",
    "load_gguf_config",
    "iter_gguf_tensors",
    "gguf_tensor_names",
    "gguf_to_hf_name",
    "supported_quant_types",
    "gguf_tensor_to_quant",
]

_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class _ArchSpec:
    hf_architecture: str
    model_type: str
    permute_qk: bool  # llama.cpp permuted q/k rows for its interleaved rotary


# GGUF ``general.architecture`` -> how fdpp reads it. All are llama-like decoders.
GGUF_ARCHITECTURES: dict[str, _ArchSpec] = {
    "llama": _ArchSpec("LlamaForCausalLM", "llama", True),
    "mistral": _ArchSpec("MistralForCausalLM", "mistral", True),
    "qwen2": _ArchSpec("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": _ArchSpec("Qwen3ForCausalLM", "qwen3", False),
}

# llama.cpp per-layer tensor names -> HF names (after ``model.layers.N.``)
_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_MAP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors that are not module parameters in HF (consumed into the config instead).
_IGNORED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")


def _quant_types() -> tuple[str, ...]:
    import gguf
    from gguf import quants

    names = ["F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"]
    traits = getattr(quants, "_type_traits", {})
    names += [q.name for q in traits if q.name not in names]
    return tuple(n for n in names if hasattr(gguf.GGMLQuantizationType, n))


@functools.lru_cache(maxsize=1)
def supported_quant_types() -> tuple[str, ...]:
    """GGML tensor types ``iter_gguf_tensors`` can dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*,
    the K-quants, IQ*, ... whatever the installed ``gguf`` package implements)."""
    return _quant_types()


def __getattr__(name: str) -> Any:
    # NOTE: computed on first use, so importing this module (e.g. to resolve an HF folder) needs no gguf
    if name == "SUPPORTED_QUANT_TYPES":
        return supported_quant_types()
    raise AttributeError(name)


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a file starting with the GGUF magic (cheap; reads 4 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


_READER_CACHE: dict[tuple[str, int, int], Any] = {}


def open_gguf(path: str | os.PathLike[str]):
    """Open a GGUF file with ``gguf.GGUFReader`` (memory-mapped), turning every failure into a
    ``ModelLoadError`` / ``UnsupportedModelError`` that names the file and says what to do.

    Parsing the header of a file with a large vocabulary takes seconds, so the last reader opened
    is cached (keyed by path, size and modification time; it holds only a memory map)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _READER_CACHE:
        return _READER_CACHE[key]
    reader = _open_gguf_uncached(path)
    _READER_CACHE.clear()
    if key is not None:
        _READER_CACHE[key] = reader
    return reader


def _open_gguf_uncached(path: str):
    if not os.path.exists(path):
        raise ModelLoadError(f"GGUF file not found: {path!r}; check the path (fdpp cannot download models)")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path!r} is a directory, not a GGUF file; pass the .gguf file itself")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(
            f"{path!r} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF'); "
            "pass a llama.cpp .gguf file or a Hugging Face model folder"
        )
    try:
        reader = _reader_class()(path)
    except Exception as e:  # the reader raises ValueError/IndexError/KeyError/... on bad input
        msg = str(e)
        if "GGMLQuantizationType" in msg:
            raise UnsupportedModelError(
                f"GGUF file {path!r} uses a tensor type the installed gguf package does not know ({msg}); "
                f"upgrade gguf (pip install -U gguf) or use a file quantized as one of {', '.join(supported_quant_types())}"
            ) from e
        raise ModelLoadError(
            f"GGUF file {path!r} ({size} bytes) is truncated or corrupt: gguf.GGUFReader failed with "
            f"{type(e).__name__}: {msg}; re-download or re-convert the file"
        ) from e
    # The reader slices the memory map without checking that the file is long enough.
    for t in reader.tensors:
        expected = int(t.n_bytes)
        if t.data.nbytes != expected or t.data_offset + expected > size:
            raise ModelLoadError(
                f"GGUF file {path!r} is truncated: tensor {t.name!r} ({t.tensor_type.name}, shape "
                f"{list(reversed([int(x) for x in t.shape]))}) needs bytes {t.data_offset}..{t.data_offset + expected} "
                f"but the file has {size} bytes; re-download the file"
            )
    return reader


_FAST_READER: type | None = None


def _reader_class() -> type:
    """``gguf.GGUFReader`` over a plain-ndarray view of its memory map (zero copy, still file-backed).

    NOTE: the reader slices its ``data`` once per element while parsing the metadata (~1M slices for a
    49k-token vocabulary), and a ``np.memmap`` runs Python-level ``__getitem__`` / ``__array_finalize__``
    for each: 2.7 s to open the embedded SmolLM2 GGUF, 1.0 s through the plain view (same fields and
    tensors, bit for bit)."""
    global _FAST_READER
    if _FAST_READER is None:
        import gguf
        import numpy as np

        class FastGGUFReader(gguf.GGUFReader):
            @property
            def data(self):
                return self._data

            @data.setter
            def data(self, value):
                self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

        _FAST_READER = FastGGUFReader
    return _FAST_READER


def _field_value(field) -> Any:
    """Decode a ``ReaderField`` to str / int / float / bool / list."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    v = field.parts[field.data[0]].tolist()[0]
    if types[0] == gguf.GGUFValueType.BOOL:
        return bool(v)
    return v


_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def read_gguf_metadata(reader_or_path, *, include_vocab: bool = False) -> dict[str, Any]:
    """All GGUF key/value metadata as a plain dict (``{"llama.block_count": 30, ...}``).

    The large tokenizer arrays (tokens, merges, token types, scores) are skipped unless
    ``include_vocab``; they are decoded by the tokenizer loader instead.
    """
    reader = open_gguf(reader_or_path) if isinstance(reader_or_path, (str, os.PathLike)) else reader_or_path
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if not include_vocab and key in _BIG_ARRAYS:
            continue
        out[key] = _field_value(field)
    return out


def _arch_of(meta: dict[str, Any], path: str) -> tuple[str, _ArchSpec]:
    arch = meta.get("general.architecture")
    if arch is None:
        raise ModelLoadError(f"GGUF file {path!r} has no general.architecture metadata; the file is corrupt")
    spec = GGUF_ARCHITECTURES.get(arch)
    if spec is None:
        raise UnsupportedModelError(
            f"GGUF file {path!r} has architecture {arch!r}, which fdpp does not support; supported GGUF "
            f"architectures: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    name = str(meta.get("general.name") or "").lower()
    if arch == "llama" and "mistral" in name:
        spec = GGUF_ARCHITECTURES["mistral"]  # llama.cpp stores Mistral as "llama" (same layout)
    return arch, spec


def load_gguf_config(path: str | os.PathLike[str], reader=None) -> dict[str, Any]:
    """Read a GGUF file's metadata into a Hugging Face ``config.json``-style dict, ready for
    ``fdpp.config.ModelConfig.from_hf_dict``.

    Keys: ``architectures`` (e.g. ``["LlamaForCausalLM"]``), ``model_type``, ``vocab_size``,
    ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``, ``rope_theta``, ``rope_scaling``
    (only when the file declares one), ``max_position_embeddings`` (GGUF ``context_length``),
    ``tie_word_embeddings`` (True when the file has no ``output.weight``), ``attention_bias`` (True
    when q/k/v biases are present), ``mlp_bias``, ``hidden_act`` ("silu"), ``bos_token_id``,
    ``eos_token_id``, ``pad_token_id``, ``torch_dtype`` (the checkpoint's natural half type:
    "float32" for all-F32 files, "bfloat16" for BF16 files, else "float16"), ``sliding_window``
    when declared, ``rope_freq_factors`` when the file has a ``rope_freqs.weight`` tensor (see the
    module docstring), and ``gguf`` (a sub-dict: file, architecture, file_type, tensor types).
    """
    path = os.fspath(path)
    reader = reader if reader is not None else open_gguf(path)
    meta = read_gguf_metadata(reader)
    arch, spec = _arch_of(meta, path)

    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise ModelLoadError(f"GGUF file {path!r} is missing the metadata key {full!r}; the file is incomplete")
        return default

    tensors = {t.name: t for t in reader.tensors}
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer list in some files
        kv_heads = max(kv_heads)
    head_dim = get("attention.key_length", None) or hidden // heads
    ffn = get("feed_forward_length")
    if isinstance(ffn, list):
        ffn = max(ffn)

    vocab = get("vocab_size", None)
    if vocab is None:
        field = reader.fields.get("tokenizer.ggml.tokens")
        if field is not None:
            vocab = len(field.data)
        elif "token_embd.weight" in tensors:
            vocab = int(tensors["token_embd.weight"].shape[1])
        else:
            raise ModelLoadError(f"GGUF file {path!r} declares no vocabulary size and has no token_embd.weight")

    cfg: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": any(f"blk.0.attn_{p}.bias" in tensors for p in ("q", "k", "v")),
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "hidden_act": "silu",
    }
    rot = get("rope.dimension_count", None)
    if rot is not None and int(rot) != cfg["head_dim"]:
        cfg["partial_rotary_factor"] = int(rot) / cfg["head_dim"]
    sw = get("attention.sliding_window", None)
    if sw:
        cfg["sliding_window"] = int(sw)
        cfg["use_sliding_window"] = True

    # RoPE scaling (linear / yarn / ...), as llama.cpp writes it.
    stype = get("rope.scaling.type", None)
    factor = get("rope.scaling.factor", None)
    if stype and stype != "none" and factor:
        rs: dict[str, Any] = {"rope_type": str(stype), "type": str(stype), "factor": float(factor)}
        orig = get("rope.scaling.original_context_length", None)
        if orig:
            rs["original_max_position_embeddings"] = int(orig)
        cfg["rope_scaling"] = rs
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        cfg["rope_freq_factors"] = [float(x) for x in _dequantize(t, path).reshape(-1)]

    for key, out in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("padding_token_id", "pad_token_id")):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[out] = int(v)

    file_type = meta.get("general.file_type")
    ttypes = sorted({t.tensor_type.name for t in reader.tensors})
    big = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    if big and big <= {"F32"}:
        cfg["torch_dtype"] = "float32"
    elif big and big <= {"BF16", "F32"}:
        cfg["torch_dtype"] = "bfloat16"
    else:
        cfg["torch_dtype"] = "float16"
    cfg["gguf"] = {"file": path, "architecture": arch, "file_type": file_type, "tensor_types": ttypes,
                   "name": meta.get("general.name")}
    return cfg


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """Map a llama.cpp tensor name to its Hugging Face name (``None`` for tensors that are not
    parameters, such as ``rope_freqs.weight``). Raises ``UnsupportedModelError`` for unknown names."""
    if gguf_name in _IGNORED:
        return None
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        hf = _LAYER_MAP.get(part)
        if hf is not None:
            return f"model.layers.{layer}.{hf}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if kind in ("weight", "bias") and base in _GLOBAL_MAP:
            return f"{_GLOBAL_MAP[base]}.{kind}"
    raise UnsupportedModelError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart known to fdpp (this architecture "
        "variant is not supported)"
    )


def gguf_tensor_names(path: str | os.PathLike[str]) -> list[str]:
    """The HF names ``iter_gguf_tensors`` will yield, in file order (no data is read)."""
    reader = open_gguf(path)
    out = []
    for t in reader.tensors:
        n = gguf_to_hf_name(t.name)
        if n is not None:
            out.append(n)
    return out


def _dequantize(t, path: str) -> np.ndarray:
    """Dequantize one ReaderTensor to a float32 (or integer) numpy array in PyTorch dimension order."""
    from gguf import quants

    shape = tuple(reversed([int(x) for x in t.shape]))
    name = t.tensor_type.name
    if name not in supported_quant_types():
        raise UnsupportedModelError(
            f"tensor {t.name!r} in GGUF file {path!r} is quantized as {name}, which fdpp cannot dequantize; "
            f"use a file quantized as one of {', '.join(supported_quant_types())}"
        )
    if name in ("F32", "F16", "F64", "I8", "I16", "I32", "I64"):
        # A private, writable copy of the memory-mapped data (F16 stays float16: torch converts it
        # straight to the target dtype).
        arr = np.array(t.data, copy=True)
    else:
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"tensor {t.name!r} in GGUF file {path!r}: dequantizing {name} is not implemented by the "
                f"installed gguf package ({e}); upgrade gguf or use another quantization"
            ) from e
    try:
        return arr.reshape(shape)
    except ValueError as e:
        raise ModelLoadError(
            f"tensor {t.name!r} in GGUF file {path!r} has {arr.size} elements but declares shape {list(shape)}; "
            "the file is corrupt"
        ) from e


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute(w, n_head)``: rows ``[head, 2, half]`` were stored as
    ``[head, half, 2]``; restore HF's rotate-half order. Works for weights and biases."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(f"cannot undo rotary permutation: {rows} rows not divisible by 2*{n_head} heads")
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


_DENSE_TYPES = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def gguf_tensor_to_quant(t, path: str):
    """A quantized 2-D GGUF tensor as a ``QuantTensor`` of its raw blocks (HF shape [out, in]); None for
    dense types (F32, F16, BF16, ...). Raises ``UnsupportedModelError`` naming the tensor and type when fdpp
    cannot run that block type quantized."""
    from fdpp.quant.formats import GGUF_BLOCKS, QuantTensor

    name = t.tensor_type.name
    if name in _DENSE_TYPES or len(t.shape) != 2:
        return None
    fmt = name.lower()
    if fmt not in GGUF_BLOCKS:
        raise UnsupportedModelError(
            f"tensor {t.name!r} in GGUF file {path!r} is {name}, which fdpp cannot run quantized (it runs "
            f"{', '.join(f.upper() for f in GGUF_BLOCKS)}); pass quantization='none' (--quantization none) to "
            "dequantize it at load, or use a file quantized as one of those types"
        )
    k, n = (int(x) for x in t.shape)  # GGUF dims are fastest-first: [in, out]
    raw = torch.from_numpy(np.array(t.data, copy=True)).reshape(n, -1)  # a private copy, not a file view
    try:
        return QuantTensor(fmt, (n, k), raw)
    except ValueError as e:
        raise ModelLoadError(f"tensor {t.name!r} in GGUF file {path!r}: {e}; the file is corrupt") from e


def iter_gguf_tensors(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, *, config: dict[str, Any] | None = None,
    keep_quantized: bool = False,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(hf_name, tensor)`` for every parameter tensor of a GGUF file, one at a time.

    Contract (what the engine's weight loader can rely on):

    * ``hf_name`` is the Hugging Face parameter name (``model.embed_tokens.weight``,
      ``model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}``,
      ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, ``model.layers.{i}.input_layernorm.weight``,
      ``model.layers.{i}.post_attention_layernorm.weight``, ``model.norm.weight``, ``lm_head.weight``
      (absent when embeddings are tied), Qwen3's ``self_attn.{q,k}_norm.weight``).
    * ``tensor`` is a fresh, contiguous CPU tensor of ``dtype`` (floating types; integer GGML
      tensors keep their integer type) in HF shape (``[out_features, in_features]`` for linears),
      owning its memory (not a view of the memory-mapped file), with llama.cpp's q/k rotary row
      permutation already undone. Each name is yielded once, in file order.
    * Only one tensor is materialised at a time (plus the float32 dequantization buffer).
    * ``keep_quantized``: quantized 2-D tensors come as ``fdpp.quant.QuantTensor`` (their blocks as
      stored, rows un-permuted the same way) instead of being dequantized; block types fdpp cannot run
      raise ``UnsupportedModelError``.

    ``config`` (the dict from ``load_gguf_config``) is read from the file when not given.
    Raises ``ModelLoadError`` for missing/corrupt/truncated files and ``UnsupportedModelError`` for
    unsupported architectures, quantization types or tensor names.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    cfg = config if config is not None else load_gguf_config(path, reader=reader)
    arch = cfg.get("gguf", {}).get("architecture") or cfg.get("model_type")
    spec = GGUF_ARCHITECTURES.get(arch) or GGUF_ARCHITECTURES.get(cfg.get("model_type", ""))
    if spec is None:
        raise UnsupportedModelError(f"GGUF file {path!r}: unsupported architecture {arch!r}")
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg["num_key_value_heads"])
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            continue
        qt = gguf_tensor_to_quant(t, path) if keep_quantized else None
        if qt is not None:
            if spec.permute_qk and (".attn_q." in t.name or ".attn_k." in t.name):
                rows = torch.arange(qt.shape[0])
                qt = qt.permute_rows(_unpermute_rotary(rows, n_head if ".attn_q." in t.name else n_kv))
            yield hf_name, qt
            continue
        arr = _dequantize(t, path)
        out = torch.from_numpy(np.ascontiguousarray(arr))  # arr is a fresh array: no file view
        if out.is_floating_point():
            out = out.to(dtype)
        del arr
        if spec.permute_qk and (".attn_q." in t.name or ".attn_k." in t.name):
            out = _unpermute_rotary(out, n_head if ".attn_q." in t.name else n_kv)
        yield hf_name, out.contiguous()
