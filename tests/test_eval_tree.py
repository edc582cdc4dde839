"""`microspec eval --drafter eagle:PATH --tree TOPK,DEPTH,TOKENS` end to end on a tiny random Llama saved as a
Hugging Face directory (word-level tokenizer, no chat template) with a fresh EAGLE head: the tree reaches the
decoder, greedy output equals plain greedy decoding, acceptance is per tree depth, and bad combinations are
refused before any model loads."""
import json

import pytest
import torch

from microspec.cli import main
from microspec.lab.data import shared_data_dir

WORDS = "the a of to and in is that for it as with was on be by at this".split()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from microspec.drafting.eagle import EagleDrafter
    root = tmp_path_factory.mktemp("tiny_eval")
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>"] + WORDS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=1, bos_token_id=1)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)              # sharp distributions: real, partial acceptance
    model.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    EagleDrafter.from_target(model, seed=0).save_pretrained(root / "eagle")
    return root


needs_data = pytest.mark.skipif(shared_data_dir(required=False) is None, reason="../shared/data not present")


@needs_data
def test_eval_with_eagle_tree(pair, capsys):
    out = pair / "eval.json"
    rc = main(["eval", "--target", str(pair / "target"), "--drafter", f"eagle:{pair / 'eagle'}",
               "--tree", "3,3,8", "--policies", "full,incontext@8", "--tasks", "qa,gsm8k", "--per-task", "1",
               "--max-new-tokens", "12", "--modes", "greedy,sampling", "--json", str(out), "-q"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["tree"] == "3,3,8" and data["K"] == 3 and data["drafter"].startswith("EAGLE head")
    for mode in ("greedy", "sampling"):
        for label in ("full", "incontext@8"):
            rows = data["runs"][mode]["policies"][label]["rows"]
            assert len(rows) == 2 and all(0 <= x <= 3 for r in rows for x in r["trace"])   # depth 3 at most
            assert all(r["generated"] == 12 or r["trace"] for r in rows)
    greedy = data["runs"]["greedy"]
    assert all(e["greedy_mismatches"] == [] for e in greedy["policies"].values())
    assert greedy["tasks"]["full"]["all"]["mean_active"] == 2 + len(WORDS)
    assert greedy["tasks"]["incontext@8"]["all"]["mean_active"] <= 8
    assert "tree 3,3,8" in capsys.readouterr().out


@pytest.mark.parametrize("extra, fragment", [
    (["--tree", "3,3"], "TOPK,DEPTH,TOKENS"),
    (["--drafter", "self", "--tree", "3,3,8"], "EAGLE drafter"),
    (["--tree", "3,3,8", "--traces", "t.json"], "chains"),
])
def test_eval_tree_arguments_checked_before_loading(pair, monkeypatch, capsys, extra, fragment):
    import microspec.cli.eval as cli_eval
    monkeypatch.setattr(cli_eval, "load", lambda *a, **k: pytest.fail("loaded before the check"))
    argv = ["eval", "--target", str(pair / "target"), "--drafter", f"eagle:{pair / 'eagle'}"] + extra
    assert main(argv) != 0
    assert fragment in capsys.readouterr().err


def test_eval_refuses_a_missing_eagle_head(pair, capsys):
    assert main(["eval", "--target", str(pair / "target"), "--drafter", f"eagle:{pair / 'nothing'}"]) != 0
    assert "EAGLE" in capsys.readouterr().err
