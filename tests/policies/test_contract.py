"""Every shipped policy passes the `PolicyContract` (a user's policy needs the same ~10 lines)."""
import torch

from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy
from microspec.testing import PolicyContract


class TestFullVocab(PolicyContract):
    def make_policy(self):
        return FullVocab()


class TestStaticFrequency(PolicyContract):
    def make_policy(self):
        counts = torch.arange(self.vocab_size, dtype=torch.float).flip(0)   # id 0 most frequent
        return StaticFrequencyPolicy.from_counts(counts, capacity=16)


class TestStaticFrequencyCapacityOne(PolicyContract):
    special_ids = (2,)

    def make_policy(self):
        return StaticFrequencyPolicy(torch.arange(self.vocab_size), capacity=1)


class TestInContextLRU(PolicyContract):
    def make_policy(self):
        return InContextPolicy(capacity=12, topk=3, eviction="lru")


class TestInContextFIFO(PolicyContract):
    def make_policy(self):
        return InContextPolicy(capacity=12, topk=2, eviction="fifo")


class TestInContextGrowOnly(PolicyContract):
    def make_policy(self):
        return InContextPolicy(capacity=12, topk=3, eviction=None)


class TestInContextWithCore(PolicyContract):
    def make_policy(self):
        return InContextPolicy(capacity=20, topk=1, core_ids=torch.arange(40, 50))


class TestInContextRoomy(PolicyContract):
    def make_policy(self):
        return InContextPolicy(capacity=self.vocab_size, topk=3)


class TestInContextCapacityOne(PolicyContract):
    special_ids = (2,)

    def make_policy(self):
        return InContextPolicy(capacity=1, topk=3)


class TestInContextWithSuccessors(PolicyContract):
    def make_policy(self):
        succ = torch.randint(-1, self.vocab_size - 5, (self.vocab_size - 5, 3),
                             generator=torch.Generator().manual_seed(0))
        return InContextPolicy(capacity=16, topk=2, core_ids=torch.arange(40, 44), successors=succ)


class TestInContextTree(PolicyContract):
    """MicroSpec's tree construction (`on_block`), with `on_step` fusing it with `on_commit`."""
    def make_policy(self):
        return InContextPolicy(capacity=40, topk=3, eviction=None, core_ids=torch.arange(40, 50),
                               tree_ids=True)


class TestInContextTreeLRU(PolicyContract):
    def make_policy(self):
        return InContextPolicy(capacity=14, topk=2, eviction="lru", tree_ids=True)
