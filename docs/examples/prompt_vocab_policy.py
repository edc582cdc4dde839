"""A custom vocabulary policy in ~30 lines: the prompt's own tokens (plus EOS), nothing else.

It is NanoSpec's "ctx_only" ablation without the target's top-k, and it shows the idioms a policy needs to
stay sync-free: state in preallocated device tensors, masks instead of Python branches, and a presence
bitmap + sort to get sorted unique ids with a static shape (`torch.unique` would sync: its output size
depends on the data).
"""
import torch

from microspec.policies import VocabPolicy


class PromptVocabPolicy(VocabPolicy):
    """Active set = special ids ∪ the prompt's token ids (the smallest ids first if they do not all fit)."""

    def _allocate(self, rows, vocab_size, device):
        self.present = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)      # [B, V] bitmap
        self.all_ids = torch.arange(vocab_size, device=device)

    def _reset(self):
        self.present.zero_()
        self.present[:, self.special_ids] = True
        self._publish()

    def on_prefill(self, prompt_ids, prompt_mask, target_topk=None, hidden=None):
        # Masked-out (padding) positions write into id 0 with value False OR'ed in: no effect.
        self.present.scatter_reduce_(1, prompt_ids, prompt_mask, reduce="amax")
        self._publish()

    def _publish(self):
        """Bitmap -> sorted ids in the first n slots, -1 after: no host sync, static shapes."""
        V, C = self.vocab_size, self.capacity
        # absent ids sort last
        keys = torch.where(self.present, self.all_ids, V).sort(dim=1).values[:, :C]
        self.active_ids.copy_(torch.where(keys < V, keys, -1))
        self.n_active.copy_((keys < V).sum(1))


if __name__ == "__main__":
    policy = PromptVocabPolicy(capacity=8)
    policy.setup(batch_size=2, vocab_size=50, special_ids=[0], device="cpu")
    policy.on_prefill(torch.tensor([[7, 3, 7], [9, 9, 4]]),
                      torch.tensor([[True, True, True], [False, True, True]]))
    # row 0: [0, 3, 7], row 1: [0, 4, 9] (the padded 9 is ignored, the real one is not)
    print(policy.active())
