"""fdpp.benchmark helpers that need no model."""
import pytest

from fdpp.benchmark import triton_compiles


def test_triton_compiles_records_through_the_jit_cache_hook_and_restores_it():
    knobs = pytest.importorskip("triton").knobs
    before = knobs.runtime.jit_cache_hook
    with triton_compiles() as events:
        hook = knobs.runtime.jit_cache_hook
        assert hook is not before
        # the call Triton makes before compiling a new specialization; False lets it compile
        assert hook(key="k", repr="paged_prefill_kernel[num_warps=4](q: *fp16:16)", fn=None, compile=None,
                    is_manual_warmup=False, already_compiled=False) is False
    assert knobs.runtime.jit_cache_hook is before
    assert [sig for _, sig in events] == ["paged_prefill_kernel[num_warps=4](q: *fp16:16)"]
