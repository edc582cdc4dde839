"""`torch.compile(fullgraph=True)` of the policy update and the sparse head: one graph, no break, and no
recompilation across decode steps (fixed shapes; `n_active`, positions and the set are data, not
constants). CPU CI uses the `aot_eager` backend (full Dynamo + AOTAutograd tracing, no code generation);
the GPU run adds Inductor (`MICROSPEC_COMPILE_BACKEND=inductor`)."""
import os

import pytest
import torch
import torch._dynamo

from microspec import SparseLMHead
from microspec.policies import InContextPolicy, StaticFrequencyPolicy

BACKEND = os.environ.get("MICROSPEC_COMPILE_BACKEND", "aot_eager")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _strict_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def history(B, V, M, steps, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        n = torch.randint(1, M + 1, (B,), generator=g)
        yield (torch.randint(0, V, (B, M), generator=g).to(DEVICE), (torch.arange(M) < n[:, None]).to(DEVICE),
               torch.randint(0, V, (B, M, k), generator=g).to(DEVICE))


@pytest.mark.parametrize("policy", [InContextPolicy(capacity=64, topk=3),
                                    InContextPolicy(64, 3, eviction="fifo"),
                                    InContextPolicy(64, 3, eviction=None)], ids=["lru", "fifo", "grow"])
def test_policy_update_compiles_once(policy):
    B, V, M = 3, 500, 6
    policy.setup(B, V, [2], DEVICE)
    reference = InContextPolicy(policy.capacity, policy.target_topk, policy.eviction)
    reference.setup(B, V, [2], DEVICE)
    commit = torch.compile(policy.on_commit, fullgraph=True, backend=BACKEND)
    for ids, mask, topk in history(B, V, M, steps=12, k=3):
        commit(ids, mask, topk)
        reference.on_commit(ids, mask, topk)
        assert torch.equal(policy.active_ids, reference.active_ids)
        assert torch.equal(policy.n_active, reference.n_active)


@pytest.mark.parametrize("mode", ["repack", "gather"])
@pytest.mark.parametrize("shared", [False, True])
def test_sparse_head_compiles_once_and_follows_the_set(mode, shared):
    B, V, D, C = 3, 500, 32, 64
    weight = torch.randn(V, D, device=DEVICE)
    policy = StaticFrequencyPolicy(torch.randperm(V), C) if shared else InContextPolicy(C, topk=3)
    policy.setup(B, V, [2], DEVICE)
    head = SparseLMHead(weight, mode=mode, async_gather=False)
    head.bind(*policy.active())

    def draft_logits(hidden):
        head.refresh()
        return head(hidden)

    compiled = torch.compile(draft_logits, fullgraph=True, backend=BACKEND)
    for step, (ids, mask, topk) in enumerate(history(B, V, 6, steps=8, k=3)):
        hidden = torch.randn(B, 1, D, device=DEVICE)
        out = compiled(hidden)
        ids_now, n_now = policy.active()
        expected = hidden @ weight[ids_now.clamp(min=0)].transpose(-1, -2)
        live = torch.arange(C, device=DEVICE) < n_now[:, None, None]
        torch.testing.assert_close(out[live.expand_as(out)], expected.expand_as(out)[live.expand_as(out)])
        assert torch.isneginf(out[~live.expand_as(out)]).all()
        policy.on_commit(ids, mask, topk)


@pytest.mark.parametrize("backend", sorted({BACKEND, "inductor"}))
def test_tree_builder_compiles_once_per_depth_and_equals_eager(backend):
    """Compiled `TreeBuilder` (what `SpecDecoder(compile=True)` drafts trees with): the same drafts as the
    eager builder, one graph per depth on the first tree and no recompilation on later trees. Inductor too:
    its code generation, not the graph capture, is what once failed on the CPU (an index gathered from a
    floor division)."""
    from microspec.drafting.tree import TreeBuilder, TreeSpec
    spec, B, C = TreeSpec(top_k=4, depth=4, total_tokens=14), 2, 40
    eager, compiled = TreeBuilder(spec), TreeBuilder(spec, compile=backend)
    ids = torch.randperm(C, device=DEVICE).unsqueeze(0)

    def build(builder, g):
        state = builder.root(torch.randn(B, C, generator=g).log_softmax(-1).to(DEVICE), ids)
        for _ in range(spec.depth - 1):
            logp = torch.randn(B, spec.top_k, C, generator=g).log_softmax(-1)
            state = builder.expand(state, logp.to(DEVICE))
        return builder.finish(state)

    for seed in range(3):
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):
            got = build(compiled, torch.Generator().manual_seed(seed))
        want = build(eager, torch.Generator().manual_seed(seed))
        for field in ("tokens", "parents", "depth", "valid", "slots", "tree_mask"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("tree", [None, (3, 3, 8)], ids=["chain", "tree"])
def test_compiled_step_ops_and_policy_updates_equal_eager(do_sample, tree):
    """A run whose engine compiles its step arithmetic (`microspec.step_ops`), the verifier and the policy's
    per-step updates, as `SpecDecoder(compile=True)` does, decodes exactly what the uncompiled run decodes:
    same tokens (greedy and sampled, same noise), same statistics."""
    import dataclasses

    from tiny_models import EOS, VOCAB, tiny_model

    from microspec import SpecDecoder
    from microspec.drafting.eagle import EagleDrafter
    from microspec.drafting.tree import TreeSpec
    from microspec.engine import DecodeRun
    from microspec.sampling import SamplingConfig
    target = tiny_model("llama")
    drafter = EagleDrafter.from_target(target, seed=1).double()
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False
    results = []
    for compile in (False, BACKEND):
        policy = InContextPolicy(24, topk=2, tree_ids=tree is not None)
        dec = SpecDecoder(target, drafter, policy, 3, tree=None if tree is None else TreeSpec(*tree),
                          cuda_graph=False)
        parts = dataclasses.replace(dec.parts(), compile=compile)
        with torch._dynamo.config.patch(error_on_recompile=False):
            run = DecodeRun(parts, ids, mask, 20, SamplingConfig(do_sample), [EOS],
                            torch.Generator().manual_seed(5))
            out = run.execute(ids, 0)
        assert hasattr(run.ops.cut_and_write, "_torchdynamo_orig_callable") == bool(compile)
        assert hasattr(run._verify, "_torchdynamo_orig_callable") == bool(compile)
        results.append((out.sequences, out.stats.accepted_histogram, out.stats.coverage))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1:] == results[1][1:]
