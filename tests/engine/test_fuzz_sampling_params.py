"""Property tests: any keyword values either build a SamplingParams or raise InvalidRequestError
(never another exception), and whatever builds runs through an engine step without failing."""
import dataclasses
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdpp import SamplingParams
from fdpp.errors import InvalidRequestError

INT64 = 2**63
edge_ints = st.one_of(
    st.integers(min_value=-3, max_value=40),
    st.sampled_from([INT64 - 1, INT64, -INT64, -INT64 - 1, 2**64, 2**70, 2**31, 100000, 10**400]),
    st.integers(),
)
edge_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-0.5, max_value=2.5),
    st.sampled_from([0.0, -0.0, 1.0, 1e-6, 1e308, -1e308, 5e-324]),
)
wrong_types = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
any_value = st.one_of(edge_ints, edge_floats, wrong_types)

INT_FIELDS = ["n", "top_k", "max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs"]
FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]
OTHER_FIELDS = ["stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                "output_kind", "logit_bias", "structured_outputs"]


@st.composite
def sampling_kwargs(draw):
    kw = {}
    for name in INT_FIELDS:
        if draw(st.booleans()):
            kw[name] = draw(st.one_of(edge_ints, any_value))
    for name in FLOAT_FIELDS:
        if draw(st.booleans()):
            kw[name] = draw(st.one_of(edge_floats, any_value))
    for name in OTHER_FIELDS:
        if draw(st.integers(0, 3)) == 0:
            kw[name] = draw(st.one_of(any_value, st.lists(any_value, max_size=3), st.text(max_size=3)))
    return kw


def _build(kw):
    try:
        return SamplingParams(**kw)
    except InvalidRequestError as e:
        assert e.param, e  # every rejection names the parameter
        return None


@settings(max_examples=400, deadline=None)
@given(sampling_kwargs())
def test_any_kwargs_build_or_raise_invalid_request(kw):
    sp = _build(kw)
    if sp is None:
        return
    # a built object is in range and survives re-validation (add_request validates again)
    assert 1 <= sp.n and math.isfinite(sp.temperature) and 0 < sp.top_p <= 1
    assert sp.top_k == -1 or 1 <= sp.top_k < INT64
    assert sp.seed is None or -INT64 <= sp.seed < INT64
    sp.validate()
    dataclasses.replace(sp, n=1)


# In-range values, edges included, for the engine run (the test above covers the rejections).
in_range = st.fixed_dictionaries({}, optional={
    "n": st.integers(1, 2),
    "top_k": st.one_of(st.integers(-1, 130), st.sampled_from([2**31, INT64 - 1])),
    "max_tokens": st.one_of(st.none(), st.integers(1, 3)),
    "min_tokens": st.integers(0, 1),
    "seed": st.one_of(st.integers(-INT64, INT64 - 1), st.sampled_from([-INT64, INT64 - 1])),
    "logprobs": st.integers(0, 20),
    "temperature": st.one_of(st.floats(0.0, 1e308), st.sampled_from([0.0, 1e-6, 1e308])),
    "top_p": st.one_of(st.floats(5e-324, 1.0), st.just(1.0)),
    "min_p": st.floats(0.0, 1.0),
    "repetition_penalty": st.floats(1e-300, 1e300),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "stop_token_ids": st.lists(st.one_of(st.integers(0, 130), st.just(INT64 - 1)), max_size=3),
    "ignore_eos": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(0, 127), st.floats(-100.0, 100.0), max_size=3),
    "prompt_logprobs": st.integers(0, 20),
})


def _runnable(sp: SamplingParams) -> SamplingParams:
    """Few tokens per request: the point is every parameter path, not long generations."""
    return dataclasses.replace(sp, max_tokens=min(sp.max_tokens or 3, 3), output_kind="final_only")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(in_range.map(_build).filter(lambda sp: sp is not None), min_size=1, max_size=3))
def test_built_params_never_fail_in_a_step(tiny_llm, params):
    engine = tiny_llm.engine
    runnable = [_runnable(sp) for sp in params]
    outs = tiny_llm.generate([[5, 6, 7]] * len(runnable), runnable, use_tqdm=False)
    for out, sp in zip(outs, runnable):
        assert out.error is None, out.error
        assert all(c.finish_reason in ("stop", "length") for c in out.outputs)
        assert len(out.outputs) == sp.n
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
