"""EagleDrafter (architecture, checkpoints, the EAGLE layout) and EagleProposer (chain drafts equal a direct,
cache-free recomputation of the EAGLE loop), on tiny random float64 models."""
import inspect
import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from microspec.drafting.base import Commit, DraftRequest
from microspec.drafting.eagle import CONFIG_FILE, WEIGHTS_FILE, EagleDrafter
from microspec.drafting.eagle_proposer import EagleProposer
from microspec.models.base import apply_logit_transform, visible_slots
from microspec.models.hf import RowKVCache
from microspec.sampling import SamplingConfig, draft_sample
from microspec.sparse_head import SparseLMHead
from microspec.testing import no_host_sync
from tiny_models import VOCAB, tiny_model


def tiny_gemma3(seed=0, hidden_size=32):
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                           sliding_window=16,
                           attn_implementation="sdpa", pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).double().eval()


TARGETS = {"llama": lambda seed=0: tiny_model("llama", seed=seed), "gemma3": tiny_gemma3}


class OneLayerBackend:
    """A minimal `ModelBackend` (models/base.py contract) over a one-layer HF model: a `RowKVCache` and the
    reference visibility rule, nothing else (the proposer is also run through `microspec.models.hf.CausalLM`
    below; this twin pins the contract itself)."""

    def __init__(self, lm):
        self.model, self.config = lm, lm.config
        self.head = lm.get_output_embeddings()
        self.num_layers, self.hidden_size = 1, self.head.weight.shape[1]
        self.vocab_size = self.head.weight.shape[0]
        self.input_vocab = lm.get_input_embeddings().weight.shape[0]

    def allocate(self, batch_size, max_len):
        self.cache, self.max_len = RowKVCache(1, batch_size, max_len), max_len

    def forward(self, tokens, positions, slots=None, tree_mask=None, tree_start=None, embeds=None,
                eager=False):
        slots = positions if slots is None else slots
        self.cache.write_positions = slots
        mask = visible_slots(positions, slots, tree_mask, self.max_len, None, tree_start).unsqueeze(1)
        if embeds is None:
            embeds = self.embed(tokens)
        decoder = self.model.base_model
        kwarg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        out = decoder(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=True,
                      **{kwarg: self.cache})
        return out.last_hidden_state

    def logits(self, hidden, head=None):
        return apply_logit_transform(self.config, (head or self.head)(hidden))

    def embed(self, tokens):
        return self.model.get_input_embeddings()(tokens.clamp(max=self.input_vocab - 1))

    def snapshot(self):
        return [t.clone() for t in (*self.cache.keys, *self.cache.values)]

    def restore(self, state):
        self.cache.keys, self.cache.values = [t.clone() for t in state[:1]], [t.clone() for t in state[1:]]


def drafter_for(family, seed=0):
    """A target and a drafter whose layer matters: weights at ~1.5/sqrt(fan_in) (a fresh init's o_proj is so
    small that attention would barely move the drafts, hiding position and cache bugs)."""
    target = TARGETS[family]()
    drafter = EagleDrafter.from_target(target, seed=seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    return target, drafter


def out_of(drafter, ids, feats):
    with torch.no_grad():
        return drafter.forward_train(ids, feats)


# ---------------------------------------------------------------------------------------------- drafter
@pytest.mark.parametrize("family", sorted(TARGETS))
def test_architecture_shapes_and_ownership(family):
    target, drafter = drafter_for(family)
    D = target.config.hidden_size
    ids, feats = torch.randint(0, VOCAB, (2, 7)), torch.randn(2, 7, D, dtype=torch.float64)
    assert out_of(drafter, ids, feats).shape == (2, 7, D)
    assert drafter.fc.in_features == 2 * D and drafter.fc.bias is None
    assert isinstance(drafter.decoder.layers[0].input_layernorm, torch.nn.Identity)
    assert isinstance(drafter.decoder.norm, torch.nn.Identity) and len(drafter.decoder.layers) == 1
    target_ptrs = {p.data_ptr() for p in target.parameters()}
    assert not target_ptrs & {p.data_ptr() for p in drafter.parameters()}          # owns only fc + layer
    assert all(k.startswith(("fc.", "decoder.layers.0.")) for k in drafter.state_dict())
    lm = drafter.as_causal_lm()                                                      # a view, nothing copied
    assert lm.get_output_embeddings() is target.get_output_embeddings()
    assert lm.get_input_embeddings() is target.get_input_embeddings()
    assert lm.base_model.layers[0] is drafter.decoder.layers[0] and drafter.decoder.embed_tokens is None
    if family == "gemma3":
        assert drafter.decoder.config.layer_types == ["full_attention"]
        e = drafter.embed(ids)                                                       # the scaled embedding
        assert torch.allclose(e, target.get_input_embeddings().weight[ids] * D ** 0.5)


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_save_load_round_trip(family, tmp_path):
    target, drafter = drafter_for(family)
    with torch.no_grad():
        drafter.fc.weight.add_(0.01)
    drafter.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    loaded = EagleDrafter.from_pretrained(tmp_path, target)
    ids, feats = torch.randint(0, VOCAB, (2, 5)), torch.randn(2, 5, 32, dtype=torch.float64)
    assert torch.equal(out_of(loaded, ids, feats), out_of(drafter, ids, feats))
    assert loaded.fc.weight.dtype == torch.float64
    assert EagleDrafter.from_pretrained(tmp_path, target.float()).fc.weight.dtype == torch.float32


@pytest.mark.parametrize("other, why", [
    (lambda: tiny_model("llama", hidden_size=48), "hidden_size"),
    (lambda: tiny_model("llama", vocab_size=VOCAB + 7), "vocab_size"),
    (lambda: tiny_model("llama", seed=5), "embedding probe"),
    (lambda: tiny_gemma3(), "model_type"),
])
def test_a_head_for_another_model_is_refused(tmp_path, other, why):
    target, drafter = drafter_for("llama")
    drafter.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained for another model") as err:
        EagleDrafter.from_pretrained(tmp_path, other())
    assert why in str(err.value) and "\n" not in str(err.value)


def test_export_import_eagle_layout(tmp_path):
    target, drafter = drafter_for("llama")
    drafter.export_eagle(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    layer = ({f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"}
             | {f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
             | {"layers.0.post_attention_layernorm.weight"})
    assert names == {"fc.weight", "embed_tokens.weight"} | layer                       # EAGLE's names exactly
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 1
    assert config["bias"] is False and config["hidden_size"] == 32 and config["vocab_size"] == VOCAB
    back = EagleDrafter.import_eagle(tmp_path, target)
    ids, feats = torch.randint(0, VOCAB, (2, 5)), torch.randn(2, 5, 32, dtype=torch.float64)
    assert torch.equal(out_of(back, ids, feats), out_of(drafter, ids, feats))
    with pytest.raises(ValueError, match="trained for another model"):               # embed_tokens differs
        EagleDrafter.import_eagle(tmp_path, tiny_model("llama", seed=5))
    with pytest.raises(ValueError, match="hidden_size"):
        EagleDrafter.import_eagle(tmp_path, tiny_model("llama", hidden_size=48))
    with pytest.raises(ValueError, match="Llama layers"):
        drafter_for("gemma3")[1].export_eagle(tmp_path / "g")


# ---------------------------------------------------------------------------------------------- proposer
def reference_drafts(target, drafter, seq, K, cfg, noise, ids, n_active):
    """EAGLE's chain recomputed from scratch: target features over the committed sequence, pairs
    (f_p, x_{p+1}), then K times: full causal forward, head over the active set, append (g_last, draft)."""
    with torch.no_grad():
        f = target.base_model(input_ids=seq[None]).last_hidden_state[0]             # [n, D]
        toks, feats, out = seq[1:], f[:-1], []
        for i in range(K):
            g = drafter.forward_train(toks[None], feats[None])[0, -1]                 # [D]
            logits = drafter.logits(g)[ids].masked_fill(torch.arange(len(ids)) >= n_active, float("-inf"))
            slot, _, _ = draft_sample(logits[None], cfg, None if noise is None else noise[i][None])
            out.append(int(ids[slot]))
            toks, feats = torch.cat([toks, ids[slot]]), torch.cat([feats, g[None]])
    return out


def drive(family, do_sample, n_active=None, chunk=4, steps=4, K=3, first_hidden=True, check_sync=False,
          backend="contract", plan=None):
    """A fake engine: ragged prompts prefilled in chunks, forced acceptance of a random number of drafts
    (the proposer's job does not depend on why tokens were committed), the target's hidden states from a
    cache-free forward; the proposer's drafts are compared with `reference_drafts` at every step.
    backend: "contract" (`OneLayerBackend` above) or "hf" (`EagleDrafter.make_proposer`: hf.CausalLM)."""
    target, drafter = drafter_for(family, seed=3)
    head = SparseLMHead(drafter.head_weight, mode="dense" if n_active is None else "gather")
    if backend == "hf":
        proposer = drafter.make_proposer(head, K)
    else:
        proposer = EagleProposer(drafter, OneLayerBackend(drafter.as_causal_lm()), K, head=head)
    if plan is not None:
        K = proposer.plan(plan)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 6, 11])
    B, L, S = 3, int(lengths.max()), int(lengths.max()) + steps * (K + 1) + K + 2
    C = VOCAB if n_active is None else 40
    ids = torch.arange(VOCAB) if n_active is None else torch.randperm(VOCAB, generator=g)[:C]
    active_ids, n_act = ids[None].clone(), torch.tensor([C if n_active is None else n_active])
    if n_active is not None:
        active_ids[0, n_active:] = -1
    proposer.head.bind(active_ids, n_act)
    tokens = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        tokens[b, :lengths[b]] = torch.randint(3, VOCAB, (int(lengths[b]),), generator=g)
    proposer.allocate(B, S)
    snapshots = []

    def hidden_over(b, upto):                                                   # target features [upto, D]
        with torch.no_grad():
            return target.base_model(input_ids=tokens[b:b + 1, :upto]).last_hidden_state[0]

    prompt_h = torch.zeros(B, L, 32, dtype=torch.float64)
    for b in range(B):
        prompt_h[b, :lengths[b]] = hidden_over(b, int(lengths[b]))
    for c0 in range(0, L, chunk):
        c1 = min(L, c0 + chunk)
        proposer.prefill(tokens[:, c0:c1], torch.arange(c0, c1).expand(B, -1), prompt_h[:, c0:c1])
    snapshots.append(proposer.snapshot())
    first = torch.randint(3, VOCAB, (B,), generator=g)
    tokens[torch.arange(B), lengths] = first
    last_h = prompt_h[torch.arange(B), lengths - 1][:, None]
    ones = torch.ones(B, dtype=torch.long)
    first_commit = Commit(lengths.clone(), first[:, None], ones, ones[:, None].bool(),
                          torch.zeros(B, 1).long(), last_h if first_hidden else None)
    proposer.observe(first_commit)
    n = lengths + 1
    cfg = SamplingConfig(do_sample=do_sample, temperature=0.9)
    for _ in range(steps):
        noise = -torch.rand(B, K, C, dtype=torch.float64, generator=g).log() if do_sample else None
        request = DraftRequest(tokens, n, active_ids, n_act, cfg, noise)
        if check_sync:
            with no_host_sync():
                drafts = proposer.propose(request)
        else:
            drafts = proposer.propose(request)
        for b in range(B):
            row_noise = None if noise is None else noise[b]
            ref = reference_drafts(target, drafter, tokens[b, :n[b]], K, cfg, row_noise, ids,
                                   C if n_active is None else n_active)
            assert drafts.tokens[b].tolist() == ref, f"row {b} at n={int(n[b])}"
        assert drafts.valid.all() and drafts.parents.tolist() == [list(range(K))] * B
        assert drafts.depth.tolist() == [list(range(1, K + 1))] * B and drafts.q.shape == (B, K, C)
        snapshots.append(drafts.tokens.clone())
        # verification block [x_{n-1}, d_1..d_K]: target features from a cache-free forward; accept j drafts
        accept = torch.randint(0, K + 1, (B,), generator=g)
        block_h, commit_tokens = torch.zeros(B, K + 1, 32, dtype=torch.float64), torch.zeros(B, K + 1).long()
        for b in range(B):
            nb, j = int(n[b]), int(accept[b])
            tokens[b, nb:nb + K] = drafts.tokens[b]
            h = hidden_over(b, nb + K)[nb - 1:]                                       # [K+1, D]
            block_h[b] = h
            bonus = int(drafter.logits(h[j]).argmax())
            commit_tokens[b, :j + 1] = torch.tensor(drafts.tokens[b, :j].tolist() + [bonus])
            tokens[b, nb:nb + j + 1] = commit_tokens[b, :j + 1]
        n_commit = accept + 1
        mask = torch.arange(K + 1) < n_commit[:, None]
        commit = Commit(n.clone(), commit_tokens, n_commit, mask, torch.arange(K + 1).expand(B, -1), block_h)
        if check_sync:
            with no_host_sync():
                proposer.observe(commit)
        else:
            proposer.observe(commit)
        n = n + n_commit
    assert not proposer.nan_seen.any()
    # the engine's reuse of one prefill: allocate, restore the snapshot, first commit -> first drafts again
    if not do_sample:
        proposer.allocate(B, S)
        proposer.restore(snapshots[0])
        proposer.observe(first_commit)
        again = proposer.propose(DraftRequest(tokens, lengths + 1, active_ids, n_act, cfg, None))
        assert torch.equal(again.tokens, snapshots[1])


@pytest.mark.parametrize("family", sorted(TARGETS))
@pytest.mark.parametrize("do_sample", [False, True])
def test_proposer_equals_cache_free_eagle_loop(family, do_sample):
    drive(family, do_sample)


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_proposer_through_the_hf_backend(family):
    drive(family, do_sample=False, backend="hf", steps=3)


def test_proposer_restricted_active_set_and_first_commit_without_hidden():
    drive("llama", do_sample=False, n_active=31, chunk=5, first_hidden=False, plan=2)


def test_make_proposer_backends_and_bad_trees():
    """The norm-free EAGLE layer runs on either backend (the lean one skips Identity norms); a tree must be
    a TreeSpec."""
    from microspec.drafting.tree import TreeSpec
    _, drafter = drafter_for("llama")
    assert drafter.make_proposer(None, 3, backend="lean").backend.name == "lean"
    assert drafter.make_proposer(None, 3, backend="hf").backend.name == "hf"
    assert drafter.make_proposer(None, 3, tree=TreeSpec(2, 2, 4)).num_nodes == 3
    with pytest.raises(TypeError, match="TreeSpec"):
        drafter.make_proposer(None, 3, tree=object())


def test_proposer_step_never_syncs():
    drive("llama", do_sample=True, steps=2, check_sync=True)
