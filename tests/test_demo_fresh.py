"""`microspec demo` as a newcomer runs it after `pip install`: only what the wheel ships (built here from the
working tree, unpacked into a temporary folder), started from an empty folder, with ../shared hidden
(MICROSPEC_NO_SHARED=1: CI has it beside the checkout) and no MICROSPEC_SHARED_DATA. The weights are the real
SmolLM2 when this machine has them, passed the way a user would (MICROSPEC_MODELS_DIR); otherwise pip may not
reach an index and the demo must fall back to its tiny model and say so."""
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from microspec import models
from microspec.cli import _common
from microspec.paths import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ("microspec/assets/demo_corpus.jsonl.gz", "microspec/assets/README.md")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The package as pip would install it: a wheel built from a copy of the tree, unpacked."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("fresh")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "microspec", src / "microspec",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("microspec-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        missing = [a for a in ASSETS if a not in z.namelist()]
        assert not missing, f"the wheel does not ship {missing}: check [tool.setuptools.package-data]"
        z.extractall(tmp / "site")
    return tmp / "site"


def test_demo_runs_from_the_wheel_without_shared_data(site, tmp_path):
    weights = models.find_smollm2(download=False)           # this checkout's weights, if any
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROSPEC_")}
    env.update(MICROSPEC_NO_SHARED="1", MICROSPEC_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(site),
               PIP_NO_INDEX="1")                           # never download in a test
    if weights is not None:
        env["MICROSPEC_MODELS_DIR"] = str(weights.parent)
    code = ("import sys, microspec, microspec.cli; print('package', microspec.__file__, flush=True); "
            "sys.exit(microspec.cli.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "demo", "--max-new-tokens", "6", "--prompts", "2",
                           "--capacity", "256"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-3000:]}"
    assert f"package {site}" in out                         # the unpacked wheel ran, not the checkout
    if weights is not None:
        assert "SmolLM2" in out and "TINY RANDOM" not in err
    else:
        assert "TINY RANDOM" in err
    for row in ("full", "static@256", "incontext@256", "incontext+core@256"):
        assert any(line.startswith(row + " ") for line in out.splitlines()), f"no {row} row in:\n{out}"
    assert "note: no cluster row" in out                    # docs/results is not in the wheel
    assert "All outputs equal plain greedy decoding." in out
    assert "No timings on a CPU" in out


def test_no_shared_hides_the_shared_folder_even_when_it_is_named(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("MICROSPEC_SHARED_DATA", str(tmp_path / "data"))
    assert shared_data_dir(required=False) == (tmp_path / "data").resolve()
    monkeypatch.setenv("MICROSPEC_NO_SHARED", "1")
    assert shared_data_dir(required=False) is None
    with pytest.raises(FileNotFoundError, match="MICROSPEC_NO_SHARED"):
        shared_data_dir()
    monkeypatch.delenv("MICROSPEC_MODELS_DIR", raising=False)
    monkeypatch.setenv("MICROSPEC_CACHE", str(tmp_path / "cache"))
    assert models.find_smollm2(download=False) is None      # ../shared/models is hidden with it


def _args(**kw):
    base = dict(policy="cluster", cluster=None, model="smollm2", capacity=64, topk=3, eviction="lru",
                token_map=None)
    return types.SimpleNamespace(**{**base, **kw})


def test_demo_leaves_out_the_cluster_row_when_its_default_file_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_common, "SMOLLM2_CLUSTERS", tmp_path / "absent.safetensors")
    tokenizer = object()                                      # only its presence matters for the cluster row
    assert _common.build_policies(_args(), tokenizer, 49152, skip_missing_cluster=True) == {}
    assert "note: no cluster row" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):                    # `generate --policy cluster` must not go quiet
        _common.build_policies(_args(), tokenizer, 49152)
    with pytest.raises(FileNotFoundError):                    # nor a file the user named
        _common.build_policies(_args(cluster=str(tmp_path / "named.safetensors")), tokenizer, 49152,
                               skip_missing_cluster=True)


def test_demo_frequency_list_comes_from_the_package(monkeypatch):
    """The static/core ranking is counted over the shipped answers with the model's tokenizer, with the
    shared folder hidden: ids of frequent English pieces first, all inside the head."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    monkeypatch.setenv("MICROSPEC_NO_SHARED", "1")
    words = ["the", "a", "is", "step", "of", "and", "to", "in", "function", "story"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    ranking = _common.frequency_ranking(_args(), tokenizer, 8)
    assert ranking.numel() > 3 and int(ranking.max()) < 8
    assert int(ranking[0]) == 0                               # unknown words dominate a 10-word vocabulary
    assert vocab["the"] in ranking[:4].tolist()
