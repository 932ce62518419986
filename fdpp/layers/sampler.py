"""Sampling from logits on the logits' device: penalties, temperature, top-k, top-p, min-p, seeds.

No host sync until the caller reads the sampled ids. Top-p is applied inside the top-k candidates
when top-k is set, so the whole vocabulary is sorted only when top-p is used without top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device. Built by the model runner."""

    temperatures: torch.Tensor | None  # [B] float32; 0 = greedy (None: all greedy)
    top_k: torch.Tensor | None  # [B] int64; vocab size = disabled
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    all_greedy: bool
    max_top_k: int  # largest enabled top_k (0: none enabled)
    use_top_p: bool
    use_min_p: bool
    # penalties (None when no row uses any)
    repetition_penalty: torch.Tensor | None = None  # [B]
    presence_penalty: torch.Tensor | None = None  # [B]
    frequency_penalty: torch.Tensor | None = None  # [B]
    output_counts: torch.Tensor | None = None  # [B, V] float32: times each token was generated
    seen_mask: torch.Tensor | None = None  # [B, V] bool: token in prompt or output
    banned: torch.Tensor | None = None  # [B, V] bool: tokens that may not be sampled now (min_tokens)
    generators: list[torch.Generator | None] | None = None  # per row; None = global RNG
    num_logprobs: int = -1  # -1: none requested
    # logits processors applied before everything else (also on the all-greedy fast path)
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, token ids, bias)
    token_bitmask: torch.Tensor | None = None  # [B, ceil(V / 32)] int32: bit 1 = token allowed

    @classmethod
    def greedy(cls) -> SamplingBatch:
        """Plain argmax for every row: no parameter tensors at all (the common decode fast path)."""
        return cls(None, None, None, None, True, 0, False, False)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] logprob of the sampled token
    top_logprobs: torch.Tensor | None = None  # [B, k]
    top_ids: torch.Tensor | None = None  # [B, k]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.repetition_penalty is not None and b.seen_mask is not None:
        rp = b.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(b.seen_mask, penalized, logits)
    if b.output_counts is not None:
        if b.frequency_penalty is not None:
            logits = logits - b.frequency_penalty.unsqueeze(1) * b.output_counts
        if b.presence_penalty is not None:
            logits = logits - b.presence_penalty.unsqueeze(1) * (b.output_counts > 0).float()
    return logits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits of tokens whose bit is 0 to -inf. ``bitmask`` [B, ceil(V / 32)] int32 holds
    token t's bit at word t // 32, bit t % 32 (xgrammar's layout). Out of place: ``logits`` may be a
    CUDA graph's output buffer."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab]  # [B, V]
    return logits.masked_fill(allowed == 0, float("-inf"))


def apply_logits_processors(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logit_bias, then the grammar mask (a constraint wins over any bias)."""
    if b.logit_bias is not None:
        rows, ids, bias = b.logit_bias
        logits = logits.index_put((rows, ids), bias.to(logits.dtype), accumulate=True)
    if b.token_bitmask is not None:
        logits = apply_token_bitmask(logits, b.token_bitmask)
    return logits


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    """logits [B, V] float32 -> sampled ids (and log-probabilities when asked).

    Returned log-probabilities are those of the model (before logit bias, grammar masks, penalties
    and temperature), as vLLM's default ``raw_logprobs``."""
    if b.temperatures is None:
        return SamplerOutput(token_ids=apply_logits_processors(logits, b).argmax(dim=-1))
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if b.num_logprobs >= 0 else None
    logits = apply_logits_processors(logits, b)
    logits = apply_penalties(logits, b)
    if b.banned is not None:
        logits = logits.masked_fill(b.banned, float("-inf"))
    greedy_ids = logits.argmax(dim=-1)
    if b.all_greedy:
        ids = greedy_ids
    else:
        temps = b.temperatures.clamp_min(1e-5).unsqueeze(1)
        scaled = logits / temps
        if b.max_top_k > 0:
            scaled = _top_k_top_p(scaled, b)
        elif b.use_top_p:
            scaled = _top_p_full(scaled, b.top_p)
        probs = torch.softmax(scaled, dim=-1)
        if b.use_min_p:
            pmax = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < b.min_p.unsqueeze(1) * pmax, 0.0)
        noise = _exponential_like(probs, b.generators)
        sampled = (probs / noise).argmax(dim=-1)
        ids = torch.where(b.temperatures < 1e-5, greedy_ids, sampled)
    out = SamplerOutput(token_ids=ids)
    if raw_logprobs is not None:
        out.logprobs = raw_logprobs.gather(1, ids.unsqueeze(1)).squeeze(1)
        if b.num_logprobs > 0:
            out.top_logprobs, out.top_ids = raw_logprobs.topk(b.num_logprobs, dim=-1)
    return out


def _top_k_top_p(scaled: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Keep each row's top_k (rows with top-k disabled keep everything), then top-p inside them."""
    k = min(b.max_top_k, scaled.shape[-1])
    vals, idx = scaled.topk(k, dim=-1)  # sorted descending
    per_row_k = b.top_k.clamp(max=k)
    rank = torch.arange(k, device=scaled.device).unsqueeze(0)
    keep = rank < per_row_k.unsqueeze(1)
    if b.use_top_p:
        p = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
        before = p.cumsum(dim=-1) - p  # mass strictly before each candidate
        keep &= before < b.top_p.unsqueeze(1)
    vocab = scaled.shape[-1]
    disabled = b.top_k >= vocab  # these rows were not top-k limited
    limited = torch.full_like(scaled, float("-inf")).scatter(1, idx, vals.masked_fill(~keep, float("-inf")))
    if bool(b.use_top_p):
        # rows without top-k but with top-p need the full-vocabulary top-p
        full = _top_p_full(scaled, b.top_p)
        return torch.where(disabled.unsqueeze(1), full, limited)
    return torch.where(disabled.unsqueeze(1), scaled, limited)


# CPU: top-p first looks for its set among this many candidates (``_top_p_in_candidates``)
TOP_P_CANDIDATES = 256


def _top_p_full(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's nucleus: the fewest highest-probability tokens whose mass reaches top_p (the others -inf)."""
    if scaled.device.type == "cpu":
        nucleus = _top_p_in_candidates(scaled, top_p)
        if nucleus is not None:
            return nucleus
    vals, idx = scaled.sort(dim=-1, descending=True)
    p = torch.softmax(vals, dim=-1)
    before = p.cumsum(dim=-1) - p
    drop = before >= top_p.unsqueeze(1)
    vals = vals.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter(1, idx, vals)


def _top_p_in_candidates(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor | None:
    """``_top_p_full`` from each row's TOP_P_CANDIDATES best tokens, when they hold at least top_p of the
    row's probability (the nucleus is then among them: the same set as the full sort's, the probabilities
    normalized over the whole row); None when a row's nucleus may reach past them.

    NOTE: CPU only: it reads a flag on the host (a sync a GPU step must not take), and the full sort of a
    49k vocabulary costs ~3 ms on a CPU core, the top 256 ~0.2 ms."""
    k = min(TOP_P_CANDIDATES, scaled.shape[-1])
    vals, idx = scaled.topk(k, dim=-1)  # sorted descending
    p = torch.exp(vals - torch.logsumexp(scaled, dim=-1, keepdim=True))
    whole = top_p >= 1.0  # rows without top-p (batched with rows that use it) keep every token
    if not bool(((p.sum(dim=-1) >= top_p) | whole).all()):
        return None
    before = p.cumsum(dim=-1) - p
    vals = vals.masked_fill(before >= top_p.unsqueeze(1), float("-inf"))
    nucleus = torch.full_like(scaled, float("-inf")).scatter(1, idx, vals)
    return torch.where(whole.unsqueeze(1), scaled, nucleus)


def _exponential_like(probs: torch.Tensor, generators: list[torch.Generator | None] | None) -> torch.Tensor:
    noise = torch.empty_like(probs)
    if not generators or any(g is None for g in generators):  # rows without a seed draw from the global RNG
        noise.exponential_()
    if generators:
        for row, gen in enumerate(generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
    return noise
