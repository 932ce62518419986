"""Flags shared by the commands that load a model or sample, and the help formatter of every command."""
from __future__ import annotations

import argparse
import os
from typing import Any

from fdpp.errors import InvalidRequestError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless the help already states it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every fdpp parser and sub-parser (sub-parsers are made with the parent's class) shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="Hugging Face folder, .gguf file, or preset name (llama-2-7b, llama-2-13b, llama-3-8b, "
                   "... with random weights). Default: the embedded SmolLM2-135M-Instruct.")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="use this tokenizer (a Hugging Face folder or .gguf file) instead of the model's own; "
                   "its vocabulary must fit the model's")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (auto: float32 on CPU, the checkpoint's half type on GPU)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--max-model-len", type=int, default=None, help="context length cap (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    g.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size in GiB (default: 1 GiB on CPU; GPU: from --gpu-memory-utilization)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory fdpp may use (weights + activations + KV cache)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    g.add_argument("--cuda-graph-prefill-max-tokens", type=int, default=1024, metavar="N",
                   help="capture CUDA graphs of one-prompt prefill steps padded to 16..N tokens, so a short "
                   "prompt's prefill is one replay instead of hundreds of launches (default 1024; 0: off)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule step t+1 while step t runs on the GPU, reading tokens one step late "
                   "(default: on for CUDA, off on CPU)")
    g.add_argument("--fuse-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse RMSNorm (+ residual) into the qkv / gate_up GEMV prologue "
                   "(default: on with Triton linear kernels; env FDPP_FUSED_NORM=0 disables)")
    g.add_argument("--fuse-rope", action=argparse.BooleanOptionalAction, default=None,
                   help="let the qkv GEMV apply the rotary embedding and write the KV cache in its epilogue "
                   "(Llama family; default: off unless env FDPP_FUSED_ROPE=1)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="shard the model over N ranks (GPUs; gloo processes on the CPU); under torchrun the "
                   "ranks join its rendezvous (docs/TENSOR_PARALLEL.md)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of repeated prompt prefixes (on by default; "
                   "--no-enable-prefix-caching turns it off)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step: decode tokens plus prompt chunks (default: 512 on CPU, "
                   "2048 on GPU; smaller keeps running streams smoother while long prompts arrive)")
    g.add_argument("--long-prefill-token-threshold", type=int, default=None, metavar="N",
                   help="in a step that also decodes, one prompt's chunk is at most N tokens, so a long prompt "
                   "does not stall running streams (default: 256 on GPU, no cap on CPU; 0: no cap)")
    g.add_argument("--max-num-partial-prefills", type=int, default=None, metavar="N",
                   help="prompts prefilled in chunks side by side, so that capped chunks of several waiting "
                   "prompts fill a step's token budget (default: budget / cap when chunks are capped, else 1)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "triton", "triton-sync"],
                   help="attention implementation (auto: Triton on GPU, PyTorch reference on CPU)")
    g.add_argument("--linear-backend", default="auto", choices=["auto", "reference", "cpu", "table", "gemv", "flat", "cublas"],
                   help="linear layer implementation (auto: the tuned lookup table on GPU; on CPU 'cpu', the "
                   "reference matmul with 4- and 8-bit weights in PyTorch's packed int4 kernel; 'reference' "
                   "dequantizes them instead)")
    g.add_argument("--quantization", default=None, metavar="METHOD",
                   help="weight quantization: auto (the checkpoint's own, kept quantized on every device: GGUF "
                   "blocks, AWQ, GPTQ, FP8), fp8 | int8 | int4 | q4_k (quantize at load), none (dequantize a "
                   "quantized checkpoint at load), gguf | awq | gptq | compressed-tensors (require that format); "
                   "see docs/QUANTIZATION.md")
    g.add_argument("--calibration", default="auto",
                   help="unified-max calibration: auto (cached, made on first use), off, or a JSON path")
    g.add_argument("--seed", type=int, default=0, help="global random seed")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: $FDPP_NUM_THREADS, else $OMP_NUM_THREADS, else the "
                   "cores not busy now: usable cores minus the 1-minute load average)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely tokens (-1: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise tokens already seen (>1)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed-sampling", type=int, default=None, dest="sampling_seed",
                   help="per-request sampling seed (reproducible sampling)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def set_cpu_threads(args: argparse.Namespace) -> int | None:
    """Pick PyTorch's intra-op thread count (see --threads); returns it, or None when OMP_NUM_THREADS
    already decides. NOTE: torch's default (every core) is a poor choice on a shared machine: with two
    busy cores, generation fell from 5.3 to 0.6 tokens/s."""
    import torch

    from fdpp.utils import free_cpu_cores

    n = args.threads
    if n is None and os.environ.get("FDPP_NUM_THREADS"):
        n = int(os.environ["FDPP_NUM_THREADS"])
    if n is None and os.environ.get("OMP_NUM_THREADS"):
        return None
    n = n if n is not None else free_cpu_cores()
    if n < 1:
        raise InvalidRequestError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def llm_from_args(args: argparse.Namespace, **engine_overrides: Any) -> Any:
    """The ``LLM`` the model arguments describe; ``engine_overrides`` are more EngineConfig fields."""
    from fdpp.utils import phase

    with phase("Loading PyTorch", not args.quiet):  # the first import of torch and triton takes seconds
        from fdpp.llm import LLM
    set_cpu_threads(args)

    kwargs: dict[str, Any] = dict(
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        cuda_graph_prefill_max_tokens=args.cuda_graph_prefill_max_tokens,
        async_scheduling=args.async_scheduling,
        fuse_norm=args.fuse_norm,
        fuse_rope=args.fuse_rope,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        max_num_partial_prefills=args.max_num_partial_prefills,
        attention_backend=args.attention_backend,
        linear_backend=args.linear_backend,
        calibration=args.calibration,
        quantization=args.quantization,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    if args.kv_cache_memory is not None:
        kwargs["kv_cache_memory"] = int(args.kv_cache_memory * 2**30)
    return LLM(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, **kwargs, **engine_overrides)


# SamplingParams field -> the flag that sets it, for error messages in the CLI's words
_FLAGS = {"seed": "--seed-sampling", "stop": "--stop"}


def sampling_from_args(args: argparse.Namespace) -> Any:
    """The sampling flags as SamplingParams; raises InvalidRequestError naming the flag. Call it before
    loading the model, so a typo costs no load time."""
    from fdpp.sampling_params import SamplingParams

    try:
        return _sampling_params(SamplingParams, args)
    except InvalidRequestError as e:
        flag = _FLAGS.get(e.param or "", "--" + (e.param or "").replace("_", "-"))
        msg = str(e).removeprefix("SamplingParams: ").removeprefix(e.param or "").strip()
        raise InvalidRequestError(f"{flag} {msg}", param=e.param) from None


def _sampling_params(SamplingParams: Any, args: argparse.Namespace) -> Any:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=args.stop,
        seed=args.sampling_seed,
        ignore_eos=args.ignore_eos,
    )
