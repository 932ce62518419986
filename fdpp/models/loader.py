"""Build a model on the meta device, place it on its device, and stream weights straight into place."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fdpp.config import ModelConfig
from fdpp.errors import ModelLoadError
from fdpp.models.registry import get_model_class

logger = logging.getLogger(__name__)

# checkpoint tensors that carry no parameters of ours
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    weights: Iterable[tuple[str, torch.Tensor]] | None,
    *,
    num_tensors: int | None = None,
    show_progress: bool = True,
    seed: int = 0,
    quant: Any = None,
    packed_cpu_int4: bool = True,
) -> nn.Module:
    """Construct ``config``'s model with ``dtype`` parameters on ``device``.

    ``weights`` yields (Hugging Face name, tensor) pairs, one at a time; each is copied into its
    parameter (through the parameter's ``weight_loader``), so no second copy of the model exists.
    ``weights=None`` fills the model with random weights (benchmarks with real shapes).
    ``quant`` (a ``fdpp.quant.config.QuantPlan``): which weights are quantized (``mark_quantized_layers``).
    ``packed_cpu_int4``: on the CPU, 4- and 8-bit weights go to PyTorch's packed int4 kernel (the ``cpu``
    linear backend), packed now; False: every quantized weight is planned for memoized dequantization instead.
    """
    cls = get_model_class(config)
    from fdpp.distributed.state import current_tp

    if current_tp() is not None and quant is not None and quant.is_quantized:
        raise NotImplementedError(
            "quantized weights cannot be sharded for tensor parallelism yet; use tensor_parallel_size=1, "
            "or quantization='none' to dequantize the checkpoint")
    with _default_dtype(dtype), torch.device("meta"):
        model = cls(config)
    if quant is not None and quant.is_quantized:
        mark_quantized_layers(model, quant)
    # to_empty makes new Parameter objects: carry the per-parameter attributes (weight loaders,
    # quantization marks) over.
    attrs = {n: dict(vars(p)) for n, p in model.named_parameters()}
    model = model.to_empty(device=device)
    for n, p in model.named_parameters():
        for key, value in attrs.get(n, {}).items():
            setattr(p, key, value)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    if weights is None:
        _init_random(model, seed)
    else:
        load_weights(model, weights, num_tensors=num_tensors, show_progress=show_progress)
    if quant is not None and quant.is_quantized and torch.device(device).type == "cpu":
        _prepare_cpu_quantized(model, packed_cpu_int4, show_progress)
    model.eval()
    return model


def _prepare_cpu_quantized(model: nn.Module, packed_cpu_int4: bool, show_progress: bool) -> None:
    """Quantized weights on the CPU, at load: the LM head's keep float32 logits (``precise_output``); the
    others that PyTorch's packed int4 kernel takes are packed for it (``packed_cpu_int4``), and the rest
    get their memoized dense copies (``fdpp.quant.cpu_cache``)."""
    from fdpp.layers.embedding import LMHead
    from fdpp.quant.cpu_cache import count_packable, pack_cpu_int4, plan_cpu_memoization, warm_cpu_memoization
    from fdpp.quant.formats import QuantParts
    from fdpp.utils import phase

    for module in model.modules():
        q = getattr(module.weight, "quant", None) if isinstance(module, LMHead) else None
        for part in (q.parts if isinstance(q, QuantParts) else [q]):
            if part is not None and not isinstance(part, torch.Tensor):
                part.precise_output = True
    stats = plan_cpu_memoization(model, packed_kernel=packed_cpu_int4)
    logger.info("quantized weights on the CPU: %.0f MB packed, %.0f MB of %.0f MB dense memoized",
                stats["packed_bytes"] / 1e6, stats["memoized_bytes"] / 1e6, stats["dense_bytes"] / 1e6)
    if stats["num_memoized"]:
        with phase(f"Dequantizing {stats['num_memoized']} quantized weights for the CPU", show_progress):
            warm_cpu_memoization(model)
    num_packed = count_packable(model) if packed_cpu_int4 else 0
    if num_packed:
        with phase(f"Packing {num_packed} weights for the CPU int4 kernel", show_progress):
            pack_cpu_int4(model)


def mark_quantized_layers(model: nn.Module, quant: Any) -> None:
    """Mark the weights a ``QuantPlan`` quantizes (on the meta model, before its memory is allocated).

    Online quantization: every ``Linear`` (QKV, O, gate/up, down, ...), not the LM head. A kept quantized
    checkpoint: every ``Linear`` and, for GGUF (which quantizes them too), the embedding and the LM head;
    each takes whatever the checkpoint holds (a dense tensor stays dense)."""
    from fdpp.layers.embedding import LMHead, VocabEmbedding
    from fdpp.layers.linear import Linear, mark_quantized

    mode = quant.online if quant.online is not None else "keep"
    kinds = (Linear, LMHead, VocabEmbedding) if quant.online is None and quant.checkpoint == "gguf" else (Linear,)
    for module in model.modules():
        if isinstance(module, kinds) and getattr(module.weight, "quant_mode", None) is None:
            mark_quantized(module.weight, tuple(module.weight.shape), mode, quant.group_size)


@torch.no_grad()
def _init_random(model: nn.Module, seed: int) -> None:
    from fdpp.layers.linear import set_quant_weight
    from fdpp.quant.formats import online_format, online_group_size, random_quant

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        mode = getattr(p, "quant_mode", None)
        if mode is not None:
            n, k = p.logical_shape
            fmt = online_format(mode, k, name)
            group = online_group_size(fmt, k, p.quant_group_size)
            set_quant_weight(p, [random_quant(fmt, n, k, group_size=group, device=p.device, seed=seed)], name)
            seed += 1
        elif p.dim() == 1:
            if name.endswith("bias"):
                p.zero_()
            else:  # norm weights
                p.fill_(1.0)
        elif getattr(p, "tp_full_shape", None) is not None:
            # a tensor-parallel shard: draw the whole tensor (as TP=1 does) and keep this rank's slice
            whole = torch.empty(p.tp_full_shape, dtype=p.dtype, device=p.device).normal_(0.0, 0.02, generator=gen)
            p.weight_loader(p, whole, name)
        else:
            p.normal_(0.0, 0.02, generator=gen)


@torch.no_grad()
def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    num_tensors: int | None = None,
    show_progress: bool = True,
) -> None:
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    rename = getattr(model, "map_weight_name", None)
    expected_shards = {
        name: len(getattr(mod, "shard_offsets", {}))
        for mname, mod in model.named_modules()
        for name in (f"{mname}.weight", f"{mname}.bias")
        if hasattr(mod, "shard_offsets") and name in params
    }
    seen: dict[str, set] = {}
    unexpected: list[str] = []
    bar = tqdm(total=num_tensors, desc="Loading weights", unit="tensor", disable=not show_progress)
    for ckpt_name, tensor in weights:
        bar.update(1)
        name = rename(ckpt_name) if rename is not None else ckpt_name
        if name is None or name.endswith(_IGNORED_SUFFIXES):
            continue
        if tied and name == "lm_head.weight":
            continue
        shard_id = None
        for frag, (pfrag, sid) in packed.items():
            if f".{frag}." in name:
                name = name.replace(f".{frag}.", f".{pfrag}.")
                shard_id = sid
                break
        param = params.get(name)
        if param is None:
            unexpected.append(ckpt_name)
            continue
        loader = getattr(param, "weight_loader", None)
        if shard_id is not None:
            loader(param, tensor, ckpt_name, shard_id)
        elif loader is not None:
            loader(param, tensor, ckpt_name)
        else:
            if tuple(param.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
        seen.setdefault(name, set()).add(shard_id)
    bar.close()
    missing = []
    for name in params:
        got = seen.get(name)
        if got is None:
            missing.append(name)
        elif name in expected_shards and None not in got and len(got) < expected_shards[name]:
            missing.append(f"{name} (only shards {sorted(got)})")
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelLoadError(
            f"the checkpoint is missing {len(missing)} tensor(s) the model needs: {shown}. "
            "Is the checkpoint complete and does it match config.json?"
        )
    if unexpected:
        logger.warning(
            "ignored %d checkpoint tensor(s) the model does not use, e.g. %s", len(unexpected), unexpected[:3]
        )
