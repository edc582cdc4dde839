"""Training an `EagleDrafter` on a target's own features (EAGLE-1 recipe), online: the frozen target runs on
every batch in no_grad and its final hidden states are the features; nothing is dumped to disk.

Features. f = the target's decoder output `last_hidden_state` (`target.base_model(...)`, through
`microspec.lab.teacher.Teacher`), which is after the final norm: the input of the LM head. (Checked in
transformers 5.24: `LlamaModel.forward` and `Gemma3TextModel.forward` apply `self.norm` before returning, and
`output_hidden_states=True` gives the same tensor as hidden_states[-1], since `capture_outputs` ties the last
entry to `last_hidden_state`.)

One step on a batch of right-padded sequences x [B, T] (answer positions marked by the prompt lengths):

    f            = target(x)                                  [B, T, D], no grad
    tokens, f_in = x[:, 1:], f[:, :-1] (+ EAGLE-1 noise)      drafter position t = (x_{t+1}, f_t)
    g            = drafter.forward_train(tokens, f_in)        [B, T-1, D], g[:, t] ~ f_{t+1}
    loss         = SmoothL1(g, f[:, 1:]) + 0.1 * CE(head(f[:, 1:]) || head(g))   at positions t with
                   prompt_len - 1 <= t <= len - 2 (the outputs used while drafting an answer)

EAGLE-1 noise: uniform (U - 0.5) * 0.2 * 512 / len on the input features (`eagle/train/main.py`
AddUniformNoise, std 0.2, len = the sequence's length). AdamW (0.9, 0.95), gradient *value* clipping 0.5 (as
EAGLE), linear warm-up then cosine decay to `min_lr_frac`, bf16 autocast on CUDA, fixed seeds.

Held-out evaluation (`evaluate`) reports the loss terms, top-1 agreement (drafter argmax == target argmax at
the same position) and `top1_step{k}`: the agreement when every input feature is the drafter's own prediction
from k-1 steps of feeding back (position t gets g_{t-1} of the previous pass) — a teacher-forced proxy of
how drafts after the first hold up.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..drafting.eagle import EagleDrafter
from .drafter_data import Sequence, collate, summary, token_batches
from .eagle_loss import distill_ce, feature_loss, head_argmax
from .teacher import Teacher

STATE_FILE = "trainer_state.pt"
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    steps: int | None = None          # total optimizer steps (default: epochs x batches per epoch)
    epochs: float = 4.0
    batch_tokens: int = 16384         # padded tokens per batch (rows x longest)
    lr: float = 5e-4
    warmup: int = 100
    min_lr_frac: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    clip_value: float = 0.5
    v_weight: float = 1.0
    p_weight: float = 0.1
    noise: float = 0.2                # EAGLE-1 uniform noise std (0: off)
    train_minutes: float | None = None  # stop (and finish the schedule) after this long; None: by steps only
    eval_every: int = 500
    save_every: int = 1000
    log_every: int = 20
    eval_steps: int = 3               # chained feature-feedback passes in the held-out evaluation
    seed: int = 0
    save_dtype: str = "bfloat16"
    compile_loss: bool | str = False  # fuse the distillation loss's chunk arithmetic (True: Inductor)


def loss_positions(prompt_lens: Tensor, lengths: Tensor, T: int) -> Tensor:
    """bool [B, T-1]: drafter positions t with prompt_len - 1 <= t <= len - 2."""
    t = torch.arange(T - 1, device=lengths.device)
    return (t >= prompt_lens.unsqueeze(1) - 1) & (t <= lengths.unsqueeze(1) - 2)


class Objective:
    """Runs the target and the drafter on one batch and computes the EAGLE-1 loss and its statistics."""

    def __init__(self, target: nn.Module, drafter: EagleDrafter, cfg: TrainConfig):
        self.target, self.drafter, self.cfg = target, drafter, cfg
        self.teacher = Teacher(target)               # the model's own decoder: last_hidden_state, no grad
        self.weight = drafter.head_weight.detach()
        self.softcap = getattr(target.config, "final_logit_softcapping", None) or None
        self.cuda = drafter.fc.weight.is_cuda

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda)

    def inputs(self, ids, mask, plen, lens, noise: bool):
        feats = self.teacher.run(ids, mask).hidden.to(self.drafter.fc.weight.dtype)              # [B, T, D]
        f_in, f_tgt = feats[:, :-1], feats[:, 1:]
        if noise and self.cfg.noise > 0:
            scale = self.cfg.noise * 512.0 / lens.to(f_in.dtype)                              # per sequence
            f_in = f_in + (torch.rand_like(f_in) - 0.5) * scale.view(-1, 1, 1)
        return ids[:, 1:], f_in, f_tgt, mask[:, 1:], loss_positions(plen, lens, ids.shape[1])

    def __call__(self, ids, mask, plen, lens, noise: bool = True) -> tuple[Tensor, dict]:
        tokens, f_in, f_tgt, attn, where = self.inputs(ids, mask, plen, lens, noise)
        with self.autocast():
            g = self.drafter.forward_train(tokens, f_in, attn)
        pred, tgt = g[where], f_tgt[where]                                                        # [N, D]
        n = max(int(where.sum()), 1)
        ce, agree = distill_ce(pred, tgt, self.weight, self.softcap, compile=self.cfg.compile_loss)
        vloss, ploss = feature_loss(pred, tgt) / n, ce / n
        loss = self.cfg.v_weight * vloss + self.cfg.p_weight * ploss
        stats = {"vloss": float(vloss.detach()), "ploss": float(ploss.detach()), "agree": int(agree), "n": n}
        return loss, stats

    @torch.no_grad()
    def chain(self, ids, mask, plen, lens) -> list[tuple[int, int]]:
        """(agreements, positions) for each of `eval_steps` feature-feedback passes (see module docstring)."""
        tokens, f_in, f_tgt, attn, where = self.inputs(ids, mask, plen, lens, noise=False)
        want = head_argmax(f_tgt[where], self.weight, self.softcap)
        out, feats = [], f_in
        for _ in range(self.cfg.eval_steps):
            with self.autocast():
                g = self.drafter.forward_train(tokens, feats, attn).to(f_in.dtype)
            got = head_argmax(g[where], self.weight, self.softcap)
            out.append((int((got == want).sum()), int(where.sum())))
            feats = torch.cat([f_in[:, :1], g[:, :-1]], dim=1)
        return out


@torch.no_grad()
def evaluate(objective: Objective, seqs: list[Sequence], batch_tokens: int, pad_id: int) -> dict:
    """Held-out loss terms, top-1 agreement and top1_step{k} over `seqs` (no noise)."""
    if not seqs:
        return {}
    device = objective.drafter.fc.weight.device
    was_training = objective.drafter.training
    objective.drafter.eval()
    tot = {"vloss": 0.0, "ploss": 0.0, "agree": 0, "n": 0}
    chain = [[0, 0] for _ in range(objective.cfg.eval_steps)]
    for idx in token_batches(seqs, batch_tokens, seed=0):
        batch = collate(seqs, idx, pad_id, device)
        _, st = objective(*batch, noise=False)
        for k in ("vloss", "ploss"):
            tot[k] += st[k] * st["n"]
        tot["agree"] += st["agree"]
        tot["n"] += st["n"]
        for k, (a, n) in enumerate(objective.chain(*batch)):
            chain[k][0] += a
            chain[k][1] += n
    objective.drafter.train(was_training)
    n = max(tot["n"], 1)
    out = {"vloss": tot["vloss"] / n, "ploss": tot["ploss"] / n, "top1": tot["agree"] / n,
           "positions": tot["n"]}
    out["loss"] = objective.cfg.v_weight * out["vloss"] + objective.cfg.p_weight * out["ploss"]
    out.update({f"top1_step{k + 1}": a / max(m, 1) for k, (a, m) in enumerate(chain)})
    return out


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to lr * min_lr_frac as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    cos = cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warm * cos


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def train(target: nn.Module, drafter: EagleDrafter, train_seqs: list[Sequence], heldout: list[Sequence],
          cfg: TrainConfig, out_dir: str | Path, pad_id: int = 0, resume: bool = False, progress: bool = True,
          info: dict | None = None, state_dir: str | Path | None = None) -> dict:
    """Train `drafter` (fp32 master weights) on `train_seqs`; checkpoints, log.jsonl and the final drafter
    go to `out_dir`; trainer_state.pt (fp32 weights, optimizer, step, data position, RNG: what `resume`
    continues from) to `state_dir` (default `out_dir`). Without `progress` a log line is printed every
    10 x log_every steps. Returns the run's summary (also under "training" in the drafter's JSON config)."""
    from tqdm.auto import tqdm
    out = Path(out_dir)
    state_file = Path(state_dir or out) / STATE_FILE
    out.mkdir(parents=True, exist_ok=True)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    device = drafter.fc.weight.device
    target.requires_grad_(False)
    drafter.train()
    objective = Objective(target, drafter, cfg)
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    per_epoch = len(token_batches(train_seqs, cfg.batch_tokens, cfg.seed))
    total = cfg.steps or max(1, round(cfg.epochs * per_epoch))
    st = {"step": 0, "epoch": 0, "pos": 0, "elapsed": 0.0, "tokens": 0}
    torch.manual_seed(cfg.seed)
    if resume and state_file.is_file():
        saved = torch.load(state_file, map_location=device, weights_only=False)
        drafter.load_state_dict(saved["drafter"])
        opt.load_state_dict(saved["optimizer"])
        st = saved["progress"]
        _set_rng_state(saved["rng"], device)
    elif not resume:
        (out / LOG_FILE).unlink(missing_ok=True)
    log = open(out / LOG_FILE, "a")
    budget = cfg.train_minutes * 60 if cfg.train_minutes else None
    t_start, elapsed0 = time.time(), st["elapsed"]
    window = {"loss": 0.0, "vloss": 0.0, "ploss": 0.0, "agree": 0, "n": 0, "steps": 0}
    last_eval: dict = {}

    def progress_frac() -> float:
        by_time = (elapsed0 + time.time() - t_start) / budget if budget else 0.0
        return max(st["step"] / total, by_time)

    def save() -> None:
        st["elapsed"] = elapsed0 + time.time() - t_start
        run = {"steps": st["step"], "epochs": st["step"] / per_epoch, "tokens_seen": st["tokens"],
               "minutes": round(st["elapsed"] / 60, 2), "final_eval": last_eval, "config": asdict(cfg),
               "data": {"train": summary(train_seqs), "heldout": summary(heldout)}, **(info or {})}
        drafter.save_pretrained(out, extra={"training": run}, dtype=getattr(torch, cfg.save_dtype))
        torch.save({"drafter": drafter.state_dict(), "optimizer": opt.state_dict(), "progress": dict(st),
                    "rng": _rng_state(device), "config": asdict(cfg)}, state_file)

    bar = tqdm(total=total, initial=st["step"], desc="train-drafter", unit="step", disable=not progress)
    done = st["step"] >= total
    while not done:
        batches = token_batches(train_seqs, cfg.batch_tokens, cfg.seed + st["epoch"])
        while st["pos"] < len(batches) and not done:
            batch = collate(train_seqs, batches[st["pos"]], pad_id, device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, st["step"], progress_frac())
            loss, stats = objective(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(drafter.parameters(), cfg.clip_value)
            opt.step()
            st["step"], st["pos"] = st["step"] + 1, st["pos"] + 1
            st["tokens"] += int(batch[3].sum())
            window["loss"] += float(loss.detach())
            for k in ("vloss", "ploss", "agree", "n"):
                window[k] += stats[k]
            window["steps"] += 1
            bar.update(1)
            if st["step"] % cfg.log_every == 0 or st["step"] == total:
                s = window["steps"]
                row = {"step": st["step"], "lr": opt.param_groups[0]["lr"], "loss": window["loss"] / s,
                       "vloss": window["vloss"] / s, "ploss": window["ploss"] / s,
                       "top1": window["agree"] / max(window["n"], 1), "tokens": st["tokens"],
                       "seconds": round(elapsed0 + time.time() - t_start, 1)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", top1=f"{row['top1']:.3f}")
                if not progress and st["step"] % (10 * cfg.log_every) == 0:
                    print(f"step {st['step']}/{total} " + " ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                                   if k != "step"), flush=True)
                window = dict.fromkeys(window, 0)
                window["loss"] = window["vloss"] = window["ploss"] = 0.0
            done = st["step"] >= total or progress_frac() >= 1.0
            if st["step"] % cfg.eval_every == 0 or done:
                last_eval = evaluate(objective, heldout, cfg.batch_tokens, pad_id)
                log.write(json.dumps({"step": st["step"], "eval": last_eval}) + "\n")
                log.flush()
                shown = ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items())
                bar.write(f"step {st['step']}: held-out {shown}")
            if st["step"] % cfg.save_every == 0 or done:
                save()
        if st["pos"] >= len(batches):
            st["epoch"], st["pos"] = st["epoch"] + 1, 0
    bar.close()
    log.close()
    if not last_eval:
        last_eval = evaluate(objective, heldout, cfg.batch_tokens, pad_id)
        save()
    plot_log(out / LOG_FILE, out / "loss.png")
    return json.loads((out / "eagle_drafter.json").read_text())["training"]


def plot_log(log_file: Path, png: Path) -> Path | None:
    """Training loss and top-1 (and held-out points) from log.jsonl to a PNG; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in open(log_file) if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r and r["eval"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    a.plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], "o-", label="held-out")
    a.set_xlabel("step"), a.set_ylabel("loss"), a.set_yscale("log"), a.legend()
    b.plot([r["step"] for r in train_rows], [r["top1"] for r in train_rows], label="train top-1")
    for k in range(1, 4):
        key = f"top1_step{k}"
        if evals and key in evals[0]["eval"]:
            b.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], "o-", label=f"held-out {key}")
    b.set_xlabel("step"), b.set_ylabel("agreement with the target's argmax"), b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
