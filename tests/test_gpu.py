"""GPU-only checks (skipped without CUDA): kernels at real sizes, the CUDA-graph-captured step against the
eager step, no host sync under `torch.cuda.set_sync_debug_mode("error")`, and greedy exactness on GPU.
Run on the device machine with `python -m pytest -q tests/test_gpu.py`."""
import pytest
import torch
from tiny_models import EOS, PAD, VOCAB, noisy_copy, tiny_model

from microspec import SpecDecoder
from microspec.testing import cuda_sync_errors
from microspec.kernels import (
    delta_gather_ref,
    delta_gather_triton,
    packed_logits_triton,
    sparse_logits_triton,
)
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA required")]


@pytest.mark.parametrize("B,D,C,V", [(1, 4096, 3072, 128256), (8, 2048, 4096, 128256), (4, 896, 1024, 151936),
                                     (1, 4096, 32768, 128256), (3, 1536, 999, 32000)])
@pytest.mark.parametrize("per_row", [False, True])
def test_kernels_at_real_sizes(B, D, C, V, per_row):
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(V, D, generator=g, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(B, 1, D, generator=g, device="cuda", dtype=torch.bfloat16)
    R = B if per_row else 1
    ids = torch.stack([torch.randperm(V, generator=g, device="cuda")[:C] for _ in range(R)])
    n = torch.randint(C // 2, C + 1, (R,), generator=g, device="cuda")
    ids = ids.masked_fill(torch.arange(C, device="cuda") >= n[:, None], -1)
    ids[0, 0], n[0] = V - 1, max(int(n[0]), 1)          # the last id of the vocabulary is readable
    rows = torch.zeros(R, C, D, dtype=torch.bfloat16, device="cuda")
    have = torch.full_like(ids, -1)
    delta_gather_triton(weight, ids, have, rows)
    rows_ref, have_ref = torch.zeros_like(rows), torch.full_like(ids, -1)
    delta_gather_ref(weight, ids, have_ref, rows_ref)
    assert torch.equal(rows, rows_ref) and torch.equal(have, have_ref)
    oracle = hidden.double() @ weight[ids.clamp(min=0)].double().transpose(-1, -2)      # [B, 1, C]
    base = (hidden @ weight[ids.clamp(min=0)].transpose(-1, -2)).double()
    live = (torch.arange(C, device="cuda") < n[:, None]).unsqueeze(1).expand_as(oracle)
    for out in (sparse_logits_triton(hidden, weight, ids, n), packed_logits_triton(hidden, rows, n)):
        err = (out.double() - oracle)[live].abs().max()
        err_base = (base - oracle)[live].abs().max()
        assert err <= 2 * err_base + 1e-6, f"{err=:.3e} {err_base=:.3e}"
        assert torch.isneginf(out[~live]).all()


def _decoders(policy_factory, dtype=torch.float32, family="llama"):
    target = tiny_model(family).to("cuda", dtype)
    drafter = noisy_copy(tiny_model(family), 0.3).to("cuda", dtype)
    return [SpecDecoder(target, drafter, policy_factory(), 4, cuda_graph=graph)
            for graph in (True, False)], target


@pytest.mark.parametrize("policy", [FullVocab, lambda: InContextPolicy(40),
                                    lambda: StaticFrequencyPolicy(torch.arange(VOCAB), 30)],
                         ids=["full", "incontext", "static"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_captured_step_equals_eager_step(policy, do_sample):
    (graphed, eager), target = _decoders(policy)
    ids = torch.randint(3, VOCAB, (4, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    outs = []
    for dec in (graphed, eager):
        gen = torch.Generator(device="cuda").manual_seed(1)
        outs.append(dec.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=do_sample,
                                 temperature=0.9, eos_token_id=[EOS], pad_token_id=PAD, generator=gen))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert outs[0].stats == outs[1].stats


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_greedy_exact_on_gpu_float32(family):
    """fp32 on GPU: equal to HF greedy, or a mismatch only at a near-tie of the target's top-2 logits."""
    (graphed, _), target = _decoders(lambda: InContextPolicy(40), family=family)
    ids = torch.randint(3, VOCAB, (4, 9), device="cuda")
    expected = target.generate(ids, do_sample=False, max_new_tokens=37, eos_token_id=[EOS], pad_token_id=PAD)
    out = graphed.generate(ids, max_new_tokens=37, eos_token_id=[EOS], pad_token_id=PAD).sequences
    if not torch.equal(out, expected):
        row, col = (out != expected).nonzero()[0].tolist()
        logits = target(expected[row: row + 1, :col]).logits[0, -1].float()
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) < 1e-4, f"mismatch at {row, col} without a near-tie"


def test_decode_step_never_syncs_on_cuda():
    target = tiny_model("llama").to("cuda", torch.float32)
    dec = SpecDecoder(target, noisy_copy(tiny_model("llama"), 0.3).to("cuda", torch.float32),
                      InContextPolicy(40), 4)
    ids = torch.randint(3, VOCAB, (3, 7), device="cuda")
    for do_sample in (False, True):
        run, _, _ = dec.new_run(ids, max_new_tokens=20, do_sample=do_sample, eos_token_id=[],
                                generator=torch.Generator(device="cuda").manual_seed(0))
        run.start()
        run.draw_noise()
        with cuda_sync_errors():
            run.step()


@pytest.mark.parametrize("C", [275, 3072, 262144])
@pytest.mark.parametrize("ties", [False, True])
def test_tree_builder_on_cuda_matches_the_reference_tie_rule(C, ties):
    """The tree's top-k runs `row_topk` on CUDA: the same tree as the CPU builder, whose top-k is replaced by
    `row_topk_ref` (ties by slot order), over an active set or a dense 262k vocabulary."""
    from microspec.drafting import tree as tree_mod
    from microspec.kernels import row_topk_ref

    spec = tree_mod.TreeSpec(top_k=4, depth=4, total_tokens=16)
    g = torch.Generator().manual_seed(C)
    def logp(*shape):
        x = torch.randn(*shape, C, generator=g)
        if ties:                                            # few distinct values: most top-k picks are ties
            x = (x * 2).round() / 2
        return x.log_softmax(-1)
    slot_ids = torch.randperm(1 << 20, generator=g)[:C].unsqueeze(0)
    inputs = [logp(2)] + [logp(2, spec.top_k) for _ in range(spec.depth - 1)]

    def build(device):
        b = tree_mod.TreeBuilder(spec)
        s = b.root(inputs[0].to(device), slot_ids.to(device))
        for lp in inputs[1:]:
            s = b.expand(s, lp.to(device))
        d = b.finish(s)
        return [t.cpu() for t in (d.tokens, d.parents, d.depth)]

    got = build("cuda")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tree_mod, "row_topk", row_topk_ref)
        want = build("cpu")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
