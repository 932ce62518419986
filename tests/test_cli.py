"""The command line: every command documents itself; generate and chat work on the embedded model."""
import io
import json

import pytest

from fdpp.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "bench"] + ["bench latency", "bench throughput"])
def test_each_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        main(command.split() + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fdpp" in out and "--" in out


def test_generate_json_and_chat_on_the_default_model(capsys, monkeypatch):
    rc = main(["generate", "What is the capital of France?", "--max-tokens", "12", "--json", "-q"])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert "Paris" in result["text"] and result["num_output_tokens"] <= 12

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/exit\n"))
    rc = main(["chat", "--max-tokens", "12", "-q"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_bad_model_path_is_a_clear_error(capsys):
    rc = main(["generate", "hi", "--model", "/no/such/model", "-q"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "/no/such/model" in err
