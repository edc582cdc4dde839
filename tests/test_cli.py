"""The command line: every command has --help; `demo` (the README's main job) runs and checks itself."""
import pytest

from microspec import models
from microspec.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert f"microspec {command}" in capsys.readouterr().out


def test_demo_falls_back_to_a_tiny_random_model_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(models, "find_smollm2", lambda download=True: None)
    rc = main(["demo", "--max-new-tokens", "7", "--prompts", "2", "--policy", "full,incontext",
               "--capacity", "64"])
    out, err = capsys.readouterr()
    assert "TINY RANDOM" in err and "tiny random Llama (fallback)" in out
    assert rc == 0 and "All outputs equal plain greedy decoding." in out


def test_demo_on_real_weights_equals_plain_greedy(smollm2_gguf, capsys):
    # the in-context policy needs no frequency table, so CI does not count the fitting corpora here
    rc = main(["demo", "--max-new-tokens", "8", "--prompts", "1", "--policy", "incontext"])
    out = capsys.readouterr().out
    assert "SmolLM2" in out and "incontext@1024" in out
    assert rc == 0 and "All outputs equal plain greedy decoding." in out
