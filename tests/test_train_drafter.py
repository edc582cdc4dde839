"""`microspec train-drafter` and its parts on CPU: the chunked distillation loss against plain autograd, the
loss positions, the data pipeline, training lowering the loss, exact resume, and the CLI smoke run."""
import json

import pytest
import torch

from microspec.cli import main
from microspec.drafting.eagle import EagleDrafter
from microspec.lab import train_drafter as td
from microspec.prompts import encode_prompt
from microspec.lab.drafter_data import (Sequence, collate, load_sequences, random_prompt_rows,
                                        save_sequences, self_distill, split_prompts, teacher_forced,
                                        token_batches, truncate)
from microspec.lab.eagle_loss import distill_ce, head_argmax
from microspec.models import tiny_random_model
from microspec.paths import shared_data_dir


# ---------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_distillation_loss_equals_autograd(softcap):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    tgt = torch.randn(7, 5, dtype=torch.float64, generator=g)
    W = torch.randn(11, 5, dtype=torch.float64, generator=g)

    def cap(x):
        return torch.tanh(x / softcap) * softcap if softcap else x

    ref = -(cap(tgt @ W.T).softmax(-1) * cap(pred @ W.T).log_softmax(-1)).sum()
    ce, agree = distill_ce(pred, tgt, W, softcap, chunk=3)                          # 3 chunks: 3 + 3 + 1 rows
    assert torch.allclose(ce, ref)
    assert int(agree) == int((cap(pred @ W.T).argmax(-1) == cap(tgt @ W.T).argmax(-1)).sum())
    (g_ref,), (g_ours,) = torch.autograd.grad(ref, pred), torch.autograd.grad(ce, pred)
    assert torch.allclose(g_ours, g_ref)
    assert torch.equal(head_argmax(tgt, W, softcap, chunk=2), cap(tgt @ W.T).argmax(-1))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_compiled_distillation_loss_equals_eager(softcap):
    """The compiled chunk arithmetic (`compile=`; "aot_eager" traces the same graph Inductor would get, with
    a dynamic row count) equals the eager one, on float64 and on the bf16 head a GPU trains with."""
    g = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 1e-5)):
        pred = torch.randn(9, 8, dtype=torch.float32, generator=g).requires_grad_()
        tgt = torch.randn(9, 8, dtype=torch.float32, generator=g)
        W = torch.randn(40, 8, generator=g).to(dtype)
        (ce, agree), (ce_c, agree_c) = (distill_ce(pred, tgt, W, softcap, chunk=4, compile=c)
                                        for c in (False, "aot_eager"))            # chunks of 4, 4 and 1 rows
        assert torch.allclose(ce_c, ce, rtol=tol) and int(agree_c) == int(agree)
        (g_eager,), (g_comp,) = (torch.autograd.grad(x, pred) for x in (ce, ce_c))
        assert torch.allclose(g_comp, g_eager, rtol=tol, atol=tol)


def test_loss_positions_are_the_drafting_outputs():
    where = td.loss_positions(torch.tensor([3, 1]), torch.tensor([7, 4]), T=9)      # [B, T-1]
    assert where[0].nonzero().flatten().tolist() == [2, 3, 4, 5]                   # prompt_len-1 .. len-2
    assert where[1].nonzero().flatten().tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- data
class FakeTokenizer:
    eos_token_id, pad_token_id = 2, 0

    def __init__(self, template=True):
        self.chat_template = "chatml" if template else None

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + ord(c) % 97 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return f"<u>{messages[0]['content']}</u><a>"


def test_data_pipeline(tmp_path):
    chat, plain = FakeTokenizer(), FakeTokenizer(template=False)
    assert encode_prompt(chat, "hi") == chat.encode("<u>hi</u><a>", add_special_tokens=False)
    assert encode_prompt(plain, "hi ") == plain.encode("hi\n\n")                  # BOS, then a blank line
    rows = [encode_prompt(chat, p) for p in ("a", "bb")]
    seqs = teacher_forced(rows, [["xy", "z"], ["w"]], chat, eos_id=2)
    assert [s.ids[s.prompt_len:] for s in seqs] == [chat.encode(t, False) + [2] for t in ("xy", "z", "w")]
    seqs += [Sequence(list(range(5, 5 + n)), 2, "greedy") for n in (3, 9, 20, 4, 4)]
    cut = truncate(seqs, max_len=8)
    assert all(len(s.ids) <= 8 and len(s.ids) - s.prompt_len >= 2 for s in cut)
    batches = token_batches(cut, max_tokens=24, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(cut)))
    assert all(len(b) * max(len(cut[i].ids) for i in b) <= 24 or len(b) == 1 for b in batches)
    ids, mask, plen, lens = collate(cut, batches[0], pad_id=0)
    assert ids.shape == mask.shape and mask.sum(1).tolist() == lens.tolist()
    save_sequences(tmp_path / "d.safetensors", train=cut, heldout=cut[:2])
    back = load_sequences(tmp_path / "d.safetensors")
    assert back["train"] == cut and back["heldout"] == cut[:2]
    a, b = split_prompts([f"p{i}" for i in range(50)], 0.1, seed=3)
    assert (a, b) == split_prompts([f"p{i}" for i in reversed(range(50))], 0.1, seed=3) and len(b) == 5


def test_self_distillation_answers_follow_their_prompts():
    model = tiny_random_model(vocab_size=64, seed=1)
    rows = random_prompt_rows(5, 64, seed=2)
    eos = {int(model.generate(torch.tensor([rows[0]]), max_new_tokens=1, do_sample=False)[0, -1])}
    seqs = self_distill(model, rows, modes=("greedy", 1.0), max_new=6, batch_size=2, eos_ids=eos,
                        progress=False)
    assert len(seqs) == 10 and {s.source for s in seqs} == {"greedy", "t1.0"}
    for s in seqs:
        assert s.ids[:s.prompt_len] in rows and 1 <= len(s.ids) - s.prompt_len <= 6
        assert not eos & set(s.ids[s.prompt_len:-1])                                # cut after the first EOS
    first = next(s for s in seqs if s.ids[:s.prompt_len] == rows[0] and s.source == "greedy")
    assert first.ids[first.prompt_len:] == [*eos]


@pytest.mark.skipif(shared_data_dir(required=False) is None, reason="needs ../shared/data")
def test_training_prompts_exclude_evaluation_sets():
    from microspec.lab.data import same_text_key
    from microspec.lab.drafter_data import evaluation_prompts, training_pairs
    pairs = training_pairs()
    banned = evaluation_prompts()
    assert len(pairs) > 8000 and not any(same_text_key(p) in banned for p in pairs)
    assert max(len(a) for a in pairs.values()) == 6                                # six AlpacaEval models


# ---------------------------------------------------------------------------------------------- training
def tiny_setup(n=24, seed=0):
    torch.manual_seed(seed)
    target = tiny_random_model(vocab_size=96, seed=seed).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    seqs = [Sequence(torch.randint(3, 96, (int(L),), generator=g).tolist(), 3, "greedy")
            for L in torch.randint(8, 16, (n,), generator=g)]
    return target, seqs


def test_training_lowers_the_loss(tmp_path):
    target, seqs = tiny_setup()
    drafter = EagleDrafter.from_target(target, dtype=torch.float32, seed=0)
    cfg = td.TrainConfig(steps=40, batch_tokens=96, lr=1e-2, warmup=4, noise=0.0, eval_every=40,
                         save_every=40, log_every=5)
    before = td.evaluate(td.Objective(target, drafter, cfg), seqs, 96, 0)
    result = td.train(target, drafter, seqs, seqs[:6], cfg, tmp_path, progress=False)
    after = td.evaluate(td.Objective(target, drafter, cfg), seqs, 96, 0)
    assert after["loss"] < 0.75 * before["loss"] and after["top1"] > before["top1"] + 0.1
    rows = [json.loads(line) for line in open(tmp_path / td.LOG_FILE)]
    assert rows[-1]["eval"]["loss"] == result["final_eval"]["loss"] and result["steps"] == 40
    loaded = EagleDrafter.from_pretrained(tmp_path, target)                       # the bf16 checkpoint
    assert loaded.fc.weight.dtype == torch.float32
    assert torch.allclose(loaded.fc.weight, drafter.fc.weight.to(torch.bfloat16).float())


def test_resume_continues_exactly(tmp_path, monkeypatch):
    target, seqs = tiny_setup(n=16)
    cfg = td.TrainConfig(steps=8, batch_tokens=64, lr=3e-3, warmup=2, eval_every=100, save_every=4,
                         log_every=2)
    straight = EagleDrafter.from_target(target, dtype=torch.float32, seed=0)
    td.train(target, straight, seqs, seqs[:2], cfg, tmp_path / "a", progress=False)

    calls = {"n": 0}
    real_call = td.Objective.__call__

    def crash_after_4(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(td.Objective, "__call__", crash_after_4)
    broken = EagleDrafter.from_target(target, dtype=torch.float32, seed=0)
    with pytest.raises(KeyboardInterrupt):
        td.train(target, broken, seqs, seqs[:2], cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(td.Objective, "__call__", real_call)
    resumed = EagleDrafter.from_target(target, dtype=torch.float32, seed=7)     # weights come from the state
    td.train(target, resumed, seqs, seqs[:2], cfg, tmp_path / "b", resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_smoke_run_and_resume(tmp_path, capsys):
    out, state = tmp_path / "run", tmp_path / "state"
    args = ["train-drafter", "--model", "tiny", "--smoke", "--out", str(out), "--state-dir", str(state),
            "--device", "cpu", "--no-progress", "--random-prompts", "10", "--max-new", "6", "--steps", "6",
            "--eval-every", "3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "train: " in err and "tokens" in err and "held-out" in err
    assert {"eagle_drafter.json", "eagle_drafter.safetensors", "log.jsonl"} <= {p.name for p in out.iterdir()}
    assert {p.name for p in state.iterdir()} == {"dataset.safetensors", td.STATE_FILE}    # the large files
    config = json.loads((out / "eagle_drafter.json").read_text())
    assert config["training"]["steps"] == 6 and config["training"]["arguments"]["model"] == "tiny"
    EagleDrafter.from_pretrained(out, tiny_random_model(seed=0))                    # the same tiny target
    assert main([*args[:-4], "--steps", "8", "--resume", "--compile-loss", "aot_eager"]) == 0   # fused loss
    assert json.loads((out / "eagle_drafter.json").read_text())["training"]["steps"] == 8


def test_cli_init_starts_from_a_trained_head(tmp_path, capsys):
    from safetensors.torch import load_file
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["train-drafter", "--model", "tiny", "--smoke", "--device", "cpu", "--no-progress",
            "--random-prompts", "10", "--max-new", "6", "--eval-every", "3"]
    assert main([*base, "--out", str(first), "--steps", "3"]) == 0
    assert main([*base, "--out", str(second), "--steps", "1", "--lr", "0", "--init", str(first)]) == 0
    a, b = (load_file(str(d / "eagle_drafter.safetensors")) for d in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)        # lr 0: the head it began
    config = json.loads((second / "eagle_drafter.json").read_text())
    assert config["training"]["arguments"]["init"] == str(first)
    bad = [(["--init", str(first), "--resume"], "--init and --resume"),
           (["--init", str(tmp_path / "missing")], "no EAGLE drafter checkpoint"),
           (["--init", str(first), "--seed", "1"], "trained for another model")]       # another tiny target
    for extra, message in bad:
        capsys.readouterr()
        assert main([*base, "--out", str(tmp_path / "bad"), *extra]) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1
