"""The command line: every command documents itself (with defaults); generate and chat work on the
embedded model; flags are checked before the model loads; slow phases say what they do."""
import io
import json

import pytest

from fdpp.cli import COMMANDS, main
from fdpp.models import presets


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "bench"] + ["bench latency", "bench throughput"])
def test_each_command_has_help_with_defaults(capsys, command):
    with pytest.raises(SystemExit) as e:
        main(command.split() + ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "usage: fdpp" in out and "--" in out
    assert "default" in out  # ArgumentDefaultsHelpFormatter (or the help text) states the defaults
    if command in ("generate", "chat"):
        max_tokens = 128 if command == "generate" else 512
        assert f"most tokens to generate per prompt (default: {max_tokens})" in out
        assert "0 = greedy (default: 0.0)" in out


@pytest.fixture
def shared_smollm2(smollm2_llm, monkeypatch):
    """The CLI's LLM(...) returns the session's SmolLM2 instead of loading it again."""
    monkeypatch.setattr("fdpp.llm.LLM", lambda *a, **k: smollm2_llm)
    yield smollm2_llm
    assert not smollm2_llm.engine.has_unfinished_requests()


def test_generate_json_prints_timing(capsys, shared_smollm2):
    rc = main(["generate", "What is the capital of France?", "--max-tokens", "12", "--json", "-q"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Paris" in result["text"] and result["num_output_tokens"] <= 12
    t = result["timing"]
    assert 0 < t["time_to_first_token_s"] <= t["total_s"] and t["decode_tokens_per_s"] > 0


def test_chat_streams_and_reset_confirms(capsys, monkeypatch, shared_smollm2):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/reset\n/exit\n"))
    rc = main(["chat", "--max-tokens", "12", "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "conversation cleared" in out


def test_ctrl_c_during_a_reply_stops_only_that_reply(capsys, monkeypatch, shared_smollm2):
    """The first reply is interrupted after two pieces; the chat goes on and answers the next line."""
    real_stream = shared_smollm2.stream
    calls = []

    def stream(prompt, params=None):
        calls.append(prompt)
        gen = real_stream(prompt, params)
        if len(calls) == 1:
            def interrupted():
                yield next(gen)
                yield next(gen)
                raise KeyboardInterrupt
            return _Closing(interrupted(), gen)
        return gen

    monkeypatch.setattr(shared_smollm2, "stream", stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a long story.\nWhat is the capital of France?\n"))
    rc = main(["chat", "--max-tokens", "40", "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[stopped]" in out and "Paris" in out and len(calls) == 2
    # the second prompt carries the first, stopped, reply as context
    assert len(calls[1]) > len(calls[0])


class _Closing:
    """A generator wrapper whose close() also closes the real stream (which aborts its request)."""

    def __init__(self, it, inner):
        self.it, self.inner = it, inner

    def __iter__(self):
        return self.it

    def close(self):
        self.inner.close()


def test_bad_sampling_flag_is_rejected_before_loading(capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("fdpp.llm.LLM", no_load)
    for cmd in (["generate", "hi"], ["chat"]):
        rc = main(cmd + ["--max-tokens", "-1", "-q"])
        assert rc == 1
        err = capsys.readouterr().err
        assert "--max-tokens" in err and "-1" in err
    assert main(["generate", "hi", "--seed-sampling", str(2**70), "-q"]) == 1
    assert "--seed-sampling" in capsys.readouterr().err


def test_bad_model_path_is_a_clear_error(capsys):
    rc = main(["generate", "hi", "--model", "/no/such/model", "-q"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "/no/such/model" in err


def test_mistyped_preset_lists_the_presets(capsys):
    rc = main(["generate", "hi", "--model", "llama-9-70b", "-q"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "llama-9-70b" in err and "llama-2-7b" in err and "Did you mean" in err
    for name in presets.PRESETS:
        assert name in err


TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, torch_dtype="float32",
            bos_token_id=1, eos_token_id=2)


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "tiny-cli-test", TINY)
    return "tiny-cli-test"


def test_tokenizerless_preset_chat_suggests_raw_and_raw_takes_text(capsys, tiny_preset):
    rc = main(["chat", "--model", tiny_preset, "-q", "--device", "cpu"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "generate --raw" in err and "chat()" not in err
    rc = main(["generate", "--raw", "héllo", "--model", tiny_preset, "--max-tokens", "3", "--ignore-eos",
               "-q", "--device", "cpu"])
    assert rc == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 3 and all(0 <= int(t) < 300 for t in ids)
    rc = main(["generate", "hello", "--model", tiny_preset, "-q", "--device", "cpu"])
    assert rc == 1 and "--raw" in capsys.readouterr().err


def test_bench_latency_and_throughput_print_tables_on_cpu(capsys, tiny_preset, tmp_path):
    rc = main(["bench", "latency", "--model", tiny_preset, "--input-len", "8", "--output-len", "4", "-q",
               "--device", "cpu"])
    assert rc == 0
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "GB/s" in header
    gbs = row.split()[5]
    assert gbs != "-" and float(gbs) > 0  # a CPU's fraction of a GB/s is not rounded to 0
    assert "wall tok/s" in header and "host ms" in header
    wall_ttft, wall_ms, wall_tok_s, host_ms = (float(v) for v in row.split()[7:11])
    assert wall_ttft > 0 and wall_ms > 0 and wall_tok_s > 0 and abs(wall_ms - host_ms - float(row.split()[3])) < 1e-2
    out_json = tmp_path / "thr.json"
    rc = main(["bench", "throughput", "--model", tiny_preset, "--num-prompts", "3", "--input-len", "4", "8",
               "--output-len", "2", "4", "-q", "--device", "cpu", "--json", str(out_json)])
    assert rc == 0
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "out tok/s" in header and row.split()[0] == "3"
    assert json.loads(out_json.read_text())["num_prompts"] == 3


def test_status_lines_for_slow_phases(capsys, monkeypatch, tiny_llama_dir):
    """Without -q each slow start-up phase prints a status line (the weights have their own bar)."""
    from fdpp.cli.common import set_cpu_threads
    from fdpp.utils import phase

    with phase("Reading x"):
        pass
    assert "Reading x ... done (" in capsys.readouterr().err
    rc = main(["generate", "--raw", "hi", "--model", tiny_llama_dir, "--max-tokens", "2", "--device", "cpu",
               "--calibration", "off"])
    assert rc == 0  # a folder without tokenizer files: --raw text goes in as bytes
    captured = capsys.readouterr()
    assert "Loading PyTorch ... done" in captured.err and len(captured.out.split()) == 2
    import argparse

    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("FDPP_NUM_THREADS", "1")
        assert set_cpu_threads(argparse.Namespace(threads=None)) == 1 and torch.get_num_threads() == 1
        assert set_cpu_threads(argparse.Namespace(threads=2)) == 2
        monkeypatch.delenv("FDPP_NUM_THREADS")
        assert set_cpu_threads(argparse.Namespace(threads=None)) >= 1
    finally:
        torch.set_num_threads(before)
