"""`PolicyContract`: the test suite every `VocabPolicy` inherits, yours included.

    from microspec.testing import PolicyContract

    class TestMyPolicy(PolicyContract):
        def make_policy(self):
            return MyPolicy(capacity=16)

Collected by pytest like any `Test*` class (it needs pytest, as the test extra installs). It drives the
policy through random request histories (ragged prompts, target top-k, partially masked commits, and the
verification blocks `on_step` passes to policies that take them) and checks
the invariants of `microspec.policies.base`: shapes and dtypes, ids unique and in range, special ids
present, -1 padding, storage that never moves, determinism, masked entries ignored, a set that only changes
in hooks, independent batch rows, and no host sync: `no_host_sync()` rejects every operation that would read
device memory from the host or give a data-dependent shape (on any device, CPU included), and
`torch.cuda.set_sync_debug_mode("error")` double-checks where CUDA exists.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .kernels import check_active_set
from .policies import VocabPolicy


class HostSyncError(RuntimeError):
    """An operation inside `no_host_sync()` would have synchronised a GPU stream with the host."""


# Ops whose result depends on tensor *values* on the host: a scalar read, or an output shape known only
# after the data is seen. On a GPU each one blocks the host until the device catches up.
_SYNCING_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2",
                "unique_dim", "unique_consecutive", "repeat_interleave", "item"}


class _SyncDetector(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] or ()) if t is not None)
        if name in _SYNCING_OPS or bool_index:
            raise HostSyncError(f"{func} reads device values on the host (a GPU sync)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Raise `HostSyncError` on any host read of tensor data inside the block, on any device.

    Catches `.item()`, `int()/bool()/float()` of tensors, `if tensor:`, `.tolist()`, `.numpy()`, boolean
    indexing, `nonzero`, `unique`, `masked_select`: the operations that force a GPU stream to drain.
    """
    def refuse(*_args, **_kwargs):
        raise HostSyncError("tensor data read on the host (.tolist()/.numpy())")

    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "__array__")}
    for name in saved:
        setattr(torch.Tensor, name, refuse)
    try:
        with _SyncDetector():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def cuda_sync_errors():
    """On CUDA: raise inside the block on any operation that synchronises the GPU with the host
    (`torch.cuda.set_sync_debug_mode("error")`), with the queued work drained before and after."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


class PolicyContract:
    """Base class of policy test suites. Override `make_policy`; the class attributes set the scene."""

    vocab_size = 97
    batch_size = 3
    prompt_len = 11
    block = 4                  # committed tokens per verification step (K + 1)
    nodes = 6                  # verification block width (N + 1: the last committed token and N drafts)
    special_ids = (2, 5)
    num_commits = 6
    hidden_size = 16           # width of the `hidden` given to policies with wants_hidden

    def make_policy(self) -> VocabPolicy:  # pragma: no cover - abstract
        raise NotImplementedError("subclasses return a fresh policy")

    # ------------------------------------------------------------------ scene
    def history(self, seed: int, batch_size: int | None = None, device="cpu"):
        """A reproducible request: ((prompt_ids, prompt_mask, prompt_topk, hidden), [step, ...]), each step
        (ids, mask, topk, hidden, block_ids, block_mask, block_topk) as `on_step` takes it: the committed
        tokens' top-k are rows of the block's, as they are in a decoder (the path lies in the block)."""
        g = torch.Generator().manual_seed(seed)
        B, L, V = batch_size or self.batch_size, self.prompt_len, self.vocab_size
        M, N1 = self.block, self.nodes
        k = 3
        ids = torch.randint(0, V, (B, L), generator=g)
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        mask = torch.arange(L) >= (L - lengths).unsqueeze(1)                      # left padding
        D = self.hidden_size
        prompt = (ids.masked_fill(~mask, 0), mask, torch.randint(0, V, (B, L, k), generator=g),
                  torch.randn(B, D, generator=g))
        commits = []
        for _ in range(self.num_commits):
            n = torch.randint(0, M + 1, (B,), generator=g)
            block_topk = torch.randint(0, V, (B, N1, k), generator=g)
            commits.append((torch.randint(0, V, (B, M), generator=g), torch.arange(M) < n.unsqueeze(1),
                            block_topk[:, :M], torch.randn(B, D, generator=g),
                            torch.randint(0, V, (B, N1), generator=g), torch.rand(B, N1, generator=g) < 0.8,
                            block_topk))
        move = lambda t: t.to(device)  # noqa: E731
        return (tuple(map(move, prompt)), [tuple(map(move, c)) for c in commits])

    def setup_policy(self, batch_size=None, device="cpu") -> VocabPolicy:
        policy = self.make_policy()
        policy.setup(batch_size or self.batch_size, self.vocab_size, list(self.special_ids), device)
        return policy

    @staticmethod
    def _topk(policy, topk):
        return topk if policy.target_topk else None

    @staticmethod
    def _hidden(policy, hidden):
        return hidden if policy.wants_hidden else None

    def step(self, policy, commit, hook=None):
        """One verification step through `hook` (default `policy.on_step`), as the decoder calls it."""
        ids, mask, topk, hidden, block_ids, block_mask, block_topk = commit
        block = (dict(block_ids=block_ids, block_mask=block_mask, block_topk=self._topk(policy, block_topk))
                 if policy.wants_block else {})
        (hook or policy.on_step)(ids, mask, self._topk(policy, topk), self._hidden(policy, hidden), **block)

    def run_history(self, policy, prompt, commits, check=None):
        policy.on_prefill(prompt[0], prompt[1], self._topk(policy, prompt[2]),
                          hidden=self._hidden(policy, prompt[3]))
        if check:
            check(policy)
        for commit in commits:
            self.step(policy, commit)
            if check:
                check(policy)

    def snapshot(self, policy):
        ids, n = policy.active()
        return ids.clone(), n.clone()

    def assert_valid(self, policy):
        ids, n = policy.active()
        rows = 1 if policy.shared else policy.batch_size
        assert ids.shape == (rows, policy.capacity) and ids.dtype == torch.long, (ids.shape, ids.dtype)
        assert n.shape == (rows,) and n.dtype == torch.long, (n.shape, n.dtype)
        check_active_set(ids, n, policy.vocab_size)
        for r in range(rows):
            live = ids[r, : int(n[r])]
            missing = [s for s in self.special_ids if s not in live.tolist()]
            assert not missing, f"row {r}: special ids {missing} missing from the active set"

    # ------------------------------------------------------------------ the contract
    def test_initial_set_is_valid(self):
        self.assert_valid(self.setup_policy())

    def test_set_stays_valid_through_a_request(self):
        policy = self.setup_policy()
        prompt, commits = self.history(seed=1)
        self.run_history(policy, prompt, commits, check=self.assert_valid)

    def test_storage_never_moves(self):
        policy = self.setup_policy()
        ids, n = policy.active()
        ptrs = (ids.data_ptr(), n.data_ptr())
        prompt, commits = self.history(seed=2)
        self.run_history(policy, prompt, commits)
        policy.setup(self.batch_size, self.vocab_size, list(self.special_ids), "cpu")   # next request
        self.run_history(policy, prompt, commits)
        after = policy.active()
        assert (after[0].data_ptr(), after[1].data_ptr()) == ptrs, "active-set buffers were reallocated"

    def test_deterministic_given_history(self):
        prompt, commits = self.history(seed=3)
        results = []
        for _ in range(2):
            policy = self.setup_policy()
            self.run_history(policy, prompt, commits)
            results.append(self.snapshot(policy))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])

    def test_reset_forgets_the_previous_request(self):
        prompt, commits = self.history(seed=4)
        fresh = self.setup_policy()
        used = self.setup_policy()
        self.run_history(used, *self.history(seed=5))
        used.setup(self.batch_size, self.vocab_size, list(self.special_ids), "cpu")
        for p in (fresh, used):
            self.run_history(p, prompt, commits)
        assert all(torch.equal(a, b) for a, b in zip(self.snapshot(fresh), self.snapshot(used)))

    def test_masked_out_entries_are_ignored(self):
        """Rejected drafts and finished rows arrive with mask False: their ids must not matter."""
        prompt, commits = self.history(seed=6)
        outs = []
        for junk_seed in (7, 8):
            g = torch.Generator().manual_seed(junk_seed)

            def noisy(t, keep):   # t where keep, random ids elsewhere
                return t.where(keep, torch.randint(0, self.vocab_size, t.shape, generator=g))
            policy = self.setup_policy()
            policy.on_prefill(prompt[0].where(prompt[1], torch.randint(0, self.vocab_size, prompt[0].shape,
                                                                       generator=g)),
                              prompt[1], self._topk(policy, prompt[2]),
                              hidden=self._hidden(policy, prompt[3]))
            for ids, mask, topk, hidden, block_ids, block_mask, block_topk in commits:
                self.step(policy, (noisy(ids, mask), mask, noisy(topk, mask.unsqueeze(-1)), hidden,
                                   noisy(block_ids, block_mask), block_mask,
                                   noisy(block_topk, block_mask.unsqueeze(-1))))
            outs.append(self.snapshot(policy))
        assert all(torch.equal(a, b) for a, b in zip(*outs)), "masked-out entries changed the active set"

    def test_set_changes_only_in_hooks(self):
        policy = self.setup_policy()
        prompt, commits = self.history(seed=9)
        self.run_history(policy, prompt, commits)
        before = self.snapshot(policy)
        for _ in range(3):
            policy.active()
        assert all(torch.equal(a, b) for a, b in zip(before, policy.active()))

    def test_rows_are_independent(self):
        policy = self.make_policy()
        if policy.shared:
            return  # one set for every row: nothing per row to compare
        prompt, commits = self.history(seed=10)
        batched = self.setup_policy()
        self.run_history(batched, prompt, commits)
        for b in range(self.batch_size):
            alone = self.setup_policy(batch_size=1)
            row = lambda t: t[b: b + 1]  # noqa: E731
            self.run_history(alone, tuple(map(row, prompt)), [tuple(map(row, c)) for c in commits])
            ids, n = batched.active()
            a_ids, a_n = alone.active()
            assert torch.equal(ids[b], a_ids[0]) and n[b] == a_n[0], f"row {b} depends on other rows"

    def test_special_ids_out_of_range_raise(self):
        import pytest
        with pytest.raises(ValueError):
            self.make_policy().setup(1, self.vocab_size, [self.vocab_size], "cpu")

    def test_hooks_never_read_device_values(self):
        policy = self.setup_policy()
        prompt, commits = self.history(seed=11)
        with no_host_sync():
            self.run_history(policy, prompt, commits)
            policy.active()

    def test_hooks_trace_in_one_graph(self):
        """`torch.compile(fullgraph=True)` of the hooks: no graph break, same result as eager."""
        import torch._dynamo
        policy = self.setup_policy()
        prompt, commits = self.history(seed=11)
        torch._dynamo.reset()
        prefill = torch.compile(policy.on_prefill, fullgraph=True, backend="eager")
        step = torch.compile(policy.on_step, fullgraph=True, backend="eager")
        prefill(prompt[0], prompt[1], self._topk(policy, prompt[2]), hidden=self._hidden(policy, prompt[3]))
        for commit in commits:
            self.step(policy, commit, hook=step)
        self.assert_valid(policy)
        reference = self.setup_policy()
        self.run_history(reference, prompt, commits)
        assert all(torch.equal(a, b) for a, b in zip(self.snapshot(policy), self.snapshot(reference)))

    def test_no_host_sync_on_cuda(self):
        if not torch.cuda.is_available():
            import pytest
            pytest.skip("CUDA required")
        policy = self.setup_policy(device="cuda")
        prompt, commits = self.history(seed=12, device="cuda")
        with cuda_sync_errors():
            self.run_history(policy, prompt, commits)
            policy.active()
