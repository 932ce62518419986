"""Per-engine op backends (fdpp.ops.backend): resolved once from the config and the device, entered with
the forward context; two engines in one process never see each other's choice."""
from __future__ import annotations

import threading

import pytest
import torch

from fdpp import LLM, SamplingParams
from fdpp.config import EngineConfig
from fdpp.ops import backend as B
from fdpp.ops.backend import Backends, current_backends, engine_backends, use_backends

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


def test_resolve_auto_follows_the_device_and_explicit_names_win():
    assert Backends.resolve(EngineConfig(), CPU) == Backends("reference", "cpu", "reference", "reference")
    assert Backends.resolve(EngineConfig(), CUDA) == Backends("triton", "table", "triton", "triton")
    b = Backends.resolve(EngineConfig(attention_backend="triton-sync", linear_backend="gemv"), CPU)
    assert (b.attention, b.linear, b.norm, b.rotary) == ("triton-sync", "gemv", "reference", "reference")
    assert Backends.default("cuda:1") == Backends.resolve(EngineConfig(), CUDA)


def test_bad_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"attention backend 'flash' unknown; choose one of .*triton-sync"):
        Backends.resolve(EngineConfig(attention_backend="flash"), CPU)
    with pytest.raises(ValueError, match="linear backend 'cutlass' unknown"):
        Backends.resolve(EngineConfig(linear_backend="cutlass"), CPU)
    with pytest.raises(ValueError, match="not resolved"):
        Backends("auto", "reference", "reference", "reference")
    with pytest.raises(ValueError, match="use_backends forces an implementation"):
        with use_backends(linear="auto"):
            pass
    with pytest.raises(ValueError, match="norm backend 'fast' unknown"):
        with use_backends(norm="fast"):
            pass


def test_set_backends_is_gone_with_a_pointer_to_the_replacement():
    with pytest.raises(RuntimeError, match=r"set_backends was removed.*attention_backend=.*use_backends"):
        B.set_backends(attention="triton")


def test_scope_precedence_and_restore():
    """Outside a forward: the device default; an engine's backends inside its block; use_backends
    fields win over both, nest, and everything is restored on exit (exceptions included)."""
    ref = Backends.default(CPU)
    eng = Backends("triton", "flat", "reference", "triton")
    assert current_backends(CPU) == ref and current_backends(CUDA) == Backends.default(CUDA)
    with engine_backends(eng):
        assert current_backends(CPU) == eng and current_backends(CUDA) == eng  # the engine's, any tensor
        with use_backends(attention="reference"):
            assert current_backends(CPU) == Backends("reference", "flat", "reference", "triton")
            with use_backends(linear="gemv"):
                assert current_backends(CPU) == Backends("reference", "gemv", "reference", "triton")
            assert current_backends(CPU).linear == "flat"
        assert current_backends(CPU) == eng
    with use_backends(norm="triton"):
        assert current_backends(CPU) == Backends("reference", "cpu", "triton", "reference")
        with engine_backends(eng):  # entered inside the override: the override still wins
            assert current_backends(CPU).norm == "triton" and current_backends(CPU).linear == "flat"
    with pytest.raises(KeyError):
        with engine_backends(eng), use_backends(linear="cublas"):
            raise KeyError("boom")
    assert current_backends(CPU) == ref
    with pytest.raises(TypeError, match="expected a Backends"):
        with engine_backends("triton"):
            pass


def test_the_choice_is_per_thread():
    """A ContextVar, not a module global: another thread's block does not reach this one."""
    entered, release, seen = threading.Event(), threading.Event(), {}

    def other() -> None:
        with engine_backends(Backends("triton", "flat", "triton", "triton")):
            seen["other"] = current_backends(CPU)
            entered.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert entered.wait(5)
        seen["main"] = current_backends(CPU)
    finally:
        release.set()
        t.join(5)
    assert seen["other"].linear == "flat" and seen["main"] == Backends.default(CPU)


def test_norm_and_rotary_ops_dispatch_on_their_fields(monkeypatch):
    """``norm`` / ``rotary`` pick the Triton kernel or the reference op (no device test in the op), and
    both give the same result (the kernels interpreted on the CPU)."""
    import fdpp.kernels.norm as knorm
    import fdpp.kernels.rotary as krot
    from fdpp.ops.norm import rms_norm
    from fdpp.ops.rotary import build_cos_sin_cache, rope_and_store_kv

    calls = {"norm": 0, "rotary": 0}

    def counting(fn, key):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(knorm, "rms_norm_fused", counting(knorm.rms_norm_fused, "norm"))
    monkeypatch.setattr(krot, "rope_store_kv", counting(krot.rope_store_kv, "rotary"))
    g = torch.Generator().manual_seed(0)
    x, w, res = (torch.randn(3, 32, generator=g), torch.randn(32, generator=g), torch.randn(3, 32, generator=g))
    cache = build_cos_sin_cache(16, 64, 10000.0, None, CPU)
    q, k, v = (torch.randn(3, h, 16, generator=g) for h in (4, 2, 2))
    pos, slots = torch.tensor([0, 5, 9]), torch.tensor([1, -1, 6])

    def run() -> tuple[torch.Tensor, ...]:
        y, r = rms_norm(x, w, 1e-6, res.clone())
        kc, vc = torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)
        qr = rope_and_store_kv(q.clone(), k.clone(), v.clone(), pos, cache, True, kc, vc, slots)
        return y, r, qr, kc, vc

    ref = run()
    assert calls == {"norm": 0, "rotary": 0}
    with use_backends(norm="triton", rotary="triton"):
        tri = run()
    assert calls == {"norm": 1, "rotary": 1}
    for a, b in zip(tri, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Spy:
    """Counts the calls of the Triton attention / GEMM entry points and of the reference attention."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import fdpp.kernels.attention_decode as dec
        import fdpp.kernels.attention_prefill as pre
        import fdpp.kernels.flat_gemm as flat
        import fdpp.kernels.gemv as gemv
        import fdpp.ops.attention as attn

        self.counts = {"triton_attention": 0, "flat_gemm": 0, "gemv": 0, "reference_attention": 0}
        for mod, name, key in ((dec, "paged_decode_attention", "triton_attention"),
                               (pre, "paged_prefill_attention", "triton_attention"),
                               (flat, "flat_gemm", "flat_gemm"),
                               (gemv, "gemv", "gemv"),
                               (attn, "attention_reference", "reference_attention")):
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name), key))

    def _wrap(self, fn, key):
        def counted(*args, **kwargs):
            self.counts[key] += 1
            return fn(*args, **kwargs)
        return counted

    def take(self) -> dict[str, int]:
        out, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return out


def test_two_engines_in_one_process_keep_their_own_backends(tiny_llama_dir, tiny_llm, monkeypatch):
    """A reference engine and a Triton engine (attention kernels and flat GEMM, interpreted on the CPU)
    stepped in turn: every step of each runs its own implementations, LM head included, and both give
    the same greedy tokens (same weights)."""
    ref = tiny_llm
    tri = LLM(tiny_llama_dir, dtype="float32", device="cpu", show_progress=False, calibration="off",
              num_blocks=16, block_size=16, attention_backend="triton", linear_backend="flat")
    try:
        assert ref.engine.backends == Backends.default(CPU)
        assert tri.engine.backends == Backends("triton", "flat", "reference", "reference")
        assert tri.engine.runner.backends is tri.engine.backends
        spy = _Spy(monkeypatch)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        prompts = {"p0": [5, 9, 13, 40, 7], "p1": [3, 17, 22]}
        for rid, p in prompts.items():
            ref.engine.add_request(rid, p, params)
            tri.engine.add_request(rid, p, params)
        done: dict[str, dict[str, list[int]]] = {"ref": {}, "tri": {}}
        steps = 0
        while ref.engine.has_unfinished_requests() or tri.engine.has_unfinished_requests():
            for name, llm in (("ref", ref), ("tri", tri)):
                if not llm.engine.has_unfinished_requests():
                    continue
                for out in llm.engine.step():
                    if out.finished:
                        done[name][out.request_id] = list(out.outputs[0].token_ids)
                c = spy.take()
                if name == "ref":
                    assert c["triton_attention"] == 0 and c["flat_gemm"] == 0 and c["reference_attention"] > 0, c
                else:
                    assert c["reference_attention"] == 0 and c["triton_attention"] > 0, c
                    # every linear of the step, LM head included: 2 layers x (qkv, o, gate_up, down) + lm_head
                    assert c["flat_gemm"] == 2 * 4 + 1, c
                steps += 1
        assert steps >= 6
        assert done["tri"] == done["ref"] and all(len(t) == 3 for t in done["ref"].values())
        # the logits path outside the step (calibration, checks) uses the engine's backends as well
        tri.engine.prompt_logits([5, 9, 13])
        c = spy.take()
        assert c["triton_attention"] > 0 and c["flat_gemm"] == 9 and c["reference_attention"] == 0, c
        ref.engine.prompt_logits([5, 9, 13])
        c = spy.take()
        assert c["triton_attention"] == 0 and c["flat_gemm"] == 0, c
        # and nothing leaked out of either engine's forward passes
        assert current_backends(CPU) == Backends.default(CPU)
        ref.engine.check_integrity()
        tri.engine.check_integrity()
    finally:
        tri.close()


@pytest.mark.gpu
def test_two_cuda_engines_capture_and_run_their_own_backends(tiny_llama_dir, monkeypatch):
    """On a GPU: an engine forced to the reference attention and cuBLAS (eager: the reference attention
    reads context lengths on the host, which a graph capture forbids) runs no Triton attention or GEMM
    kernel, while a default engine in the same process captures its decode graphs with them; stepped in
    turn, both finish, and their logits agree."""
    spy = _Spy(monkeypatch)
    kw = dict(dtype="float16", device="cuda", show_progress=False, calibration="off", num_blocks=32,
              block_size=16, max_num_seqs=4)
    ref = LLM(tiny_llama_dir, attention_backend="reference", linear_backend="cublas", enforce_eager=True, **kw)
    tri = None
    try:
        c = spy.take()  # building ref (num_blocks given: no activation-profiling forward) ran no Triton op
        assert c["triton_attention"] == c["flat_gemm"] == c["gemv"] == 0, c
        tri = LLM(tiny_llama_dir, **kw)
        c = spy.take()  # tri's decode-graph capture (M = batch rows: the GEMV)
        assert tri.engine.runner.graphs and c["triton_attention"] > 0 and c["gemv"] > 0, c
        assert c["reference_attention"] == 0, c
        assert tri.engine.backends == Backends.default(torch.device("cuda"))
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        prompt = [5, 9, 13, 40, 7, 3, 17]
        for llm in (ref, tri):
            llm.engine.add_request("r", prompt, params)
        ref_attention_calls = 0
        while ref.engine.has_unfinished_requests() or tri.engine.has_unfinished_requests():
            for name, llm in (("ref", ref), ("tri", tri)):
                if llm.engine.has_unfinished_requests():
                    llm.engine.step()
                    c = spy.take()  # eager steps call the ops; graph replays call nothing
                    if name == "ref":
                        assert c["triton_attention"] == c["flat_gemm"] == c["gemv"] == 0, c
                        ref_attention_calls += c["reference_attention"]
                    else:
                        assert c["reference_attention"] == 0, c
        assert ref_attention_calls > 0
        a, b = ref.engine.prompt_logits(prompt).float(), tri.engine.prompt_logits(prompt).float()
        assert float((a - b).norm() / a.norm()) < 2e-2
        ref.engine.check_integrity()
        tri.engine.check_integrity()
    finally:
        ref.close()
        if tri is not None:
            tri.close()
