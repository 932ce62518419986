"""OutputProcessor alone (no model): token append, logprobs entries, incremental text, stop checks,
RequestOutput building. A fake tokenizer whose tokens are byte strings drives the real
IncrementalDetokenizer."""
from __future__ import annotations

import pytest
import torch

from fdpp.engine.output_processor import OutputProcessor, SampledToken
from fdpp.engine.sequence import Sequence
from fdpp.errors import FdppError
from fdpp.outputs import RequestMetrics
from fdpp.sampling_params import SamplingParams

# token id -> bytes; "é" is split over ids 9 and 10 (a character cut across tokens)
VOCAB = [b"<eos>", b"Hel", b"lo", b" wor", b"ld", b" E", b"ND", b"!", b"x", "é".encode()[:1], "é".encode()[1:],
         b"ld END!!"]
EOS, HEL, LO, WOR, LD, E, ND, BANG, X, E1, E2, LD_END = range(len(VOCAB))
PROMPT = [X, X]


class FakeTokenizer:
    """Concatenates the tokens' bytes; invalid UTF-8 decodes to U+FFFD as real tokenizers do."""

    def decode(self, ids, skip_special_tokens=True, spaces_between_special_tokens=True):
        return b"".join(VOCAB[i] for i in ids if not (skip_special_tokens and i == EOS)).decode(
            "utf-8", errors="replace")


def _setup(max_model_len=64, tokenizer=FakeTokenizer(), n=1, **params):
    proc = OutputProcessor(tokenizer, (EOS,), max_model_len)
    p = SamplingParams(**params)
    seqs = [Sequence("r", PROMPT, p, 0.0) for _ in range(n)]
    req = proc.new_request("r", None, PROMPT, p, seqs, RequestMetrics(arrival_time=0.0))
    return proc, req, seqs[0]


def _feed(proc, req, seq, toks, now=1.0):
    """Append ``toks`` until one ends the sequence; return (decision, how many were appended)."""
    for n, tok in enumerate(toks, 1):
        done = proc.append_token(req, seq, SampledToken(tok, None, None, None), now)
        if done is not None:
            return done, n
    return None, len(toks)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries(include):
    proc, req, seq = _setup(stop=["d END"], include_stop_str_in_output=include)
    done, n = _feed(proc, req, seq, [HEL, LO, WOR, LD, E, ND, BANG])
    assert done == ("stop", "d END") and n == 6  # completed by " E" + "ND" after "ld"
    assert req.texts[0] == ("Hello world END" if include else "Hello worl")
    assert seq.output_token_ids == [HEL, LO, WOR, LD, E, ND]  # the tokens stay, the text is cut
    # the processor decides; ending the sequence (blocks, status) is the engine's
    assert not seq.is_finished and seq.finish_reason is None


@pytest.mark.parametrize("include", [False, True])
def test_text_past_a_stop_in_the_same_token_is_cut(include):
    proc, req, seq = _setup(stop=["xyz", "END"], include_stop_str_in_output=include)
    done, _ = _feed(proc, req, seq, [HEL, LD_END])
    assert done == ("stop", "END")
    assert req.texts[0] == ("Helld END" if include else "Helld ")


def test_min_tokens_holds_eos_and_stop_token_ids():
    proc, req, seq = _setup(min_tokens=3, stop_token_ids=[BANG])
    done, n = _feed(proc, req, seq, [EOS, BANG, X, BANG])
    assert done == ("stop", BANG) and n == 4
    proc, req, seq = _setup(min_tokens=3)
    done, n = _feed(proc, req, seq, [EOS, X, EOS])
    assert done == ("stop", None) and n == 3
    assert req.texts[0] == "x" and seq.output_token_ids == [EOS, X, EOS]  # EOS text is not shown
    proc, req, seq = _setup(ignore_eos=True, max_tokens=3)
    assert _feed(proc, req, seq, [EOS, EOS, EOS]) == (("length", None), 3)


def test_max_tokens_and_context_length_end_as_length_and_flush_held_bytes():
    proc, req, seq = _setup(max_tokens=2)
    assert _feed(proc, req, seq, [X, E1]) == (("length", None), 2)
    assert req.texts[0] == "x\ufffd"  # the cut-off byte is flushed (as the tokenizer decodes it)
    proc, req, seq = _setup(max_model_len=len(PROMPT) + 3, max_tokens=100)
    assert _feed(proc, req, seq, [X, E1, E2, X]) == (("length", None), 3)
    assert req.texts[0] == "xé"  # the two halves joined: nothing held back at the end


def test_a_character_split_over_tokens_is_held_back_until_complete():
    proc, req, seq = _setup()
    _feed(proc, req, seq, [X, E1])
    assert req.texts[0] == "x"
    _feed(proc, req, seq, [E2])
    assert req.texts[0] == "xé"


def test_logprobs_entries_and_metrics():
    proc, req, seq = _setup(logprobs=2)
    out = type("Out", (), {})()
    out.token_ids = torch.tensor([X, LO])
    out.logprobs = torch.tensor([-0.5, -1.0])
    out.top_ids = torch.tensor([[X, HEL, LO], [HEL, LO, X]])
    out.top_logprobs = torch.tensor([[-0.5, -1.5, -2.0], [-0.25, -1.125, -3.0]])
    rows = OutputProcessor.unpack(out)
    assert rows[1] == SampledToken(LO, -1.0, [HEL, LO, X], [-0.25, -1.125, -3.0])
    assert proc.append_token(req, seq, rows[0], now=5.0) is None
    assert proc.append_token(req, seq, rows[1], now=7.0) is None
    # the sampled token first, then the top k (k=2 of the 3 computed), never overwriting it
    assert seq.logprobs == [{X: -0.5, HEL: -1.5}, {LO: -1.0, HEL: -0.25}]
    assert seq.cumulative_logprob == -1.5
    assert (req.metrics.first_token_time, req.metrics.last_token_time) == (5.0, 7.0)
    o = proc.make_output(req)
    assert o.outputs[0].logprobs == seq.logprobs and o.outputs[0].cumulative_logprob == -1.5
    assert o.outputs[0].text == "xlo" and not o.finished
    # logprobs=0: the sampled token only; no logprobs asked: no entries, no cumulative in the output
    proc, req, seq = _setup(logprobs=0)
    proc.append_token(req, seq, rows[1], now=1.0)
    assert seq.logprobs == [{LO: -1.0}]
    proc, req, seq = _setup()
    proc.append_token(req, seq, rows[1], now=1.0)
    assert seq.logprobs is None and proc.make_output(req).outputs[0].cumulative_logprob is None


def test_step_outputs_by_output_kind():
    proc, req, seq = _setup(n=2, output_kind="final_only")
    assert proc.step_outputs([req]) == []
    for s in req.seqs:
        s.finish_reason = "length"
        s.status = s.status.FINISHED
    (out,) = proc.step_outputs([req])
    assert out.finished and [c.index for c in out.outputs] == [0, 1]
    assert req.metrics.finished_time is not None
    proc, req, seq = _setup(output_kind="cumulative")
    (out,) = proc.step_outputs([req])
    assert not out.finished and req.metrics.finished_time is None


def test_grammar_rejection_raises_and_termination_stops():
    class Grammar:
        def __init__(self, ok, done):
            self.ok, self.done = ok, done

        def accept_token(self, tok):
            return self.ok

        def is_terminated(self):
            return self.done

    proc, req, seq = _setup(ignore_eos=True)
    seq.grammar = Grammar(ok=False, done=False)
    with pytest.raises(FdppError, match="grammar rejected sampled token"):
        _feed(proc, req, seq, [X])
    proc, req, seq = _setup(ignore_eos=True)
    seq.grammar = Grammar(ok=True, done=True)
    assert _feed(proc, req, seq, [EOS]) == (("stop", None), 1)


def test_without_a_tokenizer_texts_stay_empty_and_stop_strings_never_match():
    proc, req, seq = _setup(tokenizer=None, stop=["x"], max_tokens=2)
    assert req.detoks == [None]
    assert _feed(proc, req, seq, [X, X]) == (("length", None), 2)
    assert req.texts == [""]
