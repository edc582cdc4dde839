"""Model-based coverage: the harness hands a policy exactly what `SpecDecoder` hands it.

The exact check: a `Recorder` policy wraps an inner policy, forwards every hook to it and logs the hook
arguments and the inner set before each call, while exposing the *full* vocabulary to the decoder. With
the drafter = the target (float64), every draft is then the target's argmax and is accepted, so the decoder
commits full K + 1 blocks, which is what the harness assumes. Teacher-forcing the harness on the decoder's
own greedy output must then reproduce the decoder's log call by call: same committed ids and masks, same
top-k ids where the mask is set, the same hidden states (to float tolerance: other batch shapes) and the
same inner sets. A hand-computed case with a Markov "LM" (known top-k, one-hot hidden states) pins the
alignment independently.
"""
import pytest
import torch

from microspec import SpecDecoder
from microspec.lab.coverage import TargetTrace, batch_order, simulate
from microspec.lab.model_coverage import encode_pairs, sample_indices, teacher_forced_traces
from microspec.policies import InContextPolicy, VocabPolicy
from tiny_models import EOS, PAD, VOCAB, MarkovLM, tiny_model


class HiddenArgmaxPolicy(VocabPolicy):
    """Toy learned policy: special ids + argmax of the hidden state's first `vocab` coordinates, and (to
    make the set depend on history) the previous such id."""

    wants_hidden = True

    def _allocate(self, rows, vocab_size, device):
        self._prev = torch.zeros(rows, dtype=torch.long, device=device)

    def _reset(self):
        s = self.special_ids
        self._write_prefix(s)
        self._prev.fill_(int(s[0]))

    def _route(self, hidden):
        pick = hidden[:, : self.vocab_size].argmax(1)                                   # [B]
        ids = torch.full_like(self.active_ids, -1)
        s = self.special_ids.numel()
        ids[:, :s] = self.special_ids
        ids[:, s] = pick
        ids[:, s + 1] = self._prev
        dup = (ids[:, s + 1] == ids[:, s]) | torch.isin(ids[:, s + 1], self.special_ids)
        ids[:, s + 1] = torch.where(dup, -1, ids[:, s + 1])
        ids[:, s] = torch.where(torch.isin(pick, self.special_ids), -1, pick)
        ids = torch.sort(torch.where(ids < 0, 1 << 40, ids), 1).values
        self.active_ids.copy_(torch.where(ids == 1 << 40, -1, ids))
        self.n_active.copy_((self.active_ids >= 0).sum(1))
        self._prev.copy_(pick)

    def on_prefill(self, prompt_ids, prompt_mask, target_topk=None, hidden=None):
        self._route(hidden)

    def on_commit(self, committed_ids, committed_mask, target_topk=None, hidden=None):
        self._route(hidden)


class Recorder(VocabPolicy):
    """Logs (hook, inner set, args) for every hook call; exposes the whole vocabulary as its own set."""

    def __init__(self, inner: VocabPolicy, vocab: int):
        super().__init__(vocab)
        self.inner, self.log = inner, []
        self.target_topk, self.wants_hidden = inner.target_topk, inner.wants_hidden

    def setup(self, batch_size, vocab_size, special_ids, device):
        super().setup(batch_size, vocab_size, special_ids, device)
        self.inner.setup(batch_size, vocab_size, special_ids, device)

    def _reset(self):
        self._write_prefix(torch.arange(self.vocab_size))

    def _record(self, kind, ids, mask, topk, hidden):
        a, n = self.inner.active()
        self.log.append((kind, a.clone(), n.clone(), ids.clone(), mask.clone(),
                         None if topk is None else topk.clone(), None if hidden is None else hidden.clone()))

    def on_prefill(self, prompt_ids, prompt_mask, target_topk=None, hidden=None):
        self._record("prefill", prompt_ids, prompt_mask, target_topk, hidden)
        self.inner.on_prefill(prompt_ids, prompt_mask, target_topk, hidden=hidden)

    def on_commit(self, committed_ids, committed_mask, target_topk=None, hidden=None):
        self._record("commit", committed_ids, committed_mask, target_topk, hidden)
        self.inner.on_commit(committed_ids, committed_mask, target_topk, hidden=hidden)


def _same_set(a, na, b, nb, r_a, r_b):
    ra, rb = (0 if a.shape[0] == 1 else r_a), (0 if b.shape[0] == 1 else r_b)
    return a[ra, : int(na[ra])].tolist() == b[rb, : int(nb[rb])].tolist()


@pytest.mark.parametrize("make_inner", [
    lambda: InContextPolicy(capacity=24, topk=3, eviction="lru", core_ids=[7, 9]),
    lambda: HiddenArgmaxPolicy(capacity=4),
], ids=["incontext-top3", "hidden"])
def test_harness_feeds_hooks_exactly_as_the_decoder(make_inner):
    model, K = tiny_model("llama", seed=0), 3
    g = torch.Generator().manual_seed(5)
    lengths = [6, 3, 9, 4]
    L = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), L), generator=g)
    mask = torch.arange(L) >= (L - torch.tensor(lengths)).unsqueeze(1)                  # left padding
    eos = int(model.generate(ids[:1], do_sample=False, max_new_tokens=9)[0, -4])        # stops row 0 early
    dec_rec = Recorder(make_inner(), VOCAB)
    out = SpecDecoder(model, model, dec_rec, K).generate(ids.masked_fill(~mask, PAD),
                                                         attention_mask=mask.long(), max_new_tokens=14,
                                                         eos_token_id=[eos, EOS])
    commits = [c for c in dec_rec.log if c[0] == "commit"]
    n_new = sum(c[4].sum(1) for c in commits)                                           # [B]
    assert out.stats.acceptance_rate == 1.0, out.stats                                  # full blocks
    docs = [(ids[r, L - lengths[r]:].tolist(), out.sequences[r, L: L + int(n_new[r])].tolist())
            for r in range(4)]
    assert min(len(d[1]) for d in docs) < 14 and max(len(d[1]) for d in docs) == 14  # EOS and budget cuts

    sim_rec = Recorder(make_inner(), VOCAB)
    traces = teacher_forced_traces(model, docs, topk=sim_rec.target_topk, hidden=sim_rec.wants_hidden)
    simulate(sim_rec, docs, VOCAB, eos_ids=[eos, EOS], block=K + 1, batch_size=4, traces=traces)
    order = batch_order(docs)                       # harness row j holds document order[j]
    assert len(sim_rec.log) == len(dec_rec.log)
    for step, (d, s) in enumerate(zip(dec_rec.log, sim_rec.log)):
        assert d[0] == s[0], step
        for j, r in enumerate(order):
            m = d[4][r]
            assert torch.equal(m, s[4][j][: m.numel()]) and not s[4][j][m.numel():].any(), (step, r)
            assert d[3][r][m].tolist() == s[3][j][: m.numel()][m].tolist(), (step, r)
            if d[5] is not None:
                assert d[5][r][m].tolist() == s[5][j][: m.numel()][m].tolist(), (step, r)
            else:
                assert s[5] is None
            if d[6] is not None:
                torch.testing.assert_close(d[6][r].float(), s[6][j], rtol=1e-5, atol=1e-5)
            assert _same_set(d[1], d[2], s[1], s[2], r, j), (step, r)


def _markov(V=8):
    """Next token of t is (t + 1) % V with p 0.6, (t + 2) % V with 0.3, (t + 3) % V with 0.1."""
    probs = torch.zeros(V, V, dtype=torch.float64)
    for t in range(V):
        for step, p in ((1, 0.6), (2, 0.3), (3, 0.1)):
            probs[t, (t + step) % V] = p
    return MarkovLM(probs)


def test_hand_computed_markov_case():
    model = _markov()
    docs = [([1, 2], [3, 4, 5, 7])]
    traces = teacher_forced_traces(model, docs, topk=2, hidden=True)
    assert traces[0].topk.tolist() == [[2, 3], [3, 4], [4, 5], [5, 6], [6, 7], [0, 1]]
    assert traces[0].hidden.argmax(1).tolist() == [1, 2, 3, 4, 5, 7]          # one-hot current token
    # In-context top-1, EOS 0, block 2. Prefill: prompt {1, 2} + top-1 at prompt positions {2, 3}.
    #   token 3 (alone): covered; commit adds 3 (no top-k on token 0).
    #   block [4, 5]: set {0, 1, 2, 3} -> none; commit adds 4, 5 and top-1 at their positions (4, 5).
    #   block [7]: set {0, 1, 2, 3, 4, 5} -> not covered.  1 of 4.
    res = simulate(InContextPolicy(capacity=16, topk=1), docs, 8, eos_ids=[0], block=2, traces=traces)
    assert res.covered.tolist() == [1] and res.active.tolist() == [4, 4, 6]
    assert res.delta.tolist() == [0, 2]
    # Hidden policy: set = EOS + argmax(hidden) + previous pick. Hidden at the newest committed input:
    #   prefill/token 0: position of 2 -> {0, 2}; 3 missed. Block [4, 5] is read with {0, 2} (the token-0
    #   commit re-sends the prefill state): missed. Its commit: newest committed input is 4 -> {0, 2, 4}.
    #   block [7]: missed. Then with response [3, 2, 3, 2, 3]: prefill {0, 2}; 3 missed; [2, 3]: 2 hit;
    #   commit's newest input = 2 -> {0, 2}; [2, 3]: 2 hit. 2 of 5.
    traces2 = teacher_forced_traces(model, [([1, 2], [3, 2, 3, 2, 3])], topk=0, hidden=True)
    res = simulate(HiddenArgmaxPolicy(capacity=4), docs + [([1, 2], [3, 2, 3, 2, 3])], 8, eos_ids=[0],
                   block=2, traces=traces + traces2)
    assert res.covered.tolist() == [0, 2]


def test_text_only_ignores_model_inputs_and_errors():
    model = _markov()
    docs = [([1, 2], [3, 4, 5, 7])]
    with pytest.raises(ValueError, match="top-2"):
        simulate(InContextPolicy(8, topk=2), docs, 8, eos_ids=[0],
                 traces=teacher_forced_traces(model, docs, topk=1))
    with pytest.raises(ValueError, match="hidden"):
        simulate(HiddenArgmaxPolicy(4), docs, 8, eos_ids=[0],
                 traces=teacher_forced_traces(model, docs, topk=0))
    with pytest.raises(ValueError, match="empty prompt"):
        teacher_forced_traces(model, [([], [3])])
    with pytest.raises(ValueError, match="positions"):
        simulate(InContextPolicy(8, topk=1), docs, 8,
                 traces=[TargetTrace(torch.zeros(3, 1, dtype=torch.long))])
    # Batching of the forwards does not change the traces.
    many = [([1 + i % 5] * (1 + i % 3), [(i + j) % 8 for j in range(2 + i)]) for i in range(7)]
    a = teacher_forced_traces(tiny_model("llama", vocab_size=8), many, topk=3, hidden=True, batch_tokens=1)
    b = teacher_forced_traces(tiny_model("llama", vocab_size=8), many, topk=3, hidden=True, chunk=3)
    for x, y in zip(a, b):
        assert torch.equal(x.topk, y.topk) and torch.allclose(x.hidden, y.hidden, atol=1e-10)


def test_trace_cache(tmp_path, monkeypatch):
    import microspec.lab.model_coverage as mc
    model, docs = _markov(), [([1, 2], [3, 4, 5, 7]), ([6], [7, 0])]
    first = mc.cached_traces(tmp_path, model, "markov", "float64", docs, k=1, hidden=False, vocab_size=8)
    assert first[0].topk.shape == (6, 3) and first[0].hidden is not None        # a miss keeps top-3 + hidden
    monkeypatch.setattr(mc, "teacher_forced_traces", lambda *a, **k: pytest.fail("cache missed"))
    again = mc.cached_traces(tmp_path, model, "markov", "float64", docs, k=3, hidden=True, vocab_size=8)
    assert all(torch.equal(a.topk, b.topk) and torch.equal(a.hidden, b.hidden) for a, b in zip(first, again))
    with pytest.raises(pytest.fail.Exception):                                    # other ids: a miss
        mc.cached_traces(tmp_path, model, "markov", "float64", docs[:1], k=1, hidden=False, vocab_size=8)


def test_encode_pairs_and_sampling():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "a": 2, "b": 3, "c": 4}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<s>")
    assert encode_pairs(tok, [("a b c", "c b a")], chat_template=False) == [([2, 3, 4], [4, 3, 2])]
    assert encode_pairs(tok, [("", "c")], chat_template=False) == [([1], [4])]
    assert encode_pairs(tok, [("a b c", "c b a")], chat_template=False, max_prompt_tokens=1,
                        max_response_tokens=2) == [([4], [4, 3])]
    assert sample_indices(10, None) == list(range(10)) and sample_indices(3, 5) == [0, 1, 2]
    picked = sample_indices(100, 7, seed=1)
    assert picked == sample_indices(100, 7, seed=1) and len(set(picked)) == 7 and picked == sorted(picked)
