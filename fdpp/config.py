"""Frozen configuration: the model's architecture, the KV cache and the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fdpp.structured.params import DEFAULT_COMPILE_TIMEOUT_S, DEFAULT_MAX_SPEC_BYTES


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer, normalised across model families.

    Built from a Hugging Face ``config.json`` dict (``from_hf_dict``) or from GGUF metadata
    (the GGUF reader produces an HF-style dict first). ``hf`` keeps the original dict for
    family-specific fields.
    """

    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # e.g. "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str | None = None
    hf: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        archs = d.get("architectures") or []
        arch = archs[0] if archs else _ARCH_FROM_TYPE.get(d.get("model_type", ""), "")
        heads = _first(d, "num_attention_heads", "n_head", "num_heads")
        hidden = _first(d, "hidden_size", "n_embd", "d_model")
        kv_heads = _first(d, "num_key_value_heads", "multi_query_group_num", default=None)
        if d.get("multi_query_attention") is False:
            kv_heads = heads
        if kv_heads is None:
            kv_heads = heads
        head_dim = d.get("head_dim") or d.get("kv_channels") or hidden // heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        sliding = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            model_type=d.get("model_type", ""),
            vocab_size=_first(d, "padded_vocab_size", "vocab_size")
            if d.get("model_type") == "chatglm"
            else _first(d, "vocab_size", "padded_vocab_size"),
            hidden_size=hidden,
            intermediate_size=_first(d, "intermediate_size", "ffn_hidden_size", "ffn_dim", default=4 * hidden),
            num_hidden_layers=_first(d, "num_hidden_layers", "num_layers", "n_layer"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=_first(
                d, "max_position_embeddings", "seq_length", "n_positions", default=4096
            ),
            rms_norm_eps=_first(d, "rms_norm_eps", "layernorm_epsilon", "layer_norm_epsilon", default=1e-6),
            rope_theta=float(_rope_theta(d)),
            rope_scaling=_rope_scaling(d),
            # OPT configs often omit the key; transformers' OPT default is tied
            tie_word_embeddings=bool(d.get("tie_word_embeddings", d.get("model_type") == "opt")),
            attention_bias=bool(d.get("attention_bias", False) or d.get("add_qkv_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=d.get("hidden_act") or d.get("activation_function") or "silu",
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_ids,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            hf=dict(d),
        )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


_ARCH_FROM_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "opt": "OPTForCausalLM",
    "chatglm": "ChatGLMModel",
    "glm": "GlmForCausalLM",
}


def _first(d: dict[str, Any], *keys: str, default: Any = KeyError) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    if default is KeyError:
        raise KeyError(f"config is missing all of {keys}")
    return default


def _rope_theta(d: dict[str, Any]) -> float:
    if d.get("rope_theta") is not None:
        return d["rope_theta"]
    params = d.get("rope_parameters") or {}
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return params["rope_theta"]
    return 10000.0 * float(d.get("rope_ratio", 1.0))


def _rope_scaling(d: dict[str, Any]) -> dict[str, Any] | None:
    rs = d.get("rope_scaling")
    if rs is None:
        params = d.get("rope_parameters")
        if isinstance(params, dict) and params.get("rope_type", "default") != "default":
            rs = params
    if not rs:
        return None
    rs = dict(rs)
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return None
    rs["rope_type"] = kind
    return rs


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Either an explicit number of blocks, or a memory budget from which it is derived.
    num_blocks: int | None = None
    memory_budget_bytes: int | None = None  # CPU default: see EngineConfig
    gpu_memory_utilization: float = 0.90


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    # A tokenizer to use instead of the model's own (vLLM's --tokenizer): a Hugging Face folder or a .gguf
    # file. Lets a random-weight preset take real text (benchmarks of structured output, say).
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_num_seqs: int = 64
    # Token budget of one step (decode tokens + prompt chunks). None: 512 on the CPU (a step stays
    # short, so running streams and the server stay responsive), 2048 on a GPU.
    max_num_batched_tokens: int | None = None
    # In a step that also decodes, one prompt's chunk is at most this many tokens (vLLM's name), so a
    # long prompt cannot stretch the running streams' inter-token latency; a step with no decode rows
    # takes the whole budget. None: 256 on a GPU, no cap on the CPU. 0: no cap.
    long_prefill_token_threshold: int | None = None
    # Prompts prefilled in chunks at the same time (vLLM's name): with the cap above, several waiting
    # prompts advance in one step so that they still fill the token budget. None: budget // cap when
    # prompt chunks are capped (8 on a GPU by default), else 1.
    max_num_partial_prefills: int | None = None
    enable_prefix_caching: bool = True  # reuse the K/V of cached prompt prefixes (vLLM's name)
    max_model_len: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = 0
    enforce_eager: bool = False  # disable CUDA graphs
    # Also capture graphs of mixed steps (up to 64 decode rows + one prompt chunk padded to
    # long_prefill_token_threshold tokens): such a step is host-bound when run eagerly. Needs a cap > 0.
    cuda_graph_mixed: bool = True
    # Also capture graphs of prefill steps of one prompt chunk (no decode rows) padded to a bucket of
    # 16..this many tokens (fdpp.engine.cuda_graph.PREFILL_GRAPH_TOKENS): a batch-1 prefill run eagerly is
    # host-bound (the TTFT of a prompt of up to ~1k tokens). 0: off.
    cuda_graph_prefill_max_tokens: int = 1024
    # Also capture each decode bucket with DECODE_BALANCE_GRAPH_SPLITS key splits, replayed for a batch
    # with one long row among short ones (the long row is otherwise the step's tail: 27-30 ms against
    # 6.3 ms on an H200). Eager decode steps balance their splits always.
    cuda_graph_balanced_decode: bool = True
    # Overlap the host with the device (vLLM v1's async scheduling): step t+1 is scheduled and
    # launched while step t runs, its input ids taken from step t's sampled ids on the device, and
    # step t's tokens are read one step late. None: on for CUDA, off on the CPU (nothing to overlap).
    # Requests with a grammar or penalties run in synchronous steps (they need the previous token).
    async_scheduling: bool | None = None
    # The decoder's RMSNorms go to the qkv / gate_up linears and its residual adds to the o / down epilogues;
    # the GEMV (M = 1) takes the norm in its prologue (one launch fewer), other kernels run the norm first
    # (fdpp.ops.linear.fuses_norm: the flat GEMM is slower fused). None: on for Triton linear kernels
    # unless FDPP_FUSED_NORM=0.
    fuse_norm: bool | None = None
    # The qkv GEMV also applies the rotary embedding and writes k and v into the KV cache in its epilogue
    # (Llama family; one launch fewer a layer at batch 1). None: off unless FDPP_FUSED_ROPE=1 (not yet
    # measured on a GPU).
    fuse_rope: bool | None = None
    # Ranks one model is sharded over (vLLM's name; fdpp.distributed): on one node fdpp spawns them, under
    # torchrun they join its rendezvous (docs/TENSOR_PARALLEL.md). 1: in-process, as before.
    tensor_parallel_size: int = 1
    attention_backend: str = "auto"  # auto | reference | triton | triton-sync
    linear_backend: str = "auto"  # auto | reference | cpu | table | gemv | flat | cublas
    calibration: str = "auto"  # auto | off | path to a calibration JSON
    # None/auto | none | fp8 | int8 | int4 | gguf | awq | gptq | compressed-tensors | q4_k ... (fdpp.quant.config)
    quantization: str | None = None
    random_weights: bool = False  # build from config with random weights (benchmarks)
    show_progress: bool = True
    # structured output limits: a constraint over them is refused (InvalidRequestError / HTTP 400)
    structured_outputs_compile_timeout: float = DEFAULT_COMPILE_TIMEOUT_S  # seconds for one compilation
    structured_outputs_max_bytes: int = DEFAULT_MAX_SPEC_BYTES  # size of one schema/regex/grammar text


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from fdpp.errors import FdppError

        raise FdppError(f"device={device!r} was requested but no CUDA GPU is visible; use device='cpu'")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, model_dtype: str | None = None) -> torch.dtype:
    """``auto`` means float32 on the CPU (fast and exact there) and the checkpoint's half type on a GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if model_dtype in ("bfloat16", "float16"):
            return _DTYPES[model_dtype]
        return torch.float16
    if dtype not in _DTYPES:
        from fdpp.errors import FdppError

        raise FdppError(f"unknown dtype {dtype!r}; choose one of auto, float32, float16, bfloat16")
    return _DTYPES[dtype]
