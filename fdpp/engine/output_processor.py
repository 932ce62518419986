"""Post-processing of sampled tokens (vLLM v1's OutputProcessor, nano-vllm's ``postprocess``).

The engine schedules, launches and attributes failures; for every token a step sampled it calls
``OutputProcessor.append_token``, which appends the token to its sequence (logprobs, metrics),
advances the grammar, detokenizes incrementally and checks the stop conditions. It returns the
finish decision, ``(finish_reason, stop_reason)`` or None, and changes nothing else: ending the
sequence (freeing its blocks) stays with the engine. ``step_outputs`` turns the requests a step
advanced into ``RequestOutput`` objects.

Nothing here touches a device: the sampler's output arrives as host lists (``unpack``).
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fdpp.engine.sequence import Sequence
from fdpp.errors import FdppError
from fdpp.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fdpp.sampling_params import SamplingParams

# (finish_reason, stop_reason): ("stop", None) for EOS, ("stop", "</s>") for a stop string,
# ("stop", 7) for a stop token id, ("length", None) for max_tokens / the context length
Finish = tuple[str, int | str | None]


@dataclass
class RequestState:
    """One request as the engine tracks it: its sequences (one per completion), the text each has
    produced so far and the incremental detokenizer that produces it (None without a tokenizer)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    detoks: list[Any] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    error: str | None = None  # why a sequence of this request ended with finish_reason "error"


class SampledToken(NamedTuple):
    """One row of a sampler output, on the host."""

    token_id: int
    logprob: float | None  # None: the step computed no logprobs
    top_ids: list[int] | None  # the row's top-k token ids (None: not computed)
    top_logprobs: list[float] | None


class OutputProcessor:
    """Appends sampled tokens, detokenizes, checks stops, and builds ``RequestOutput`` objects.

    ``tokenizer`` may be None (random-weight models): texts stay empty and stop strings never match.
    ``eos_token_ids`` end a sequence unless ``ignore_eos``; ``max_model_len`` ends one as "length".
    """

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = max_model_len

    # ---- requests ----------------------------------------------------------------------------------
    def new_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, seqs: list[Sequence], metrics: RequestMetrics) -> RequestState:
        """The state of a new request: one detokenizer (primed with the prompt) and one empty text
        per sequence."""
        req = RequestState(request_id, prompt, prompt_token_ids, params, seqs, metrics)
        req.detoks = [self.new_detokenizer(prompt_token_ids, params) for _ in seqs]
        req.texts = ["" for _ in seqs]
        return req

    def new_detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> Any:
        """An ``IncrementalDetokenizer`` for one sequence of a request, or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        from fdpp.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)

    # ---- sampled tokens ------------------------------------------------------------------------------
    @staticmethod
    def unpack(out: Any) -> list[SampledToken]:
        """The rows of a sampler output (``token_ids`` [B] and optional ``logprobs`` [B],
        ``top_ids`` / ``top_logprobs`` [B, k] tensors) as host values, one per sampled sequence."""
        ids = out.token_ids.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        return [SampledToken(tok,
                             lps[row] if lps is not None else None,
                             top_ids[row] if top_ids is not None else None,
                             top_lp[row] if top_lp is not None else None)
                for row, tok in enumerate(ids)]

    def append_token(self, req: RequestState, seq: Sequence, sample: SampledToken, now: float) -> Finish | None:
        """Append one sampled token to ``seq`` (of ``req``): its logprobs entry, the request's token
        times, the grammar, the text. Return the finish decision (the caller ends the sequence) or
        None if it goes on. Raises if the token cannot be processed (the caller ends the request)."""
        tok = sample.token_id
        seq.append_token(tok)
        if sample.logprob is not None:
            seq.cumulative_logprob += sample.logprob
            if seq.logprobs is not None:
                entry = {tok: sample.logprob}
                k = seq.params.logprobs or 0
                if sample.top_ids is not None and k > 0:
                    for t, lp in zip(sample.top_ids[:k], sample.top_logprobs[:k]):
                        entry.setdefault(t, lp)
                seq.logprobs.append(entry)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        return self.check_stop(req, seq, tok)

    def check_stop(self, req: RequestState, seq: Sequence, tok: int) -> Finish | None:
        """Advance the grammar and the text of ``seq`` by ``tok`` (its last token) and decide whether
        the sequence ends: a stop string (the text is cut there, or after it with
        ``include_stop_str_in_output``), EOS or a stop token id (after ``min_tokens``), a terminated
        grammar, ``max_tokens``, the context length. Raises ``FdppError`` if the grammar rejects ``tok``."""
        if seq.grammar is not None and not seq.grammar.accept_token(tok):
            raise FdppError(f"request {seq.request_id!r}: the grammar rejected sampled token {tok}")
        i = req.seqs.index(seq)
        p = seq.params
        detok = req.detoks[i]
        if detok is not None:
            delta = detok.add(tok)
            prev_len = len(req.texts[i])
            req.texts[i] += delta
            if p.stops and delta:
                text = req.texts[i]
                longest = max(len(s) for s in p.stops)
                window_start = max(0, prev_len - longest + 1)
                for stop in p.stops:
                    pos = text.find(stop, window_start)
                    if pos != -1:
                        end = pos + len(stop) if p.include_stop_str_in_output else pos
                        req.texts[i] = text[:end]
                        return ("stop", stop)
        reason: Finish | None = None
        if not p.ignore_eos and tok in self.eos_token_ids and seq.num_output_tokens >= p.min_tokens:
            reason = ("stop", None)
        elif tok in (p.stop_token_ids or ()) and seq.num_output_tokens >= p.min_tokens:
            reason = ("stop", tok)
        elif seq.grammar is not None and seq.grammar.is_terminated():  # its stop token, even with ignore_eos
            reason = ("stop", None)
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            reason = ("length", None)
        elif seq.num_tokens >= self.max_model_len:
            reason = ("length", None)
        if reason is not None:
            self.flush_text(req, seq)  # bytes of a character cut off by the end
        return reason

    @staticmethod
    def flush_text(req: RequestState, seq: Sequence) -> None:
        """Add the text ``seq``'s detokenizer still holds back (call it when the sequence ends)."""
        i = req.seqs.index(seq)
        if req.detoks[i] is not None:
            req.texts[i] += req.detoks[i].flush()

    # ---- outputs -------------------------------------------------------------------------------------
    def step_outputs(self, reqs: Iterable[RequestState]) -> list[RequestOutput]:
        """The outputs of the requests a step advanced: every one with ``output_kind="cumulative"``,
        only the finished ones with "final_only". A finished request gets its ``finished_time``; the
        caller forgets the requests whose output is ``finished``."""
        outputs = []
        for req in reqs:
            finished = all(s.is_finished for s in req.seqs)
            if finished or req.params.output_kind == "cumulative":
                outputs.append(self.make_output(req))
            if finished:
                req.metrics.finished_time = time.time()
        return outputs

    @staticmethod
    def make_output(req: RequestState) -> RequestOutput:
        """``req`` as it stands, as a ``RequestOutput`` (cumulative: all text and tokens so far)."""
        outs = []
        for i, seq in enumerate(req.seqs):
            ids = seq.output_token_ids  # an EOS stays in token_ids (as in vLLM); its text is not shown
            outs.append(
                CompletionOutput(
                    index=i,
                    text=req.texts[i],
                    token_ids=list(ids),
                    cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=req.seqs[0].prompt_logprobs,
            outputs=outs,
            finished=all(s.is_finished for s in req.seqs),
            metrics=req.metrics,
            error=req.error,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
        )
