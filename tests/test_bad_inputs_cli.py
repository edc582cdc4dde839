"""Issue 10 through the command line (items 1, 6, 9, 10, 11): every argument that can be checked without the
model is checked before the model (or tokenizer) loads, and a bad one ends the command with exit code 2 and a
single line `microspec <command>: error: ...` on stderr, never a traceback.

The loaders are replaced by tripwires, so "before the model load" is checked, not assumed.
"""
from __future__ import annotations

import pickle

import pytest
import torch

import microspec.cli.coverage as cli_coverage
import microspec.cli.eval as cli_eval
import microspec.cli.generate as cli_generate
import microspec.cli.tune as cli_tune
import microspec.lab.data as lab_data
import microspec.models as models
from microspec.cli import main
from microspec.policies import load_token_map


def _tripwire(*args, **kwargs):
    raise AssertionError("a model or tokenizer was loaded before the arguments were checked")


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(cli_generate, "load_target", _tripwire)
    monkeypatch.setattr(cli_eval, "load", _tripwire)
    monkeypatch.setattr(cli_coverage, "Setup", _tripwire)
    monkeypatch.setattr(cli_tune, "Setup", _tripwire)
    monkeypatch.setattr(models, "load_model", _tripwire)
    monkeypatch.setattr(lab_data, "load_tokenizer", _tripwire)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.fixture
def maps(tmp_path):
    """Bad token maps of every kind, and one with duplicates."""
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"token_ids\":")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "floats.json").write_text("[1.5, 2.0]")
    (tmp_path / "dup.json").write_text("[7, 3, 7, 2, 3, 9]")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(_Evil(), f, protocol=2)
    return tmp_path


def _run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def _assert_one_line_error(rc, err, command, fragment):
    assert rc == 2, f"exit code {rc}, stderr {err!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"microspec {command}: error: "), err
    assert fragment in lines[0], lines[0]


GENERATE_BAD = [
    (["-K", "0"], "-K must be >= 1"),
    (["--capacity", "0"], "--capacity must be >= 1"),
    (["--topk", "-1"], "--topk must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-p", "1.5"], "--top-p"),
    (["--policy", "bogus"], "unknown policy"),
    (["--policy", "static,incontext"], "exactly one --policy"),
    (["--drafter", "early-exit:x"], "early-exit:N"),
    (["--model", "/nonexistent/model.gguf"], "no such file"),
    (["--device", "nowhere"], "not a torch device"),
    (["--policy", "static", "--token-map", "{maps}/missing.pt"], "token map not found"),
    (["--policy", "static", "--token-map", "{maps}/corrupt.safetensors"], "not a token map"),
    (["--policy", "static", "--token-map", "{maps}/empty.txt"], "empty token map"),
    (["--policy", "static", "--token-map", "{maps}/floats.json"], "must be integers"),
    (["--policy", "incontext+core", "--token-map", "{maps}/evil.pt"], "never code"),
    (["--policy", "cluster", "--cluster", "{maps}/none.safetensors"], "no such file"),
]


@pytest.mark.parametrize("args,fragment", GENERATE_BAD, ids=[" ".join(a) for a, _ in GENERATE_BAD])
def test_generate_checks_arguments_before_loading_the_model(no_loading, maps, capsys, args, fragment):
    argv = ["generate", "hello"] + [a.format(maps=maps) for a in args]
    _assert_one_line_error(*_run(argv, capsys), "generate", fragment)
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize("command", [["generate", "hi", "--device", "cuda"],
                                     ["fit-clusters", "--out", "x.safetensors", "--device", "cuda"]])
def test_device_cuda_without_cuda_is_refused_before_loading(no_loading, capsys, command):
    _assert_one_line_error(*_run(command, capsys), command[0], "no usable CUDA device")


EVAL_BAD = [
    (["--per-task", "0"], "--per-task must be >= 1"),          # item 6: was an all-zero table and exit 0
    (["--per-task", "99"], "--per-task must be in"),
    (["-K", "0"], "-K must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--batch-size", "0"], "--batch-size"),
    (["--temperature", "0"], "--temperature"),
    (["--tasks", "nope"], "--tasks"),
    (["--policies", "incontext@x"], "incontext@x"),
    (["--policies", "static@5/k2"], "suffixes"),
    (["--drafter", "early-exit:0"], "early-exit:N"),
    (["--target", "/nonexistent.gguf"], "no such file"),
]


@pytest.mark.parametrize("args,fragment", EVAL_BAD, ids=[" ".join(a) for a, _ in EVAL_BAD])
def test_eval_checks_arguments_before_loading_the_model(no_loading, capsys, args, fragment):
    _assert_one_line_error(*_run(["eval"] + args, capsys), "eval", fragment)


@pytest.mark.parametrize("name,fragment", [("corrupt.safetensors", "not a token map"),
                                           ("evil.pt", "never code"), ("empty.txt", "empty token map"),
                                           ("missing.json", "token map not found")])
def test_fit_frequency_import_of_a_bad_map_is_one_line(no_loading, maps, capsys, name, fragment):
    argv = ["fit-frequency", "--import", maps / name, "--export", maps / "out.json"]
    _assert_one_line_error(*_run(argv, capsys), "fit-frequency", fragment)
    assert not (maps / "out.json").exists()


def test_fit_frequency_bad_output_paths_fail_before_counting(no_loading, maps, capsys):
    argv = ["fit-frequency", "gsm8k:train", "--tokenizer", maps, "--out", maps / "table.json"]
    _assert_one_line_error(*_run(argv, capsys), "fit-frequency", "--out")
    argv = ["fit-frequency", "--import", maps / "dup.json", "--export", maps / "nodir" / "x.txt"]
    _assert_one_line_error(*_run(argv, capsys), "fit-frequency", "folder does not exist")


@pytest.mark.parametrize("suffix", [".txt", ".json", ".pt", ".safetensors"])
def test_item1_fit_frequency_export_writes_no_duplicates(maps, capsys, suffix):
    out = maps / f"top{suffix}"
    rc, err = _run(["fit-frequency", "--import", maps / "dup.json", "--export", out, "--no-eos"], capsys)
    assert rc == 0, err
    assert load_token_map(out).tolist() == [7, 3, 2, 9]
    if suffix == ".txt":
        assert out.read_text().split() == ["7", "3", "2", "9"]


def test_coverage_and_tune_check_maps_and_ranges_before_loading(no_loading, maps, capsys):
    base = ["gsm8k:test", "--tokenizer", maps]
    bad_map = maps / "corrupt.safetensors"
    rc, err = _run(["coverage", *base, "--policy", "static", "--token-map", bad_map], capsys)
    _assert_one_line_error(rc, err, "coverage", "not a token map")
    rc, err = _run(["coverage", *base, "--capacity", "0"], capsys)
    _assert_one_line_error(rc, err, "coverage", "--capacity")
    rc, err = _run(["tune", *base, "--capacity-range", "10", "5"], capsys)
    _assert_one_line_error(rc, err, "tune", "--capacity-range")
    rc, err = _run(["tune", *base, "--token-map", maps / "evil.pt"], capsys)
    _assert_one_line_error(rc, err, "tune", "never code")
