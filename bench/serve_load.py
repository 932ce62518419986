"""Bounded load generator for a running ``fdpp serve`` (or any OpenAI-compatible server).

Sends ``--num-requests`` streaming requests (Poisson arrivals at ``--request-rate`` req/s, at most
``--concurrency`` in flight), with prompts of mixed lengths, and stops by itself: when every request is
done, or at ``--duration`` seconds (requests still in flight are then cancelled and counted as such).
Reports time to first token (TTFT), inter-token latency (ITL: the gap between streamed chunks that
carry text; fdpp sends one chunk per request per engine step, so one token each unless the reader lags
and chunks coalesce, or a multi-byte character spans tokens), end-to-end latency (p50/p90/p99, mean)
and throughput (output tokens from the final usage chunk).

Example (CPU, 2 cores, SmolLM2-135M embedded model, shared machine): --num-requests 64 --concurrency 16
(prompts 8-512 words, 16-64 output tokens) gave 30 output tok/s, TTFT p50 1.1 s, ITL p50 360 ms.

    fdpp serve --port 8000 &
    python bench/serve_load.py --num-requests 64 --request-rate 4 --concurrency 16 --max-tokens 32
    python bench/serve_load.py --endpoint chat --json results.json

Only the standard library and httpx are needed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem", "fact", "river", "mountain", "city", "garden", "music", "window", "story"]


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    prompt_words: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    latency: float | None = None
    finish_reason: str | None = None


def make_prompt(rng: random.Random, n_words: int, i: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return f"Request {i}. Continue this text: {body}"


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    s = sorted(xs)

    def q(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(s), "n": len(s)}


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, model: str, prompt: str,
                      max_tokens: int, res: Result) -> None:
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": args.temperature, "stream": True,
                  "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    if args.endpoint == "chat":
        url = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        url = "/v1/completions"
        body["prompt"] = prompt
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message")
                    return
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    res.output_tokens = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices") or []:
                    text = ch.get("text") if args.endpoint != "chat" else (ch.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itls.append(now - last)
                        last = now
                        chunks += 1
                    if ch.get("finish_reason"):
                        res.finish_reason = ch["finish_reason"]
        res.latency = time.perf_counter() - t0
        if not res.output_tokens:
            res.output_tokens = chunks
        res.ok = True
    except asyncio.CancelledError:
        res.error = "cancelled at the duration limit"
        raise
    except Exception as e:  # noqa: BLE001 - counted as a failure
        res.error = f"{type(e).__name__}: {e}"


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    lengths = [int(x) for x in args.prompt_words.split(",")]
    mt_lo, _, mt_hi = args.max_tokens.partition("-")
    mt_lo, mt_hi = int(mt_lo), int(mt_hi or mt_lo)
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=httpx.Timeout(args.duration + 30),
                                 limits=limits) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        sem = asyncio.Semaphore(args.concurrency)
        results = [Result() for _ in range(args.num_requests)]
        tasks: list[asyncio.Task] = []

        async def guarded(i: int) -> None:
            async with sem:
                n_words = rng.choice(lengths)
                results[i].prompt_words = n_words
                await one_request(client, args, model, make_prompt(rng, n_words, i),
                                  rng.randint(mt_lo, mt_hi), results[i])

        t0 = time.perf_counter()
        deadline = t0 + args.duration
        for i in range(args.num_requests):
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(guarded(i)))
            if args.request_rate > 0 and not math.isinf(args.request_rate):
                await asyncio.sleep(min(rng.expovariate(args.request_rate), max(0.0, deadline - time.perf_counter())))
        pending = set(tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.perf_counter()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - t0
    issued = len(tasks)
    done = [r for r in results[:issued] if r.ok]
    failed = [r for r in results[:issued] if not r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    report = {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": model,
        "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "requests_issued": issued,
        "requests_completed": len(done),
        "requests_failed": len(failed),
        "errors": sorted({r.error for r in failed if r.error})[:10],
        "duration_s": elapsed,
        "request_throughput_rps": len(done) / elapsed if elapsed else 0.0,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "output_throughput_tok_s": out_tokens / elapsed if elapsed else 0.0,
        "total_throughput_tok_s": (out_tokens + in_tokens) / elapsed if elapsed else 0.0,
        "ttft_s": percentiles([r.ttft for r in done if r.ttft is not None]),
        "itl_s": percentiles([x for r in done for x in r.itls]),
        "e2e_latency_s": percentiles([r.latency for r in done if r.latency is not None]),
        "finish_reasons": {k: sum(r.finish_reason == k for r in done) for k in {r.finish_reason for r in done}},
    }
    if args.per_request:
        report["per_request"] = [asdict(r) for r in results[:issued]]
    return report


def print_report(rep: dict) -> None:
    def ms(d: dict) -> str:
        if not d["n"]:
            return "n/a"
        return "  ".join(f"{k} {d[k] * 1000:8.1f} ms" for k in ("p50", "p90", "p99", "mean")) + f"  (n={d['n']})"

    print(f"server {rep['base_url']} ({rep['endpoint']}, model {rep['model']})")
    print(f"requests: {rep['requests_completed']} completed, {rep['requests_failed']} failed, "
          f"{rep['requests_issued']} issued in {rep['duration_s']:.1f} s")
    for e in rep["errors"]:
        print(f"  error: {e}")
    print(f"throughput: {rep['request_throughput_rps']:.2f} req/s, {rep['output_throughput_tok_s']:.1f} output tok/s, "
          f"{rep['total_throughput_tok_s']:.1f} total tok/s ({rep['prompt_tokens']} prompt + "
          f"{rep['output_tokens']} output tokens)")
    print(f"TTFT:        {ms(rep['ttft_s'])}")
    print(f"ITL:         {ms(rep['itl_s'])}")
    print(f"E2E latency: {ms(rep['e2e_latency_s'])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions", help="API to load")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--num-requests", type=int, default=64, help="requests to send in all")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="mean arrival rate in requests/s (Poisson); inf sends them all at once")
    p.add_argument("--concurrency", type=int, default=16, help="most requests in flight at once")
    p.add_argument("--duration", type=float, default=300.0,
                   help="hard time limit in seconds: stop issuing, cancel what is in flight, report")
    p.add_argument("--max-tokens", default="16-64", help="tokens to generate per request: N or LO-HI (uniform)")
    p.add_argument("--prompt-words", default="8,32,128,512",
                   help="comma-separated prompt lengths in words, drawn uniformly per request")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens (fdpp/vLLM extension)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-': stdout only)")
    p.add_argument("--per-request", action="store_true", help="include every request's numbers in the JSON")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.concurrency < 1 or args.duration <= 0:
        p.error("--num-requests, --concurrency and --duration must be positive")
    rep = asyncio.run(run(args))
    if args.json == "-":
        json.dump(rep, sys.stdout, indent=2)
        print()
    else:
        print_report(rep)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rep, f, indent=2)
    return 0 if rep["requests_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
