"""The engine on a GPU: Triton kernels, CUDA graphs; checked against transformers in fp32."""
import os

import pytest
import torch

from fdpp import LLM, SamplingParams
from tests.helpers import write_tiny_llama

pytestmark = pytest.mark.gpu


def _greedy_is_argmax_up_to_rounding(hf32, prompt, tokens, tol):
    """Each greedy token must be the fp32 reference's argmax, or within ``tol`` of it (a near-tie that
    half-precision rounding may break either way)."""
    ids = torch.tensor([prompt + tokens], device="cuda")
    with torch.no_grad():
        logits = hf32(ids).logits[0, len(prompt) - 1 : -1].float()
    best = logits.max(dim=-1).values
    chosen = logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
    gap = (best - chosen).max().item()
    assert gap <= tol, f"a greedy token is {gap:.3f} below the fp32 argmax logit"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("eager", [True, False])
def test_gpu_engine_matches_transformers(tmp_path, dtype, eager):
    hf = write_tiny_llama(str(tmp_path), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    hf = hf.to("cuda", torch.float32)
    llm = LLM(str(tmp_path), dtype=dtype, device="cuda", show_progress=False, enforce_eager=eager,
              max_num_seqs=8, gpu_memory_utilization=0.3)
    prompt = torch.randint(3, 512, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    eng = llm.engine
    ours = eng.prompt_logits(prompt).double()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0].double()
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err < (5e-3 if dtype == "float16" else 3e-2), err
    # a batch of prompts of different lengths (graph buckets with padding rows) decodes greedily
    prompts = [prompt[:n] for n in (5, 77, 200)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for pr, out in zip(prompts, outs):
        _greedy_is_argmax_up_to_rounding(hf, pr, out.outputs[0].token_ids, 0.05 if dtype == "float16" else 0.2)
    eng.check_integrity()
    llm.close()


@pytest.mark.parametrize("eager", [True, False])
def test_async_scheduling_gives_the_sync_tokens_on_cuda(tmp_path, eager):
    """Overlapped steps (input ids from the device, tokens read one step late, double-buffered graph
    staging) give exactly the tokens of synchronous steps, stops and n > 1 included."""
    write_tiny_llama(str(tmp_path), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    llm = LLM(str(tmp_path), dtype="float16", device="cuda", show_progress=False, enforce_eager=eager,
              max_num_seqs=8, gpu_memory_utilization=0.3, async_scheduling=True)
    eng = llm.engine
    assert eng.async_scheduling  # the CUDA default
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 77, 200, 31)]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.9, top_k=50, seed=4, n=3, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1)]

    def run(flag, ps=params, prs=prompts):
        # NOTE: each run from a cold prefix cache: a prefix hit computes the prompt in another order
        # (attention over cached blocks), which changes fp16 rounding, not a scheduling effect
        eng.reset_prefix_cache()
        eng.async_scheduling = flag
        outs = llm.generate(prs, ps, use_tqdm=False)
        eng.check_integrity()
        assert eng.block_manager.num_used_blocks == 0
        return [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs] for o in outs]

    try:
        sync = run(False)
        assert run(True) == sync
        stop = sync[0][0][0][9]
        one = [SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop], ignore_eos=True)]
        stopped_sync, stopped_async = run(False, one, prompts[:1]), run(True, one, prompts[:1])
        assert stopped_async == stopped_sync
        tokens, reason, _ = stopped_async[0][0]
        assert reason == "stop" and tokens[-1] == stop and stop not in tokens[:-1]
    finally:
        llm.close()


@pytest.mark.parametrize("eager", [True, False])
def test_async_scheduling_overlaps_grammar_rows_with_the_sync_tokens_on_cuda(eager, monkeypatch, tmp_path):
    """Grammar rows overlap (step t+1's forward runs while step t's tokens advance the grammars; the
    bitmask is filled after) and give the sync tokens: batch 1 (logprobs equal too) and a batch
    mixing JSON schema, regex, choice (n > 1, ending early) and free rows. The embedded SmolLM2 (a
    grammar needs a tokenizer)."""
    import json
    import re

    from fdpp.engine.model_runner import ModelRunner
    from fdpp.errors import ModelLoadError
    from fdpp.structured import StructuredOutputsParams as SO

    calls = {"device": 0}
    original = ModelRunner.execute

    def execute(self, batch, device_tokens=None, before_sample=None):
        result = original(self, batch, device_tokens, before_sample)
        calls["device"] += device_tokens is not None
        return result

    monkeypatch.setattr(ModelRunner, "execute", execute)
    kw = dict(dtype="float16", device="cuda", show_progress=False, quantization="none", calibration="off",
              enforce_eager=eager, max_num_seqs=8, gpu_memory_utilization=0.3, async_scheduling=True)
    try:
        llm = LLM(**kw)
    except ModelLoadError as e:
        # NOTE: the embedded SmolLM2 (94 MB) does not travel to a GPU machine that lacks it; its
        # tokenizer folder does (FDPP_TEST_TOKENIZER): a tiny random model with that vocabulary then
        tok = os.environ.get("FDPP_TEST_TOKENIZER")
        if not tok:
            pytest.skip(f"{e} (or set FDPP_TEST_TOKENIZER to a SmolLM2 tokenizer folder)")
        write_tiny_llama(str(tmp_path), vocab_size=49152, hidden_size=128, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2)
        llm = LLM(str(tmp_path), tokenizer=tok, **kw)
    eng = llm.engine
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    as_json = SamplingParams(temperature=0, max_tokens=48, logprobs=2,
                             structured_outputs=SO(json=schema, disable_any_whitespace=True))

    def run(flag, prompts, params):
        eng.reset_prefix_cache()  # cold runs: a prefix hit computes the prompt in another order
        eng.async_scheduling = flag
        calls["device"] = 0
        outs = llm.generate(prompts, params, use_tqdm=False)
        eng.check_integrity()
        assert eng.block_manager.num_used_blocks == 0
        return [[(c.token_ids, c.finish_reason, c.logprobs, c.text) for c in o.outputs] for o in outs], calls["device"]

    try:
        (one_sync, n_sync), (one_async, n_async) = (run(f, ["A person as JSON:\n"], [as_json]) for f in (False, True))
        assert n_sync == 0 and n_async >= 5, (n_sync, n_async)  # batch 1 with a grammar overlapped
        assert one_async == one_sync
        json.loads(one_sync[0][0][3])
        prompts = ["A person as JSON:\n", "Phone:", "Pick a colour:", "The capital of France is"]
        params = [as_json,
                  SamplingParams(temperature=0, max_tokens=16, structured_outputs=SO(regex=r"\d{3}-\d{4}")),
                  SamplingParams(temperature=1.0, seed=2, n=3, max_tokens=8,
                                 structured_outputs=SO(choice=["red", "green", "blue"])),
                  SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)]
        (mixed_sync, _), (mixed_async, n_mixed) = (run(f, prompts, params) for f in (False, True))
        assert n_mixed >= 5
        # tokens and texts exactly; logprobs up to rounding (a row that a grammar ended rides the next
        # forward, so the others may run at another batch size, which can round differently)
        assert [[(c[0], c[1], c[3]) for c in o] for o in mixed_async] == [[(c[0], c[1], c[3]) for c in o] for o in mixed_sync]
        json.loads(mixed_sync[0][0][3])
        assert re.fullmatch(r"\d{3}-\d{4}", mixed_sync[1][0][3])
        assert all(c[3] in ("red", "green", "blue") for c in mixed_sync[2])
    finally:
        llm.close()


def test_fused_norm_matches_separate_norms_on_cuda(tmp_path):
    """The decoder with RMSNorm in the qkv / gate_up prologue (and residual adds in the o / down
    epilogues) gives the separate-norm logits within fp16 rounding, eager and in CUDA graphs."""
    hf = write_tiny_llama(str(tmp_path), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    hf = hf.to("cuda", torch.float32)
    prompt = torch.randint(3, 512, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = {}
    for fuse in (False, True):
        llm = LLM(str(tmp_path), dtype="float16", device="cuda", show_progress=False, max_num_seqs=8,
                  gpu_memory_utilization=0.3, fuse_norm=fuse)
        try:
            assert llm.engine.fuse_norm == fuse
            logits[fuse] = llm.engine.prompt_logits(prompt).double()
            prompts = [prompt, prompt[:9]]
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                use_tqdm=False)
            for pr, out in zip(prompts, outs):  # decode through the captured graphs
                _greedy_is_argmax_up_to_rounding(hf, pr, out.outputs[0].token_ids, 0.05)
        finally:
            llm.close()
    err = ((logits[True] - logits[False]).norm() / logits[False].norm()).item()
    assert err < 5e-3, err


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fused_rope_gives_the_unfused_tokens_on_cuda(tmp_path, monkeypatch, dtype):
    """fuse_rope: the batch-1 qkv GEMV rotates q and k and writes the KV cache in its epilogue (eager and in
    the decode graphs); the tokens are the unfused engine's (float32) or the fp32 argmax up to rounding, and
    the fused kernel ran."""
    import fdpp.kernels.gemv as gemv_mod

    hf = write_tiny_llama(str(tmp_path), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    hf = hf.to("cuda", torch.float32)
    calls = []
    real = gemv_mod.gemv_rope_store
    monkeypatch.setattr(gemv_mod, "gemv_rope_store", lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw))
    prompt = torch.randint(3, 512, (77,), generator=torch.Generator().manual_seed(2)).tolist()
    runs = {}
    for fuse in (False, True):
        for eager in (True, False):
            calls.clear()
            llm = LLM(str(tmp_path), dtype=dtype, device="cuda", show_progress=False, max_num_seqs=4,
                      gpu_memory_utilization=0.3, fuse_rope=fuse, enforce_eager=eager)
            try:
                out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                   use_tqdm=False)[0].outputs[0].token_ids
            finally:
                llm.close()
            assert bool(calls) is fuse, calls
            runs[fuse, eager] = out
            _greedy_is_argmax_up_to_rounding(hf, prompt, out, 0.02 if dtype == "float32" else 0.08)
    if dtype == "float32":
        assert runs[True, True] == runs[False, True] and runs[True, False] == runs[False, False]


def test_full_batch_not_a_bucket_replays_a_graph(tmp_path):
    """max_num_seqs that is not one of the standard buckets (5) still gets a decode graph of its own:
    a full batch replays it instead of running eagerly (a 33-row engine ran its full steps eagerly)."""
    write_tiny_llama(str(tmp_path), vocab_size=512)
    llm = LLM(str(tmp_path), dtype="float16", device="cuda", show_progress=False, max_num_seqs=5,
              gpu_memory_utilization=0.3)
    try:
        runner = llm.engine.runner
        assert runner.graph_batch_sizes == [1, 2, 4, 5]
        outs = llm.generate([[5, 6, 7, 8]] * 5, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        assert runner.num_decode_replays >= 6  # the 7 decode steps of 5 rows each (minus async slack)
    finally:
        llm.close()


def test_balanced_decode_graphs_for_one_long_row(tmp_path):
    """A batch with one long row among short ones replays the decode graph captured with more splits
    (ModelRunner.balanced_graphs) and decodes the eager steps' greedy tokens (fp32; where they differ, the
    graph's must be the fp32 reference's argmax up to rounding)."""
    hf = write_tiny_llama(str(tmp_path), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=512, max_position_embeddings=8192)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in [6000] + [40] * 23]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for eager in (True, False):
        llm = LLM(str(tmp_path), dtype="float32", device="cuda", show_progress=False, enforce_eager=eager,
                  max_num_seqs=24, max_model_len=6100, gpu_memory_utilization=0.3,
                  cuda_graph_balanced_decode=True)
        try:
            runner = llm.engine.runner
            assert runner.decode_splits([6000] + [40] * 23) is not None
            if not eager:  # 24 rows x 4 KV heads: the batch's own count is 2
                assert 24 in runner.balanced_graphs, (runner.graph_batch_sizes, sorted(runner.balanced_graphs))
            outs = llm.generate(prompts, params, use_tqdm=False)
            tokens[eager] = [o.outputs[0].token_ids for o in outs]
            if not eager:
                assert runner.num_balanced_replays > 0, (runner.num_decode_replays, runner.num_balanced_replays)
        finally:
            llm.close()
    # Eager steps and the graphs may split the keys differently (fp32 sums in another order): a
    # sequence whose tokens differ must still be the fp32 reference's argmax up to that rounding.
    hf = hf.to("cuda", torch.float32)
    for i in [i for i, (a, b) in enumerate(zip(tokens[True], tokens[False])) if a != b]:
        _greedy_is_argmax_up_to_rounding(hf, prompts[i], tokens[False][i], 0.02)


def test_sampling_inputs_reach_the_device_without_a_sync(tmp_path):
    """The per-step sampling tensors (temperature, top-k/p, min-p, penalties, counts, banned tokens) and the
    block-copy indices go through pinned memory without a stream sync. With async scheduling a sync there
    waits for the step in flight: on 2026-12-04 a B64 sampled decode step took 16.4 ms with async scheduling on,
    the same as with it off; 13.7 ms after the fix. torch's sync debug mode raises on any synchronizing call."""
    from fdpp.engine.sequence import Sequence

    write_tiny_llama(str(tmp_path), vocab_size=512)
    llm = LLM(str(tmp_path), dtype="float16", device="cuda", show_progress=False, max_num_seqs=4,
              gpu_memory_utilization=0.3, calibration="off")
    try:
        runner = llm.engine.runner
        params = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, max_tokens=4),
                  SamplingParams(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5,
                                 frequency_penalty=0.1, min_tokens=3, max_tokens=4)]
        seqs = [Sequence(f"r{i}", [1, 2, 3, 4], p, 0.0) for i, p in enumerate(params)]
        seqs[1].output_counts = {3: 2}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            b = runner._sampling_params_batch(seqs)
            runner.copy_blocks([(1, 2)])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        assert b.temperatures.is_cuda and b.temperatures.tolist() == pytest.approx([0.8, 1.0])
        assert b.top_k.tolist() == [5, 512] and b.top_p.tolist() == pytest.approx([0.9, 1.0])
        assert b.repetition_penalty.tolist() == pytest.approx([1.0, 1.2])
        assert b.output_counts[1, 3].item() == 2 and b.seen_mask[0, :5].tolist() == [False, True, True, True, True]
        assert b.banned is not None and b.banned.is_cuda and bool(b.banned[1].any()) and not bool(b.banned[0].any())
    finally:
        llm.close()
