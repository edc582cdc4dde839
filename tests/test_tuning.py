"""Size tuning: the cost model against the H100 reference numbers, latency tables, the utility by hand, the
TPE search (seeded determinism, the constraint, the obviously best capacity of a constructed case), the
Pareto frontier, and `tune` end to end on a tiny corpus."""
import json

import pytest

from microspec.cli import main as cli_main
from microspec.lab.tuning import ARCHS, CostModel, StepModel, Trial, load_latency_table, pareto_front, tune


def main(argv):
    return cli_main(["tune", *argv])


# A constructed case: coverage rises with capacity, with a knee at 1024.
COVERAGE = {128: 0.50, 256: 0.70, 512: 0.85, 1024: 0.95, 2048: 0.96, 4096: 0.97}


def _suggest(trial):
    return {"capacity": trial.suggest_categorical("capacity", list(COVERAGE))}


def _evaluate(params):
    c = params["capacity"]
    return {"coverage": COVERAGE[c], "active_mean": float(c), "delta_mean": 0.0}


def _brute_force(cost, step, min_cov):
    def util(c):
        return step.expected_tokens(COVERAGE[c]) / step.block_us(cost.head_us(c), 0.0)
    feasible = [c for c in COVERAGE if COVERAGE[c] >= min_cov]
    return max(feasible, key=util) if feasible else None


def test_cost_model_matches_the_h100_reference_points():
    cost = CostModel()
    assert cost.fixed_us == pytest.approx(11.06, abs=0.01)
    assert cost.head_us(2048) == pytest.approx(15.6, abs=1.2)         # measured 15.6 us
    assert cost.head_us(4096) == pytest.approx(23.3, abs=1.2)         # measured 23.3 us
    assert cost.head_us(128256) == pytest.approx(386.5, rel=0.08)     # measured dense 386.5 us
    assert cost.update_us(100, "incontext") == pytest.approx(100 * 4096 * 2 * 2 / 3e12 * 1e6)
    # One Llama-3-8B decoder layer is 218.1M parameters; EAGLE adds a 2d x d fc.
    assert ARCHS["llama3-8b"].layer_params() == 218_103_808
    step = StepModel(K=2, layers_us=10.0, verify_us=100.0, acceptance=1.0)
    assert step.expected_tokens(0.5) == pytest.approx(1 + 0.5 + 0.25)
    assert step.block_us(head_us=5.0, update_us=3.0) == pytest.approx(100 + 2 * 15 + 3)


def test_latency_table_formats_and_interpolation(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"format": "microspec-latency-table/1", "device": "H100", "hidden_size": 4096,
                                "head_us": {"1024": 10.0, "2048": 16.0, "4096": 24.0}, "dense_us": 386.5,
                                "update_us": {"incontext": 4.0}, "draft_layers_us": 150.0}))
    table = load_latency_table(path)
    assert table.head_us(2048) == 16.0 and table.head_us(3072) == pytest.approx(20.0)
    assert table.head_us(100) == 10.0                                  # below the table: its floor
    with pytest.raises(ValueError, match="beyond"):
        table.head_us(5000)
    assert table.update_us(0, "incontext") == 4.0 and table.update_us(0, "static") == 0.0
    assert table.dense_us == 386.5 and "H100" in table.source
    assert StepModel.for_arch(ARCHS["llama3-8b"], table).layers_us == 150.0
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"512": 8.0, "1024": 10.0}))
    assert load_latency_table(bare).head_us(768) == pytest.approx(9.0)
    for text, message in (("{", "not JSON"), ("{}", "no usable"), ('{"head_us": {"64": -1}}', "no usable")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_latency_table(bad)
    with pytest.raises(FileNotFoundError):
        load_latency_table(tmp_path / "missing.json")


@pytest.mark.parametrize("min_cov", [0.0, 0.9, 0.955, 0.965])
def test_tune_finds_the_best_feasible_capacity(min_cov):
    cost, step = CostModel(), StepModel(K=4, layers_us=20.0, acceptance=1.0)
    result = tune(_evaluate, _suggest, cost, step, min_coverage=min_cov, n_trials=30, seed=0)
    expected = _brute_force(cost, step, min_cov)
    assert result.best is not None and result.best.params["capacity"] == expected
    assert result.best.coverage >= min_cov
    assert all(t.feasible == (t.coverage >= min_cov) for t in result.trials)
    if min_cov == 0.9:
        assert expected == 1024                                          # the knee: the obvious choice


def test_tune_is_deterministic_and_reports_infeasibility():
    cost, step = CostModel(), StepModel(K=3, layers_us=50.0)

    def suggest(trial):
        return {"capacity": trial.suggest_int("capacity", 128, 4096, log=True)}

    def evaluate(p):
        return {"coverage": min(1.0, p["capacity"] / 5000), "active_mean": p["capacity"], "delta_mean": 1.0}

    a = tune(evaluate, suggest, cost, step, 0.3, n_trials=15, seed=3)
    b = tune(evaluate, suggest, cost, step, 0.3, n_trials=15, seed=3)
    c = tune(evaluate, suggest, cost, step, 0.3, n_trials=15, seed=4)
    seq = [t.params["capacity"] for t in a.trials]
    assert seq == [t.params["capacity"] for t in b.trials] and seq != [t.params["capacity"] for t in c.trials]
    assert a.best == b.best
    none = tune(evaluate, suggest, cost, step, 0.99, n_trials=5, seed=0)   # capacity <= 4096: coverage < 0.82
    assert none.best is None and not any(t.feasible for t in none.trials)


def test_pareto_front_by_hand():
    def trial(n, cov, head):
        return Trial(n, {}, cov, 0, 0, head, 0.0, 0, 0, 0, True)
    ts = [trial(0, 0.5, 10), trial(1, 0.6, 12), trial(2, 0.55, 15), trial(3, 0.9, 30), trial(4, 0.9, 31)]
    assert [t.number for t in pareto_front(ts, K=5)] == [0, 1, 3]


def test_cli_tune_end_to_end(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tok.json"))
    import random
    rng = random.Random(0)

    def corpus(name):        # Zipf-like words: a frequency list helps, with diminishing returns
        rows = [{"prompt": " ".join(rng.choices(words, k=5)),
                 "response": " ".join(rng.choices(words, weights=[1 / (i + 1) for i in range(60)], k=30))}
                for _ in range(20)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    ev, fit = corpus("eval.jsonl"), corpus("fit.jsonl")
    argv = [ev, "--tokenizer", str(tmp_path / "tok.json"), "--policy", "static", "--fit", fit,
            "--capacity-range", "2", "62", "--trials", "12", "--min-coverage", "0.6", "--no-progress",
            "--json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")]
    assert main(argv) == 0, capsys.readouterr().err
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["best"]["coverage"] >= 0.6 and len(out["trials"]) == 12 and out["pareto"]
    assert out["latency_source"].startswith("cost model") and out["mode"] == "text-only"
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "t2.json"
    assert main(argv[:-4] + ["--json", str(again)]) == 0
    assert json.loads(again.read_text())["trials"] == out["trials"]          # seeded: the same search
    lat = tmp_path / "lat.json"
    lat.write_text(json.dumps({"head_us": {"2": 5.0, "32": 6.0}}))
    assert main(argv[:-4] + ["--latency-table", str(lat)]) == 0
    assert "capped at the table's largest entry, 32" in capsys.readouterr().err
    for extra, message in ((["--latency-table", str(tmp_path / "none.json")], "not found"),
                           (["--topk-choices", "3"], "need --model"),
                           (["--min-coverage", "2"], "min-coverage")):
        assert main(argv[:-4] + extra) == 2
        assert message in capsys.readouterr().err
