"""bench/step_trace.py's targets from its variants' synchronized steps (no engine: hand-made traces)."""
from tests.helpers import load_bench


def _variant(decode_ms: list[float], tok_s: float = 4000.0) -> dict:
    # (rows, tokens, is_prefill, ms, host_ms, kind): one prefill step, then full-batch decode steps and a
    # smaller tail step that must not count
    steps = [(8, 8192, True, 190.0, 20.0, "prefill")] + [(4, 4, False, m, 0.5, "decode") for m in decode_ms]
    steps.append((2, 2, False, 1.0, 0.5, "decode"))
    return {"steps": steps, "wall_decode_tokens_per_s": tok_s}


def test_unified_over_sync_and_cache_off_over_on():
    st = load_bench("step_trace")
    result = {"variants": {"default": _variant([10.0, 10.5, 10.2]), "sync_softmax": _variant([9.8, 10.0, 10.1]),
                           "no_prefix_cache": _variant([10.1, 10.0, 10.0])}}
    got = {t["name"]: t for t in st.targets(result, "m", 4, 16)}
    unified = got["attention.m.b4_in16.decode_step_unified_over_sync"]
    assert unified["value"] == round(10.2 / 10.0, 3) and not unified["met"]  # 2% slower than sync: missed
    cache = got["prefix.m.b4_in16.decode_step_cache_off_over_on"]
    assert cache["value"] == round(10.0 / 10.2, 3) and cache["met"]


def test_missing_variants_give_no_target():
    st = load_bench("step_trace")
    got = st.targets({"variants": {"default": _variant([10.0]), "sync_softmax": {"skipped": "budget"}}}, "m", 4, 16)
    assert [t["name"] for t in got] == []
