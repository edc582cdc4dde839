"""Frequency tables and token-map formats: counts by hand, save/load and format round trips, EOS forcing,
conversions through `fit-frequency --import`, and the errors (missing files, wrong tokenizer, empty
corpora)."""
import json

import pytest
import torch

from microspec.cli import main as cli_main
from microspec.lab.frequency import (count_corpora, count_ids, export_top, import_token_map, load_table,
                                 save_table, top_ids)
from microspec.policies import StaticFrequencyPolicy, load_token_map


def main(argv):
    return cli_main(["fit-frequency", *argv])


WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", "dog", "</s>"]       # ids 0..7, EOS 7


@pytest.fixture
def tiny(tmp_path):
    """A word-level HF tokenizer file and a corpus whose counts are known: the 5, cat 3, sat 2, mat 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS[:-1])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    rows = [{"prompt": "ignored dog dog", "response": "the cat sat the"},
            {"prompt": "x", "response": "the cat the mat"}, {"prompt": "y", "response": "sat cat the"}]
    (tmp_path / "fit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lines.txt").write_text("dog dog\ncat\n")
    return tmp_path


def _tok(tiny):
    from microspec.lab.data import load_tokenizer
    return load_tokenizer(tiny / "tokenizer.json")


def test_counts_by_hand_and_table_round_trip(tiny):
    table = count_corpora([str(tiny / "fit.jsonl"), str(tiny / "lines.txt")], _tok(tiny),
                          text_field="response")
    # fit.jsonl responses: the 5, cat 3, sat 2, mat 1; lines.txt (plain lines, no field): dog 2, cat 1.
    assert table.counts.tolist() == [0, 5, 4, 2, 0, 1, 2, 0]
    assert table.ranked().tolist() == [1, 2, 3, 6, 5]                 # ties (sat, dog: 2) -> lower id first
    assert table.meta["vocab_size"] == 8 and table.meta["num_tokens"] == 14 and table.meta["eos_ids"] == [7]
    assert table.meta["distinct_ids"] == 5 and len(table.meta["date"]) == 10
    path = save_table(table, tiny / "t.safetensors")
    back = load_table(path)
    assert torch.equal(back.counts, table.counts) and back.counts.dtype == torch.long
    assert back.meta["corpora"] == table.meta["corpora"] and back.meta["vocab_size"] == 8
    assert back.meta["format"] == "microspec-frequency/1"
    # The static policy and the token-map reader take the table as it is.
    assert load_token_map(path).tolist() == [1, 2, 3, 6, 5]
    policy = StaticFrequencyPolicy.from_file(path, capacity=3)
    policy.setup(1, 8, [7], "cpu")
    assert policy.active()[0][0].tolist() == [1, 2, 7]


def test_export_formats_round_trip_and_force_eos(tiny):
    ranked = torch.tensor([1, 2, 3, 6, 5])
    assert top_ids(ranked, 3, eos_ids=[7]).tolist() == [1, 2, 7]        # least frequent kept id gives way
    assert top_ids(ranked, 3, eos_ids=[2]).tolist() == [1, 2, 3]        # already in: nothing changes
    assert top_ids(ranked, 10).tolist() == [1, 2, 3, 6, 5]
    for suffix in (".pt", ".json", ".txt", ".safetensors"):
        path = tiny / f"map{suffix}"
        written = export_top(ranked, path, 4, eos_ids=[7])
        assert written.tolist() == [1, 2, 3, 7]
        assert load_token_map(path).tolist() == [1, 2, 3, 7], suffix
    pt = torch.load(tiny / "map.pt", weights_only=True)                 # FR-Spec / SGLang: a 1-D int64 tensor
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.int64 and pt.dim() == 1
    assert json.loads((tiny / "map.json").read_text()) == [1, 2, 3, 7]  # vLLM: a JSON list
    assert (tiny / "map.txt").read_text().split() == ["1", "2", "3", "7"]
    with pytest.raises(ValueError, match="export format"):
        export_top(ranked, tiny / "map.csv", 2)
    with pytest.raises(ValueError, match="cannot hold"):
        top_ids(ranked, 1, eos_ids=[7, 0])


def test_cli_count_export_and_convert(tiny, capsys):
    tok, fit = str(tiny / "tokenizer.json"), str(tiny / "fit.jsonl")
    assert main([fit, "--tokenizer", tok, "--field", "response", "--out", str(tiny / "f.safetensors"),
                 "--export", str(tiny / "f.pt"), "--top", "3", "--no-progress"]) == 0
    assert load_table(tiny / "f.safetensors").counts.tolist() == [0, 5, 3, 2, 0, 1, 0, 0]
    assert torch.load(tiny / "f.pt", weights_only=True).tolist() == [1, 2, 7]
    # .pt -> .json -> .txt conversions keep the ranking; a table converts too.
    assert main(["--import", str(tiny / "f.pt"), "--export", str(tiny / "f.json")]) == 0
    assert main(["--import", str(tiny / "f.json"), "--export", str(tiny / "f.txt"), "--tokenizer", tok]) == 0
    assert load_token_map(tiny / "f.txt").tolist() == [1, 2, 7]
    assert main(["--import", str(tiny / "f.safetensors"), "--export", str(tiny / "g.json"), "--top", "2",
                 "--no-eos"]) == 0
    assert json.loads((tiny / "g.json").read_text()) == [1, 2]
    # An imported list saved as a table keeps its order under `token_ids`.
    assert main(["--import", str(tiny / "f.txt"), "--out", str(tiny / "h.safetensors")]) == 0
    assert load_table(tiny / "h.safetensors").ranked().tolist() == [1, 2, 7]
    assert import_token_map(tiny / "h.safetensors", vocab_size=8).ranked().tolist() == [1, 2, 7]


def test_cli_errors(tiny, capsys):
    tok, fit = str(tiny / "tokenizer.json"), str(tiny / "fit.jsonl")
    (tiny / "empty.jsonl").write_text(json.dumps({"prompt": "a", "response": ""}) + "\n")
    big = tiny / "big.json"
    big.write_text(json.dumps([1, 2, 500]))
    cases = [
        ([str(tiny / "missing.jsonl"), "--tokenizer", tok, "--out", str(tiny / "o.safetensors")],
         "not found"),
        ([fit, "--tokenizer", str(tiny / "nope.json"), "--out", str(tiny / "o.safetensors")], "not found"),
        (["--import", str(tiny / "nope.pt"), "--export", str(tiny / "o.json")], "not found"),
        ([str(tiny / "empty.jsonl"), "--tokenizer", tok, "--field", "response", "--out",
          str(tiny / "o.safetensors")], "empty corpus"),
        (["--import", str(big), "--export", str(tiny / "o.json"), "--tokenizer", tok], "another tokenizer"),
        ([fit, "--tokenizer", tok, "--out", str(tiny / "o.pt")], ".safetensors"),
        ([fit, "--out", str(tiny / "o.safetensors")], "needs --tokenizer"),
        ([fit, "--tokenizer", tok], "--out"),
        ([], "nothing to do"),
        ([fit, "--import", str(big), "--tokenizer", tok, "--out", str(tiny / "o.safetensors")], "not both"),
        ([fit, "--tokenizer", tok, "--out", str(tiny / "o.safetensors"), "--top", "3"], "--top applies"),
        ([fit, "--tokenizer", tok, "--field", "response", "--out", str(tiny / "no/dir/o.safetensors")],
         "folder does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("microspec fit-frequency: error:") and message in err, (argv, err)
    with pytest.raises(ValueError, match="outside"):
        count_ids([[1, 2, 9]], vocab_size=8)
    with pytest.raises(ValueError, match="no corpus"):
        count_corpora([], _tok(tiny))
