"""Shared helpers of the model-family tests: load a tiny checkpoint with fdpp and compare it with a
transformers model holding the same weights (prefill logits and greedy tokens)."""
from __future__ import annotations

import contextlib
import json
import os

import torch

from fdpp import LLM, SamplingParams

LOGITS_TOL = 1e-4  # relative norm error of fp32 prefill logits


def randomize_(model: torch.nn.Module, std: float = 0.08, seed: int = 0) -> torch.nn.Module:
    """Larger-than-default random weights (and random biases / norm weights), so tokens differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def random_prompt(n: int, vocab: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def load_llm(path: str, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", show_progress=False, calibration="off", **kwargs)


def prefill_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """fdpp's logits at every prompt position, through the paged cache (one prefill step)."""
    return llm.engine.prompt_logits(prompt)


def hf_logits(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0]


def hf_greedy_predictions(hf_model, prompt: list[int], tokens: list[int]) -> list[int]:
    """transformers' argmax after ``prompt + tokens[:i]`` for every i, from one teacher-forced forward.

    ``tokens`` is transformers' own greedy continuation exactly when this returns ``tokens`` (by
    induction over the steps), at the cost of one forward pass instead of one per token.
    """
    logits = hf_logits(hf_model, prompt + tokens[:-1])
    return logits[len(prompt) - 1:].argmax(-1).tolist()


def fdpp_greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).norm() / ref.norm())


def check_against_hf(
    llm: LLM, hf_model, prompts: list[list[int]], n_greedy: int, tol: float = LOGITS_TOL
) -> None:
    """Prefill logits of prompts[0] within ``tol``, and identical greedy tokens for every prompt
    (generated as one batch, so decode runs batched over the paged cache)."""
    err = rel_err(prefill_logits(llm, prompts[0]), hf_logits(hf_model, prompts[0]))
    assert err < tol, f"prefill logits rel err {err:.2e} >= {tol:.0e}"
    ours = fdpp_greedy(llm, prompts, n_greedy)
    for prompt, got in zip(prompts, ours):
        assert len(got) == n_greedy
        assert got == hf_greedy_predictions(hf_model, prompt, got), "greedy tokens differ from transformers'"
    llm.engine.check_integrity()


@contextlib.contextmanager
def triton_backends(linear: str) -> contextlib.AbstractContextManager[None]:
    """Force the Triton attention kernels and one GEMM implementation (interpreted on the CPU) over the
    LLM's own backends, for the engine steps run in the block (one loaded model, several backends)."""
    from fdpp.ops.backend import use_backends

    with use_backends(attention="triton", linear=linear):
        yield


def check_triton_against_hf(
    llm: LLM, hf_model, prompt: list[int], decode_linear: str, n_decode: int = 2, unified: bool = True
) -> None:
    """Prefill logits and greedy tokens through the Triton attention kernels (prefill and paged
    decode) and Triton GEMMs: the flat GEMM for the prefill (M = prompt length), ``decode_linear``
    (the GEMV, or the flat GEMM) for the decode steps (M = 1), as the dataflow would choose them.

    Twice: with the synchronized softmax (no phi), then with the asynchronized (unified-max) softmax
    and the phi that calibration picks for this model, asserting the unified kernels kept their rows
    on the fast path (the fallback counters). Kept tiny: the Triton interpreter is slow.
    ``unified=False`` skips the second pass (tests about the GEMMs, whose softmax is covered elsewhere)."""
    from fdpp.engine.loading import calibrate_engine, set_phi
    from fdpp.ops.attention import fallback_stats, reset_fallback_stats

    _check_triton_once(llm, hf_model, prompt, decode_linear, n_decode)
    if not unified:
        return
    calib = calibrate_engine(llm.engine, texts=[random_prompt(64, llm.engine.model_config.vocab_size, seed=9)],
                             save=False)
    assert calib.mode != "synchronized", calib.summary()
    set_phi(llm.engine.model, calib)
    try:
        reset_fallback_stats()
        _check_triton_once(llm, hf_model, prompt, decode_linear, n_decode)
        stats = fallback_stats()
    finally:
        set_phi(llm.engine.model, None)
    # every layer ran the unified kernels (prefill and decode rows) and most rows needed no recompute
    num_layers = llm.engine.model_config.num_hidden_layers
    assert len(stats["per_layer"]) == num_layers and stats["rows_checked"] > 0, stats
    assert stats["rate"] < 0.5, stats


def check_cpu_int4_against_hf(llm: LLM, hf_model, prompt: list[int], tol: float = 2e-2) -> None:
    """Prefill logits through the ``cpu`` linear backend (4-bit weights in PyTorch's packed int4 kernel, with
    bfloat16 activations: a looser tolerance than fp32's) against the twin, with the kernel taken."""
    from fdpp.ops.backend import use_backends
    from fdpp.quant import cpu_int4

    calls = []
    real = cpu_int4.matmul

    def counting(x2, packed):
        calls.append(x2.shape[0])
        return real(x2, packed)

    cpu_int4.matmul = counting
    try:
        with use_backends(linear="cpu"):
            err = rel_err(prefill_logits(llm, prompt), hf_logits(hf_model, prompt))
    finally:
        cpu_int4.matmul = real
    assert calls, "no matmul took the packed int4 kernel"
    assert err < tol, f"cpu int4 prefill logits rel err {err:.2e} >= {tol:.0e}"


def _check_triton_once(llm: LLM, hf_model, prompt: list[int], decode_linear: str, n_decode: int) -> None:
    with triton_backends("flat"):
        err = rel_err(prefill_logits(llm, prompt), hf_logits(hf_model, prompt))
    assert err < LOGITS_TOL, f"triton prefill logits rel err {err:.2e}"
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=n_decode + 1, ignore_eos=True)
    eng.add_request("triton-check", prompt, params)
    with triton_backends("flat"):
        outs = eng.step()  # the prefill, which also samples the first token
    with triton_backends(decode_linear):
        while eng.has_unfinished_requests():
            outs = eng.step() or outs
    tokens = list(outs[0].outputs[0].token_ids)
    assert len(tokens) == n_decode + 1 and outs[0].finished
    assert tokens == hf_greedy_predictions(hf_model, prompt, tokens), f"greedy tokens ({decode_linear})"
    eng.check_integrity()


def save_safetensors_checkpoint(path: str, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write ``model.safetensors`` and ``config.json`` (a checkpoint in a layout transformers lacks)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def rewrite_checkpoint(path: str, edit) -> None:
    """Apply ``edit(tensors) -> tensors`` to ``path``'s model.safetensors (load-error tests)."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = edit(dict(load_file(file)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, file)


def check_preset_model(mc, preset: str, expected_params: int):
    """Build ``mc``'s model on the meta device: its parameter count is the published one and its linear
    shapes are those the dataflow tuner profiles for ``preset``. Returns the model class."""
    from fdpp.dataflow.shapes import preset_shapes
    from fdpp.layers.embedding import LMHead
    from fdpp.layers.linear import Linear
    from fdpp.models.registry import get_model_class

    cls = get_model_class(mc)
    with torch.device("meta"):
        model = cls(mc)
    assert sum(p.numel() for p in model.parameters()) == expected_params
    ours = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, (Linear, LMHead))}
    assert ours == set(preset_shapes(preset).values())
    return cls
