"""Prometheus metrics: one registry per app, per-request tracking (TTFT, inter-token latency, finish
reasons) and the ``GET /metrics`` endpoint (engine gauges sampled on the engine thread at scrape time)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fdpp.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    """Prometheus metrics of one app, in their own registry (several apps may live in one process)."""

    def __init__(self, model_name: str) -> None:
        r = self.registry = CollectorRegistry()
        lbl = ["model_name"]
        self.model_name = model_name
        self.requests = Counter("fdpp:http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "method", "status"], registry=r)
        self.request_success = Counter("fdpp:request_success", "finished generation requests by finish reason",
                                       lbl + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("fdpp:prompt_tokens", "prompt tokens admitted", lbl, registry=r)
        self.generation_tokens = Counter("fdpp:generation_tokens", "tokens generated", lbl, registry=r)
        self.ttft = Histogram("fdpp:time_to_first_token_seconds", "time from arrival to the first generated token",
                              lbl, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fdpp:inter_token_latency_seconds", "time between generated tokens of a sequence",
                             lbl, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fdpp:e2e_request_latency_seconds", "time from arrival to the last token",
                             lbl, buckets=_E2E_BUCKETS, registry=r)
        self.running = Gauge("fdpp:num_requests_running", "sequences in the running batch", lbl, registry=r)
        self.waiting = Gauge("fdpp:num_requests_waiting", "sequences waiting for KV blocks or a batch slot",
                             lbl, registry=r)
        self.kv_usage = Gauge("fdpp:kv_cache_usage_perc", "fraction of KV cache blocks in use (0..1)", lbl,
                              registry=r)
        self.free_blocks = Gauge("fdpp:kv_cache_free_blocks", "free KV cache blocks", lbl, registry=r)
        self.total_blocks = Gauge("fdpp:kv_cache_total_blocks", "KV cache blocks", lbl, registry=r)
        self.preemptions = Gauge("fdpp:num_preemptions", "sequences preempted so far (KV cache full)", lbl,
                                 registry=r)
        self.fallback_rate = Gauge("fdpp:attention_fallback_rate",
                                   "fraction of attention rows recomputed by the unified-max fallback", lbl,
                                   registry=r)
        self.fallback_checked = Gauge("fdpp:attention_rows_checked",
                                      "attention rows checked by the unified-max kernels", lbl, registry=r)
        self.fallback_rows = Gauge("fdpp:attention_rows_fallback",
                                   "attention rows recomputed by the synchronized fallback", lbl, registry=r)
        self.engine_up = Gauge("fdpp:engine_up", "1 while the engine loop runs", lbl, registry=r)
        # prefix cache, in tokens as vLLM's (exposed as ..._total); incremented by the engine's deltas
        self.prefix_queries = Counter("fdpp:prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                      lbl, registry=r)
        self.prefix_hits = Counter("fdpp:prefix_cache_hits", "prompt tokens found in the prefix cache", lbl,
                                   registry=r)
        self._prefix_seen = (0, 0)

    def set_engine(self, stats: dict[str, Any] | None, fb: dict[str, Any] | None, up: bool) -> None:
        m = self.model_name
        self.engine_up.labels(m).set(1 if up else 0)
        if stats:
            self.running.labels(m).set(stats.get("running", 0))
            self.waiting.labels(m).set(stats.get("waiting", 0))
            self.kv_usage.labels(m).set(stats.get("kv_usage", 0.0))
            self.free_blocks.labels(m).set(stats.get("num_free_blocks", 0))
            self.total_blocks.labels(m).set(stats.get("num_total_blocks", 0))
            self.preemptions.labels(m).set(stats.get("num_preemptions", 0))
            q, h = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0)
            self.prefix_queries.labels(m).inc(max(0, q - self._prefix_seen[0]))
            self.prefix_hits.labels(m).inc(max(0, h - self._prefix_seen[1]))
            self._prefix_seen = (q, h)
        if fb:
            self.fallback_rate.labels(m).set(fb.get("rate", 0.0))
            self.fallback_checked.labels(m).set(fb.get("rows_checked", 0))
            self.fallback_rows.labels(m).set(fb.get("rows_fallback", 0))


def engine_snapshot(engine: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    stats = engine.stats()
    try:
        from fdpp.ops.attention import fallback_stats

        fb = fallback_stats()
    except Exception:  # noqa: BLE001 - metrics must not fail the scrape
        fb = None
    return stats, fb


@dataclass
class RequestTracker:
    """Per-request metrics: TTFT (arrival to the request's first token), inter-token latency (per
    sequence: a request with n choices or several prompts has several), token counters, finish reasons."""

    metrics: ServerMetrics
    arrival: float
    num_seqs: int = 1
    counts: dict[tuple[int, int], int] = field(default_factory=dict)
    last: dict[tuple[int, int], float] = field(default_factory=dict)
    first: bool = True
    finished: set = field(default_factory=set)

    def update(self, idx: int, out: RequestOutput) -> None:
        m = self.metrics
        name = m.model_name
        now = time.time()
        total_new = 0
        for c in out.outputs:
            key = (idx, c.index)
            n_prev = self.counts.get(key, 0)
            new = len(c.token_ids) - n_prev
            if new > 0:
                total_new += new
                self.counts[key] = n_prev + new
                if key in self.last:
                    gap = (now - self.last[key]) / new
                    for _ in range(new):
                        m.itl.labels(name).observe(gap)
                self.last[key] = now
            if c.finish_reason is not None and key not in self.finished:
                self.finished.add(key)
                m.request_success.labels(name, c.finish_reason).inc()
        if total_new:
            m.generation_tokens.labels(name).inc(total_new)
            if self.first:
                self.first = False
                m.ttft.labels(name).observe(now - self.arrival)

    def done(self) -> None:
        self.metrics.e2e.labels(self.metrics.model_name).observe(time.time() - self.arrival)

    def close(self) -> None:
        """Count the sequences that never finished (client gone, shutdown) as aborted; idempotent."""
        aborted = self.num_seqs - len(self.finished)
        if aborted > 0:
            self.metrics.request_success.labels(self.metrics.model_name, "abort").inc(aborted)
            self.finished.update(("abort", i) for i in range(aborted))


router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    st = request.app.state.fdpp
    aeng = st.async_engine
    stats = fb = None
    if aeng.is_running:
        with contextlib.suppress(Exception):
            stats, fb = await asyncio.wait_for(aeng.call(engine_snapshot), timeout=30)
    st.metrics.set_engine(stats, fb, aeng.is_running)
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)
