"""The offline API, in vLLM's conventions: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from fdpp.config import CacheConfig, EngineConfig
from fdpp.engine.llm_engine import LLMEngine
from fdpp.errors import InvalidRequestError
from fdpp.outputs import RequestOutput
from fdpp.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """A model ready to generate.

    Args:
        model: None for the embedded SmolLM2-135M-Instruct, a Hugging Face folder, a .gguf file, or a
            preset name (llama-2-7b, ...) for random weights with real shapes.
        dtype: auto | float32 | float16 | bfloat16 (auto: float32 on the CPU, the checkpoint's half
            type on a GPU).
        device: auto | cpu | cuda | cuda:N.
        Other keyword arguments are EngineConfig fields (max_num_seqs, max_model_len, enforce_eager,
        attention_backend, linear_backend, calibration, seed, quantization, ...); ``block_size``, ``num_blocks``,
        ``kv_cache_memory`` (bytes) and ``gpu_memory_utilization`` configure the KV cache.
        ``quantization``: None (the checkpoint's own format, kept quantized on every device: GGUF blocks,
            AWQ, GPTQ, FP8), "fp8" | "int8" | "int4" | "q4_k" (quantize the linear layers at load), "none"
            (dequantize at load), ... (fdpp.quant.config, docs/QUANTIZATION.md).
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto", **kwargs: Any):
        cache_keys = {
            "block_size": "block_size",
            "num_blocks": "num_blocks",
            "kv_cache_memory": "memory_budget_bytes",
            "gpu_memory_utilization": "gpu_memory_utilization",
        }
        cache_kwargs = {cache_keys[k]: kwargs.pop(k) for k in list(kwargs) if k in cache_keys}
        config = EngineConfig(model=model, dtype=dtype, device=device, cache=CacheConfig(**cache_kwargs), **kwargs)
        self.engine = LLMEngine(config)
        self.llm_engine = self.engine  # vLLM's attribute name

    def close(self) -> None:
        """Free the model, KV cache and CUDA graphs now (instead of when the object is collected)."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); outputs come back in prompt order."""
        prompts = _as_prompt_list(prompts)
        # NOTE: only final outputs are needed here: the engine skips building per-step outputs
        params = [dataclasses.replace(sp, output_kind="final_only")
                  for sp in _as_param_list(sampling_params, len(prompts))]
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(None, p, sp))
        except BaseException:
            # one bad prompt rejects the whole call: take back what was queued, so nothing runs later
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if not messages:
            raise InvalidRequestError("chat: the conversation is empty")
        convs = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[Message], add_generation_prompt: bool = True) -> list[int]:
        from fdpp.tokenizer import apply_chat_template

        if self.engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so chat() cannot build a prompt")
        return apply_chat_template(self.engine.tokenizer, conversation, add_generation_prompt=add_generation_prompt)

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one prompt's completion as it is generated (never a split character)."""
        rid = self.engine.add_request(None, prompt, sampling_params)
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
                if not self.engine.has_unfinished_requests():
                    return
        finally:
            self.engine.abort_request(rid)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid in request_ids:
                if rid not in final:
                    self.engine.abort_request(rid)
        return [final[r] for r in request_ids]


def _as_prompt_list(prompts: Any) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    if not isinstance(prompts, Seq) or not prompts:
        raise InvalidRequestError("generate: give a prompt string, a list of strings, or token-id lists")
    return list(prompts)


def _as_param_list(params: Any, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InvalidRequestError(f"generate: {len(params)} SamplingParams for {n} prompts")
    return list(params)
