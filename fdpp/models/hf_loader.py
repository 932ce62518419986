"""Model sources and Hugging Face checkpoint folders.

* ``resolve_model(path_or_none) -> ModelSource``: what a ``model=`` argument points at (the
  embedded default GGUF, a .gguf file, a folder holding one, or a Hugging Face folder).
* ``load_hf_config(folder) -> dict``: ``config.json``.
* ``iter_hf_tensors(folder, dtype)``: the weights of ``*.safetensors`` (single or sharded with
  ``model.safetensors.index.json``) or legacy ``pytorch_model*.bin`` files, one tensor at a time.
* ``load_model_config(source)`` / ``iter_model_tensors(source, dtype)``: the same for either kind
  of source (dispatching to ``fdpp.models.gguf_loader`` for GGUF).

fdpp never downloads anything: every path must be local.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fdpp.errors import ModelLoadError

__all__ = [
    "ModelSource",
    "resolve_model",
    "load_hf_config",
    "iter_hf_tensors",
    "hf_weight_files",
    "load_model_config",
    "iter_model_tensors",
]

_SAFE_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"
# Buffers some old checkpoints saved that are not parameters (recomputed from the config).
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    kind: ``"gguf"`` or ``"hf"``.
    path: the Hugging Face folder (``hf``) or the absolute path of the .gguf file (``gguf``).
    gguf_file: the absolute path of the .gguf file (``gguf``), ``None`` for ``hf``.
    is_default: True for the embedded SmolLM2 model (``model=None``).
    """

    kind: Literal["gguf", "hf"]
    path: str
    gguf_file: str | None = None
    is_default: bool = False

    @property
    def directory(self) -> str:
        """The folder holding the model files (tokenizer files of a HF folder, the .gguf's folder)."""
        return os.path.dirname(self.gguf_file) if self.kind == "gguf" else self.path

    @property
    def name(self) -> str:
        return os.path.basename(self.gguf_file if self.kind == "gguf" else self.path.rstrip(os.sep))


def _not_found(path: str) -> ModelLoadError:
    hint = ""
    if not os.path.isabs(path) and path.count("/") == 1 and not path.startswith("."):
        hint = f" ({path!r} looks like a model hub id)"
    return ModelLoadError(
        f"model path {path!r} does not exist{hint}; fdpp cannot download models from a hub: download the "
        "model yourself and pass a local Hugging Face folder (with config.json) or a .gguf file, "
        "or pass no model to use the embedded SmolLM2-135M-Instruct"
    )


def resolve_model(path: str | os.PathLike[str] | None) -> ModelSource:
    """Resolve a ``model=`` argument.

    * ``None``: the embedded SmolLM2-135M-Instruct GGUF (``fdpp.models.default_model``).
    * a ``.gguf`` file (or any file starting with the GGUF magic): ``kind="gguf"``.
    * a folder with ``config.json``: ``kind="hf"``.
    * a folder without ``config.json`` holding exactly one ``.gguf`` file: that file.

    Raises ``ModelLoadError`` for a missing path (fdpp cannot download), a file that is neither a
    GGUF nor a folder, or a folder that holds no model.
    """
    from fdpp.models.gguf_loader import is_gguf_file

    if path is None:
        from fdpp.models.default_model import default_model_path

        f = default_model_path()
        return ModelSource("gguf", f, f, is_default=True)
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise _not_found(path)
    path = os.path.abspath(path)
    if os.path.isfile(path):
        if path.endswith(".gguf") or is_gguf_file(path):
            return ModelSource("gguf", path, path)
        if os.path.basename(path) == "config.json" or path.endswith((".safetensors", ".bin", ".json")):
            raise ModelLoadError(
                f"{path!r} is a single file of a Hugging Face checkpoint; pass the folder that holds it "
                f"({os.path.dirname(path)!r})"
            )
        raise ModelLoadError(
            f"{path!r} is neither a GGUF file nor a model folder; pass a .gguf file or a Hugging Face folder "
            "with config.json"
        )
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource("hf", path, None)
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(os.path.basename(g) for g in ggufs)
        raise ModelLoadError(f"folder {path!r} holds several GGUF files ({names}); pass the one to use")
    raise ModelLoadError(
        f"folder {path!r} has no config.json and no .gguf file; pass a Hugging Face model folder "
        "(config.json + *.safetensors or pytorch_model*.bin) or a .gguf file"
    )


def load_hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``<path>/config.json`` into a dict (raises ``ModelLoadError`` if missing or invalid)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _not_found(path) if not os.path.exists(path) else ModelLoadError(f"{path!r} is not a model folder")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(
            f"{cfg_path!r} not found: a Hugging Face model folder needs its config.json; copy it from the "
            "model's repository"
        )
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{cfg_path!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); the file is "
            "corrupt or truncated: restore it from the model's repository"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {cfg_path!r}: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path!r} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_index(index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"shard index {index_path!r} is invalid ({type(e).__name__}: {e}); it must be JSON with a "
            "'weight_map' object: restore it from the model's repository"
        ) from e
    folder = os.path.dirname(index_path)
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise ModelLoadError(
            f"shard index {index_path!r} lists {len(missing)} shard file(s) that do not exist: "
            f"{', '.join(missing)}; the download is incomplete: fetch the missing shards"
        )
    return [os.path.join(folder, s) for s in shards]


def hf_weight_files(path: str | os.PathLike[str]) -> tuple[str, list[str]]:
    """The weight files of a Hugging Face folder: ``("safetensors" | "bin", [files])``.

    Preference: ``model.safetensors.index.json`` (every listed shard must exist), ``*.safetensors``
    (``model*.safetensors`` if any, so a stray ``consolidated.safetensors`` is not read too),
    ``pytorch_model.bin.index.json``, ``pytorch_model*.bin``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _not_found(path) if not os.path.exists(path) else ModelLoadError(f"{path!r} is not a model folder")
    idx = os.path.join(path, _SAFE_INDEX)
    if os.path.isfile(idx):
        return "safetensors", _read_index(idx)
    files = sorted(glob.glob(os.path.join(path, "model*.safetensors"))) or sorted(
        glob.glob(os.path.join(path, "*.safetensors"))
    )
    if files:
        return "safetensors", files
    idx = os.path.join(path, _BIN_INDEX)
    if os.path.isfile(idx):
        return "bin", _read_index(idx)
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if files:
        return "bin", files
    raise ModelLoadError(
        f"no weights found in {path!r}: expected *.safetensors (optionally with {_SAFE_INDEX}) or "
        "pytorch_model*.bin files"
    )


def _convert(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():  # None: as stored (quantized checkpoints, grouped later)
        t = t.to(dtype)
    return t.contiguous()


def _iter_safetensors(file: str, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    size = os.path.getsize(file)
    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: header too small / invalid / incomplete buffer
        raise ModelLoadError(
            f"safetensors file {file!r} ({size} bytes) is truncated or corrupt ({type(e).__name__}: {e}); "
            "re-download it"
        ) from e
    with handle as f:
        for name in f.keys():
            if name.endswith(_SKIP_SUFFIXES):
                continue
            try:
                t = f.get_tensor(name)
            except Exception as e:
                raise ModelLoadError(
                    f"cannot read tensor {name!r} from safetensors file {file!r} ({type(e).__name__}: {e}); "
                    "the file is truncated or corrupt: re-download it"
                ) from e
            yield name, _convert(t, dtype)
            del t


def _iter_bin(file: str, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    def load(mmap: bool):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            sd = load(True)  # zip format: tensors stay in the page cache until converted
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = load(False)  # legacy (pre-1.6) format cannot be memory-mapped
    except Exception as e:
        raise ModelLoadError(
            f"cannot load PyTorch checkpoint {file!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the file is truncated or corrupt, or holds more than plain tensors (fdpp loads with "
            "weights_only=True): re-download it or convert it to safetensors"
        ) from e
    if not isinstance(sd, dict):
        raise ModelLoadError(f"PyTorch checkpoint {file!r} holds a {type(sd).__name__}, not a state dict")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    try:
        for name in list(sd.keys()):
            t = sd.pop(name)
            if not isinstance(t, torch.Tensor) or name.endswith(_SKIP_SUFFIXES):
                continue
            yield name, _convert(t, dtype)
            del t
    finally:
        sd.clear()


def iter_hf_tensors(
    path: str | os.PathLike[str], dtype: torch.dtype | None = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a Hugging Face folder's weights, one at a time.

    Contract (what the engine's weight loader can rely on):

    * ``name`` is the name stored in the checkpoint, i.e. the HF ``state_dict`` key
      (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``, ...). Tied checkpoints
      usually have no ``lm_head.weight``. ``rotary_emb.inv_freq`` buffers of old checkpoints are
      skipped.
    * ``tensor`` is a contiguous CPU tensor; floating-point tensors are converted to ``dtype``,
      others keep their type (``dtype=None``: every tensor as stored). It may share memory with a read-only mapping of the file (when no
      conversion was needed): copy it into the parameter (``param.copy_(t)``), never modify it in
      place, and drop the reference before taking the next one.
    * Files are read in index/sorted order through ``safetensors.safe_open`` (tensor by tensor) or
      ``torch.load(weights_only=True, mmap=True)``.

    Raises ``ModelLoadError`` (naming the file) for: a missing folder, no weight files, an invalid
    shard index or one naming a missing shard, a truncated/corrupt safetensors or .bin file.
    """
    kind, files = hf_weight_files(path)
    it = _iter_safetensors if kind == "safetensors" else _iter_bin
    for file in files:
        yield from it(file, dtype)


def load_model_config(source: ModelSource) -> dict[str, Any]:
    """The HF-style config dict of either kind of source (``config.json`` or GGUF metadata)."""
    if source.kind == "gguf":
        from fdpp.models.gguf_loader import load_gguf_config

        return load_gguf_config(source.gguf_file)
    return load_hf_config(source.path)


def iter_model_tensors(
    source: ModelSource, dtype: torch.dtype = torch.float32, *, config: dict[str, Any] | None = None,
    quant: Any = None,
) -> Iterator[tuple[str, Any]]:
    """``iter_gguf_tensors`` or ``iter_hf_tensors`` depending on ``source.kind`` (same contract:
    HF names, contiguous CPU tensors in ``dtype``, one at a time).

    ``quant`` (a ``fdpp.quant.config.QuantPlan``): for a quantized checkpoint whose plan keeps it
    quantized, linear weights come as ``QuantTensor`` (GGUF blocks as stored; AWQ / GPTQ / FP8 parts joined
    into ``<module>.weight``); when the plan does not keep them they come dequantized to ``dtype``."""
    if source.kind == "gguf":
        from fdpp.models.gguf_loader import iter_gguf_tensors

        keep = quant is not None and quant.keep
        return iter_gguf_tensors(source.gguf_file, dtype, config=config, keep_quantized=keep)
    if quant is not None and quant.checkpoint is not None:
        from fdpp.quant.checkpoint import group_quantized

        return group_quantized(iter_hf_tensors(source.path, None), quant, dtype)
    return iter_hf_tensors(source.path, dtype)
