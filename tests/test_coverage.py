"""The coverage simulator against hand-computed cases and a one-document-at-a-time reference, and the
`microspec coverage` command end to end (table, JSON, error exits)."""
import json
import random

import pytest
import torch

from microspec.cli import main
from microspec.lab.coverage import CoverageResult, simulate
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy, save_token_map

V = 50


def test_in_context_covers_a_response_made_of_prompt_tokens():
    prompt = list(range(10, 30))
    response = [12, 29, 10, 10, 25, 11, 12, 13, 14, 15, 16, 17, 18]
    res = simulate(InContextPolicy(capacity=64, topk=0), [(prompt, response)], V, eos_ids=[0])
    assert res.coverage == 1.0 and res.total_tokens == len(response)
    assert res.active_stats()["max"] == 21                       # EOS + the 20 prompt ids, never grows


def test_full_vocab_covers_everything():
    docs = [([1, 2], [3, 4, 49, 0]), ([], [7] * 11)]
    res = simulate(FullVocab(), docs, V, eos_ids=[0], block=3)
    assert res.coverage == 1.0 and res.tokens.tolist() == [4, 11]
    assert res.active_stats() == {"mean": V, "p50": V, "p90": V, "max": V}


def test_static_tiny_capacity_by_hand():
    # capacity 3 with EOS 0 forced in: {0, 5, 6}. Response 5 7 6 0 9 5 -> 5, 6, 0, 5 covered = 4 / 6.
    policy = StaticFrequencyPolicy([5, 6, 7, 8], capacity=3)
    res = simulate(policy, [([7, 8], [5, 7, 6, 0, 9, 5])], V, eos_ids=[0], block=2)
    assert res.covered.tolist() == [4] and res.coverage == pytest.approx(4 / 6)
    assert res.active.tolist() == [3] * 4                      # blocks: [5] [7 6] [0 9] [5]


def test_in_context_lru_by_hand():
    # Slots: EOS pinned + 2 context slots. Prefill [1, 2] -> {0, 1, 2}. Token 3 missed, evicts 2 -> {0, 1, 3}.
    # Block [1, 2]: 1 hit, 2 missed; 2 evicts 3 (1 was just used) -> {0, 1, 2}. Block [3]: missed. 1 of 4.
    res = simulate(InContextPolicy(capacity=3, topk=0, eviction="lru"), [([1, 2], [3, 1, 2, 3])], V,
                   eos_ids=[0], block=2)
    assert res.covered.tolist() == [1]
    # Grow-only: the set stays {0, 1, 2}, so 1 and 2 are covered.
    res = simulate(InContextPolicy(capacity=3, topk=0, eviction=None), [([1, 2], [3, 1, 2, 3])], V,
                   eos_ids=[0], block=2)
    assert res.covered.tolist() == [2]


def test_the_set_is_read_before_the_block_is_committed():
    # A new id is not covered in the block that introduces it, but is covered in later blocks.
    res = simulate(InContextPolicy(capacity=8, topk=0), [([], [4, 4, 9, 9, 9])], V, block=2)
    assert res.covered.tolist() == [3]                          # [4] | [4 9] | [9 9]: 4, 9, 9


def _reference(policy, docs, block):
    """One document at a time, Python sets from `policy.active()`: per-doc covered and the sizes seen."""
    covered, sizes = [], []
    for prompt, response in docs:
        if not response:
            covered.append(0)
            continue
        policy.setup(1, V, [0], "cpu")
        p = torch.tensor([prompt or [0]])
        policy.on_prefill(p, torch.tensor([[bool(prompt)] * p.shape[1]]))
        hits, cuts = 0, [0, 1] + list(range(1 + block, len(response), block)) + [len(response)]
        for a, b in zip(cuts, cuts[1:]):
            if a >= b:
                continue
            ids, n = policy.active()
            live = set(ids[0, : int(n[0])].tolist())
            hits += sum(t in live for t in response[a:b])
            sizes.append(int(n[0]))
            width = block if a else 1                                   # token 0 is committed alone
            chunk = torch.tensor([response[a:b] + [0] * (width - (b - a))])
            mask = torch.arange(chunk.shape[1]) < (b - a)
            policy.on_commit(chunk, mask.unsqueeze(0))
        covered.append(hits)
    return covered, sorted(sizes)


@pytest.mark.parametrize("make", [
    lambda: InContextPolicy(capacity=12, topk=0, eviction="lru"),
    lambda: InContextPolicy(capacity=12, topk=0, eviction="fifo", core_ids=[3, 4]),
    lambda: InContextPolicy(capacity=12, topk=0, eviction=None),
    lambda: StaticFrequencyPolicy(list(range(V - 1, 0, -3)), capacity=9),
    FullVocab,
], ids=["lru", "fifo+core", "grow-only", "static", "full"])
def test_batched_equals_one_at_a_time(make):
    rng = random.Random(0)
    docs = [([rng.randrange(1, V) for _ in range(rng.randrange(0, 30))],
             [rng.randrange(1, 25) for _ in range(rng.randrange(0, 40))]) for _ in range(23)]
    ref_cov, ref_sizes = _reference(make(), docs, block=4)
    for batch_size in (1, 5, 64):
        res = simulate(make(), docs, V, eos_ids=[0], block=4, batch_size=batch_size)
        assert res.covered.tolist() == ref_cov, batch_size
        assert res.tokens.tolist() == [len(r) for _, r in docs]
        assert sorted(res.active.tolist()) == ref_sizes


def test_merge_summary_and_errors():
    a = simulate(FullVocab(), [([1], [2, 3])], V)
    b = simulate(StaticFrequencyPolicy([2], capacity=1), [([1], [2, 3, 4])], V)
    merged = CoverageResult.merge([a, b])
    assert merged.docs == 2 and merged.coverage == pytest.approx(3 / 5)
    assert set(merged.summary()) >= {"coverage", "active_mean", "active_p90", "active_max", "tokens"}
    with pytest.raises(ValueError, match="outside"):
        simulate(FullVocab(), [([1], [V])], V)
    with pytest.raises(ValueError, match="block"):
        simulate(FullVocab(), [([1], [2])], V, block=0)


# ------------------------------------------------------------------------------------------------- CLI
WORDS = "the a cat dog sat on mat ran far and then slept quickly".split()


@pytest.fixture
def tiny(tmp_path):
    """A word-level HF tokenizer ([UNK] 0, words 1..13, </s> 14) and small jsonl corpora written with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = random.Random(1)

    def corpus(name, n):
        rows = [{"prompt": " ".join(rng.choices(WORDS, k=8)),
                 "response": " ".join(rng.choices(WORDS[:9], k=20))} for _ in range(n)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)
    return {"tok": str(tmp_path / "tokenizer.json"), "eval": corpus("eval.jsonl", 12),
            "fit": corpus("fit.jsonl", 30), "dir": tmp_path}


def test_cli_end_to_end(tiny, capsys):
    out = tiny["dir"] / "res.json"
    rc = main(["coverage", tiny["eval"], tiny["fit"], "--tokenizer", tiny["tok"],
               "--policy", "incontext,static", "--policy", "full", "--capacity", "4", "8",
               "--fit", tiny["fit"], "--allow-fit-overlap",
               "--core", "2", "--json", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "WARNING" in captured.err and "inflated" in captured.err
    head = captured.out.splitlines()[0].split()
    assert head[:3] == ["policy", "capacity", "dataset"] and "coverage" in head
    data = json.loads(out.read_text())
    assert data["oracle_free"] and data["vocab_size"] == len(WORDS) + 2
    assert data["eos_ids"] == [len(WORDS) + 1]
    rows = data["results"]
    assert len(rows) == (2 + 2 + 1) * 3                                  # 2 corpora + "all"
    full = [r for r in rows if r["policy"] == "full"]
    assert all(r["coverage"] == 1.0 and r["capacity"] == len(WORDS) + 2 for r in full)
    assert all(r["active_max"] <= r["capacity"] for r in rows)


def _err(capsys, argv):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_cli_errors(tiny, capsys):
    base = ["coverage", tiny["eval"], "--tokenizer", tiny["tok"], "--no-progress"]
    cases = [
        (["coverage", tiny["eval"], "--tokenizer", str(tiny["dir"] / "missing.json")], "tokenizer not found"),
        (["coverage", "no_such_dataset", "--tokenizer", tiny["tok"]], "unknown dataset"),
        (["coverage", str(tiny["dir"] / "nope.jsonl"), "--tokenizer", tiny["tok"]], "not found"),
        (base + ["--policy", "static"], "--fit"),
        (base + ["--policy", "magic"], "unknown policy"),
        (base + ["--policy", "static", "--fit", tiny["eval"]], "--allow-fit-overlap"),
        (base + ["--capacity", "0"], "positive"),
        (base + ["--json", str(tiny["dir"] / "no/such/dir/out.json")], "folder does not exist"),
    ]
    too_big = save_token_map([3, 1, 500], tiny["dir"] / "map.json")
    cases.append((base + ["--policy", "static", "--token-map", str(too_big)], "another tokenizer"))
    empty = tiny["dir"] / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "the cat", "response": ""}) + "\n")
    cases.append((["coverage", str(empty), "--tokenizer", tiny["tok"]], "empty corpus"))
    for argv, message in cases:
        rc, err = _err(capsys, argv)
        last = err.strip().splitlines()[-1]
        assert rc == 2 and message in last and last.startswith("microspec coverage: error:"), (argv, err)


def test_cli_token_map(tiny, capsys):
    path = save_token_map(list(range(1, 10)), tiny["dir"] / "map.pt")
    for capacity, expect in (("10", 1.0), ("9", None)):                # + EOS; responses use ids 1..9 only
        assert main(["coverage", tiny["eval"], "--tokenizer", tiny["tok"], "--policy", "static",
                     "--token-map", str(path), "--capacity", capacity, "--no-progress"]) == 0
        row = capsys.readouterr().out.splitlines()[2].split()
        assert row[:2] == ["static", capacity]
        assert float(row[5]) == 1.0 if expect else float(row[5]) < 1.0   # capacity 9: EOS pushes id 9 out


# ------------------------------------------------------------------------------------- spread, plot, modes
def test_summary_spread_and_delta_by_hand():
    # Two documents, static set {0, 5, 6}: doc A covers 2 of 4, doc B 3 of 3. Static sets never change.
    res = simulate(StaticFrequencyPolicy([5, 6], capacity=3), [([1], [5, 9, 6, 9]), ([2], [5, 5, 6])], V,
                   eos_ids=[0], block=2)
    s = res.summary()
    assert res.doc_coverage().tolist() == [0.5, 1.0]
    assert s["doc_coverage_mean"] == 0.75 and s["doc_coverage_p10"] == pytest.approx(0.55)
    assert s["doc_coverage_p90"] == pytest.approx(0.95)
    assert s["doc_coverage_std"] == pytest.approx(0.3536, abs=1e-4)
    assert s["delta_mean"] == 0 and s["active_std"] == 0
    # In-context, one document: slots change only when a new id arrives (prefill set {0, 1} fills nothing
    # between blocks): [4] | [4 9] | [9 2] -> after [4]: +4 (1 slot), after [4 9]: +9 (1 slot).
    res = simulate(InContextPolicy(capacity=8, topk=0), [([1], [4, 4, 9, 9, 2])], V, eos_ids=[0], block=2)
    assert res.active.tolist() == [2, 3, 4] and res.delta.tolist() == [1, 1]


def test_plot_and_same_size_comparison(tmp_path):
    from microspec.lab.coverage import compare_at_same_size, plot_coverage
    rows = [{"policy": p, "dataset": d, "capacity": c, "active_mean": a, "coverage": v}
            for d in ("x", "all") for p, c, a, v in (("static", 8, 8, 0.5), ("static", 32, 32, 0.7),
                                                    ("incontext", 8, 16, 0.65), ("incontext", 4, 4, 0.3),
                                                    ("full", 50, 50, 1.0))]
    plot_coverage(rows, tmp_path / "p.png", "title")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    compare_at_same_size(rows)
    same = [r["static_at_same_size"] for r in rows[:5]]
    # 16 rows lies halfway between 8 and 32 in log size: 0.6. Sizes 4 and 50 are outside the static range.
    assert same[0] is None and same[1] is None and same[2] == pytest.approx(0.6)
    assert same[3] is None and same[4] is None


def make_text_policy(capacity):
    """A `--custom` factory for the CLI test."""
    return InContextPolicy(capacity=capacity, topk=0, eviction="fifo")


def test_cli_core_variants_plot_sample_custom(tiny, capsys):
    out, png = tiny["dir"] / "r.json", tiny["dir"] / "r.png"
    argv = ["coverage", tiny["eval"], "--tokenizer", tiny["tok"], "--policy", "incontext,custom",
            "--custom", "test_coverage:make_text_policy", "--capacity", "4", "8", "--core", "0", "2", "4",
            "--fit", tiny["fit"], "--sample", "5", "--seed", "1", "--json", str(out), "--plot", str(png),
            "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    labels = [(r["policy"], r["capacity"]) for r in data["results"]]
    # core 4 cannot leave room at capacity 4: skipped; the custom policy is named after its class.
    assert labels == [("incontext", 4), ("incontext+core2", 4), ("incontext", 8), ("incontext+core2", 8),
                      ("incontext+core4", 8), ("InContextPolicy", 4), ("InContextPolicy", 8)]
    subset = data["subsets"][tiny["eval"]]
    assert data["mode"] == "text-only" and subset == sorted(subset)
    assert len(data["subsets"][tiny["eval"]]) == 5 and all(r["docs"] == 5 for r in data["results"])
    assert {"doc_coverage_p10", "doc_coverage_p90", "active_p10", "delta_mean"} <= set(data["results"][0])
    assert png.read_bytes()[:4] == b"\x89PNG"
    for extra, message in ((["--topk", "3"], "--topk needs --model"),
                           (["--policy", "custom", "--custom", "microspec.policies:InContextPolicy"],
                            "run with --model"),
                           (["--policy", "custom"], "--custom MODULE:CALLABLE")):
        rc = main(["coverage", tiny["eval"], "--tokenizer", tiny["tok"], "--no-progress", *extra])
        assert rc == 2 and message in capsys.readouterr().err


def test_cli_model_based_on_a_tiny_hf_model(tiny, capsys):
    """--model DIR: the model's tokenizer, teacher-forced traces, a hidden-state policy; the CLI's number
    equals a direct `simulate` with the same traces."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from microspec.lab.data import load_pairs
    from microspec.lab.model_coverage import encode_pairs, teacher_forced_traces
    raw = Tokenizer.from_file(tiny["tok"])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         eos_token_id=len(WORDS) + 1, attn_implementation="sdpa")).eval()
    model.save_pretrained(tiny["dir"] / "m")
    hf_tok.save_pretrained(tiny["dir"] / "m")
    out = tiny["dir"] / "m.json"
    assert main(["coverage", tiny["eval"], "--model", str(tiny["dir"] / "m"),
                 "--policy", "incontext,full,custom",
                 "--custom", "test_model_coverage:HiddenArgmaxPolicy", "--capacity", "6", "--topk", "2",
                 "--block", "3", "--max-tokens", "12", "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "model-based" and data["target_topk"] == [2] and data["chat_template"] is False
    rows = {r["policy"]: r for r in data["results"]}
    assert set(rows) == {"incontext-top2", "full", "HiddenArgmaxPolicy"} and rows["full"]["coverage"] == 1.0
    assert all(r["tokens"] == 12 * 12 for r in data["results"])
    docs = encode_pairs(hf_tok, load_pairs(tiny["eval"]), chat_template=False, max_response_tokens=12)
    traces = teacher_forced_traces(model, docs, topk=2)
    direct = simulate(InContextPolicy(6, topk=2), docs, len(WORDS) + 2, [len(WORDS) + 1], block=3,
                      traces=traces)
    assert rows["incontext-top2"]["coverage"] == direct.coverage
    text_only = simulate(InContextPolicy(6, topk=0), docs, len(WORDS) + 2, [len(WORDS) + 1], block=3)
    assert direct.coverage != text_only.coverage                   # the target's top-k did reach the policy
