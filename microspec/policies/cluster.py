"""`ClusterPolicy` (DynaSpec): a learned router from the context to a few token clusters.

The vocabulary is grouped offline into k disjoint clusters (k-means over normalised LM-head rows, see
`microspec.clustering`). A small meta-classifier maps a summary of the context to one score per cluster,
and the active set of a row is

    special ids (EOS)  ∪  the always-in core (frequent ids)  ∪  the members of the best-scoring clusters,

filled cluster by cluster in score order until the capacity is reached. The cluster that straddles the
capacity is cut: it contributes its most frequent members (members are stored most frequent first). The set
therefore always holds exactly min(C, |specials ∪ core ∪ clustered ids|) ids, so `n_active` never changes.

The context summary is the **target's** final hidden state (`wants_hidden = True`; the input of its LM head
at the newest position whose input token is committed). DynaSpec routes on the drafter's hidden states
instead; the target's state costs nothing (verification already computed it) and is available before the
next block, but it is one token stale after a rejection. The classifier is trained for that: its labels are
the clusters of the next W tokens, not only the next one (see `microspec.clustering.collect_states`).
Without a hidden state (`hidden=None`) the set stays at the prior ranking (clusters by total frequency).

Device-side update, static shapes, no host sync (the hooks run inside CUDA graphs):
    scores [B, k] -> top-m clusters [B, m] -> cumulative sizes [B, m] -> for each of the n_c cluster slots,
    `searchsorted` finds its cluster and offset -> member ids [B, n_c] (distinct by construction: clusters
    are disjoint and hold no pinned id) -> slot-stable install: ids that stay keep their slot, new ids take
    the slots of the ids that left (an id -> slot map [B, V] and a [B, V] scratch bitmap), so the sparse
    head's delta gather copies only rows that really changed.
m is the smallest number of clusters that always covers n_c slots (set on the host at `setup`).

Why no side CUDA stream for the classifier (DynaSpec runs it beside the drafter): in microspec the hidden
state exists only after verification, and the next consumer of `active_ids` is the sparse head's refresh at
the start of the next step, whose stream forks from the main stream. Work the hook put on a side stream
would have to be joined back to the main stream before the hook returns (nothing else orders it before the
refresh), so it would run serially anyway. The overlap needs the head's refresh stream to wait on an event
of the policy instead of on the main stream: a change to `SparseLMHead`/`DecodeRun`, see
docs/cluster_policy.md. The classifier is one [B, D] x [D, k] GEMM: microseconds on a GPU.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .base import VocabPolicy

FORMAT = "microspec.cluster_policy"
FORMAT_VERSION = "1"


class MetaClassifier(nn.Module):
    """hidden [B, D] -> cluster logits float32 [B, k]: standardise, then a linear layer
    (`hidden_units=0`) or Linear-GELU-Linear. Standardisation statistics are buffers set by training."""

    def __init__(self, in_features: int, num_clusters: int, hidden_units: int = 0):
        super().__init__()
        self.in_features, self.num_clusters, self.hidden_units = in_features, num_clusters, hidden_units
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("inv_std", torch.ones(in_features))
        if hidden_units:
            self.net = nn.Sequential(nn.Linear(in_features, hidden_units), nn.GELU(),
                                     nn.Linear(hidden_units, num_clusters))
        else:
            self.net = nn.Sequential(nn.Linear(in_features, num_clusters))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net((hidden.to(self.mean.dtype) - self.mean) * self.inv_std)


class ClusterPolicy(VocabPolicy):
    """Per-row active set = specials ∪ core ∪ the top-scoring clusters, at a fixed capacity.

    Args:
        table:      int64 [k, S] cluster -> member ids, -1 padding; clusters disjoint; members most frequent
                    first (that order decides which members survive when a cluster is cut at the capacity).
        classifier: a `MetaClassifier` (or any module) mapping hidden [B, D] -> logits [B, k].
        capacity:   slots per row.
        core_ids:   ids always in the set after the special ids, most important first (cut to fit).
                    Cluster members that are special or core ids are dropped from their clusters.
        prior:      float [k] cluster scores used before any hidden state arrives (default: cluster sizes).
        size_penalty: rank clusters by log-sigmoid(logit) - size_penalty * log(size); 0 ranks by logit.
        metadata:   free-form strings saved with the policy (model, corpora, ...).

    Example (random classifier; see `microspec.clustering.fit_cluster_policy` for a trained one):
        >>> table = torch.tensor([[3, 4, -1], [5, 6, 7], [8, -1, -1]])
        >>> policy = ClusterPolicy(table, MetaClassifier(4, 3), capacity=4)
        >>> policy.setup(batch_size=2, vocab_size=10, special_ids=[0], device="cpu")
        >>> policy.on_commit(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool),
        ...                  hidden=torch.randn(2, 4))
        >>> policy.n_active.tolist()
        [4, 4]
    """

    wants_hidden = True

    def __init__(self, table: Tensor, classifier: nn.Module, capacity: int, core_ids=None, prior=None,
                 size_penalty: float = 0.0, metadata: dict | None = None):
        super().__init__(capacity)
        table = torch.as_tensor(table, dtype=torch.long).cpu()
        if table.dim() != 2 or table.shape[0] < 1:
            raise ValueError(f"table must be [k, S] with k >= 1, got {tuple(table.shape)}")
        if bool((table < -1).any()):
            raise ValueError("table entries must be token ids >= 0 or -1 padding")
        self.members = table[table >= 0]                                              # cluster-major
        self.sizes = (table >= 0).sum(1)                                              # [k]
        if self.members.numel() and int(torch.bincount(self.members).max()) > 1:
            raise ValueError("clusters must be disjoint: a token id appears twice in the table")
        self.num_clusters = table.shape[0]
        core = torch.as_tensor([] if core_ids is None else core_ids, dtype=torch.long).flatten().cpu()
        uniq, inverse = torch.unique(core, return_inverse=True)                      # keep first occurrences
        first = torch.full_like(uniq, core.numel()).scatter_reduce_(0, inverse, torch.arange(core.numel()),
                                                                     "amin")
        self.core_ids = uniq[first.argsort()]
        self.prior = (self.sizes.float() if prior is None else torch.as_tensor(prior, dtype=torch.float32)).cpu()
        if self.prior.shape != (self.num_clusters,):
            raise ValueError(f"prior must be [{self.num_clusters}], got {tuple(self.prior.shape)}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.hidden_size = getattr(classifier, "in_features", None)
        out = getattr(classifier, "num_clusters", self.num_clusters)
        if out != self.num_clusters:
            raise ValueError(f"classifier gives {out} scores, the table has {self.num_clusters} clusters")
        self.size_penalty = float(size_penalty)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}

    # ------------------------------------------------------------------ host side
    def _allocate(self, rows: int, vocab_size: int, device: torch.device) -> None:
        top = max(int(self.members.max()) if self.members.numel() else -1,
                  int(self.core_ids.max()) if self.core_ids.numel() else -1)
        if top >= vocab_size:
            raise ValueError(f"cluster table has id {top} >= vocab_size {vocab_size}: fitted for another "
                             f"tokenizer or model? (fitted on {self.metadata.get('model', 'unknown')})")
        self.classifier.to(device)
        C, V = self.capacity, vocab_size
        self._ids = torch.full((rows, C + 1), -1, dtype=torch.long, device=device)       # slot -> id, sink C
        self._slot_of = torch.full((rows, V + 1), -1, dtype=torch.long, device=device)   # id -> slot, sink V
        self._want = torch.zeros((rows, V), dtype=torch.bool, device=device)            # scratch bitmap

    def _reset(self) -> None:
        """Pinned ids, the cluster layout without them, and the prior set. Host work, once per request."""
        dev, C = self.device, self.capacity
        special = self.special_ids.cpu()
        core = self.core_ids[~torch.isin(self.core_ids, special)][: C - special.numel()]
        pinned = torch.cat([special, core])
        cluster = torch.repeat_interleave(torch.arange(self.num_clusters), self.sizes)  # [n_members]
        keep = ~torch.isin(self.members, pinned)
        sizes = torch.bincount(cluster[keep], minlength=self.num_clusters)            # [k]
        self._P = P = pinned.numel()
        self._n_c = n_c = min(C - P, int(keep.sum()))
        asc = sizes[sizes > 0].sort().values.cumsum(0)
        self._m = int((asc < n_c).sum()) + 1 if n_c else 0      # any m non-empty clusters fill n_c slots
        self._members_d = self.members[keep].to(dev)
        self._sizes_d = sizes.to(dev)
        self._offsets_d = (sizes.cumsum(0) - sizes).to(dev)
        self._bias = torch.where(sizes > 0, 0.0, float("-inf")).to(dev)                 # empty: never chosen
        self._log_size = sizes.clamp_min(1).float().log().to(dev)
        self._pos = torch.arange(n_c, device=dev)
        self.active_ids.fill_(-1)
        self.active_ids[:, :P] = pinned.to(dev)
        self.n_active.fill_(P + n_c)
        self._ids.fill_(-1)
        self._slot_of.fill_(-1)
        self._want.zero_()
        if n_c:
            R = self._ids.shape[0]
            cand = self._select(self.prior.to(dev).expand(R, -1))
            self._ids[:, :n_c] = cand
            self._slot_of.scatter_(1, cand, self._pos.expand(R, -1))
            self.active_ids[:, P: P + n_c] = cand

    # ------------------------------------------------------------------ device side
    def on_prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, target_topk: Tensor | None = None,
                   hidden: Tensor | None = None) -> None:
        if hidden is not None:
            self._update(hidden)

    def on_commit(self, committed_ids: Tensor, committed_mask: Tensor, target_topk: Tensor | None = None,
                  hidden: Tensor | None = None) -> None:
        if hidden is not None:
            self._update(hidden)

    def scores(self, hidden: Tensor) -> Tensor:
        """Cluster ranking scores float32 [B, k] for hidden [B, D] (higher is better)."""
        if self.hidden_size is not None and hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden has width {hidden.shape[-1]}, the classifier expects {self.hidden_size}")
        logits = self.classifier(hidden).float()
        if self.size_penalty:
            logits = nn.functional.logsigmoid(logits) - self.size_penalty * self._log_size
        return logits

    def _finite(self, s: Tensor) -> Tensor:
        """NaN/inf-proof scores: any finite score beats an empty cluster (-inf), so the top m are never
        empty and the m clusters always fill the n_c slots."""
        big = torch.finfo(torch.float32).max
        return torch.nan_to_num(s.float(), nan=-big, posinf=big, neginf=-big) + self._bias

    def _update(self, hidden: Tensor) -> None:
        if self._n_c:
            self._install(self._select(self.scores(hidden)))

    def _select(self, scores: Tensor) -> Tensor:
        """Member ids [B, n_c] of the best clusters for scores [B, k], best cluster first."""
        B, n_c = scores.shape[0], self._n_c
        top = torch.topk(self._finite(scores), self._m, dim=1).indices                  # [B, m]
        size = self._sizes_d[top]                                                      # [B, m]
        end = size.cumsum(1)                                                            # [B, m] exclusive ends
        pos = self._pos.expand(B, n_c).contiguous()                                     # [B, n_c]
        r = torch.searchsorted(end, pos, right=True).clamp_(max=self._m - 1)          # cluster rank per slot
        start = end.gather(1, r) - size.gather(1, r)
        return self._members_d[self._offsets_d[top.gather(1, r)] + pos - start]

    def _install(self, cand: Tensor) -> None:
        """Make the cluster slots hold the ids cand [B, n_c] (distinct), keeping resident ids in place."""
        C, V, n_c, P = self.capacity, self.vocab_size, self._n_c, self._P
        cur = self._ids[:, :n_c]                                                        # [B, n_c], all valid
        self._want.scatter_(1, cand, True)
        stay = self._want.gather(1, cur)                                                # resident and wanted
        self._want.scatter_(1, cand, False)
        new = self._slot_of.gather(1, cand) < 0                                          # [B, n_c]
        # |new| == |leaving| per row (both sets have n_c ids); leaving slots, lowest first, take new ids.
        free = torch.sort(stay.to(torch.int8), dim=1, stable=True).indices
        rank = (new.cumsum(1) - 1).clamp_(min=0)
        dest = torch.where(new, free.gather(1, rank), C)                                # C: sink slot
        old = self._ids.gather(1, dest)
        self._slot_of.scatter_(1, torch.where(new, old, V), -1)
        self._slot_of.scatter_(1, torch.where(new, cand, V), dest)
        self._ids.scatter_(1, dest, cand)
        self.active_ids[:, P: P + n_c] = self._ids[:, :n_c]

    def shortlist(self, hidden: Tensor) -> Tensor:
        """The set the policy would hold for hidden [B, D], best clusters first, without changing state:
        int64 [B, n_active] (pinned ids, then cluster members). Call `setup` first."""
        pinned = self.active_ids[:1, : self._P].expand(hidden.shape[0], -1)
        if not self._n_c:
            return pinned.clone()
        return torch.cat([pinned, self._select(self.scores(hidden))], dim=1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the clusters, core, prior and classifier to a safetensors file (no pickle)."""
        from safetensors.torch import save_file
        tensors = {"members": self.members.int(), "sizes": self.sizes.int(), "core": self.core_ids.int(),
                   "prior": self.prior.float()}
        tensors.update({f"classifier.{k}": v.detach().float().cpu() for k, v in self.classifier.state_dict().items()})
        meta = {**self.metadata, "format": FORMAT, "format_version": FORMAT_VERSION,
                "num_clusters": str(self.num_clusters), "hidden_size": str(self.hidden_size),
                "hidden_units": str(getattr(self.classifier, "hidden_units", 0)),
                "size_penalty": str(self.size_penalty)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, capacity: int, size_penalty: float | None = None) -> "ClusterPolicy":
        """Read a policy saved by `save` (or `microspec fit-clusters`)."""
        from safetensors import safe_open
        if not os.path.isfile(path):
            raise FileNotFoundError(f"cluster policy file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types on a malformed header
            raise ValueError(f"{path}: not a safetensors file ({err})") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a ClusterPolicy file (format {meta.get('format')!r})")
        sizes = tensors["sizes"].long()
        table = pad_table(tensors["members"].long(), sizes)
        clf = MetaClassifier(int(meta["hidden_size"]), sizes.numel(), int(meta["hidden_units"]))
        clf.load_state_dict({k[len("classifier."):]: v for k, v in tensors.items() if k.startswith("classifier.")})
        penalty = float(meta["size_penalty"]) if size_penalty is None else size_penalty
        extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "num_clusters",
                                                            "hidden_size", "hidden_units", "size_penalty")}
        return cls(table, clf, capacity, core_ids=tensors["core"].long(), prior=tensors["prior"],
                   size_penalty=penalty, metadata=extra)

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity}, clusters={self.num_clusters}, core={self.core_ids.numel()}, "
                f"hidden_size={self.hidden_size}")


def pad_table(members: Tensor, sizes: Tensor) -> Tensor:
    """Cluster-major member ids [n] and sizes [k] -> padded table int64 [k, max(sizes)] (-1 padding)."""
    sizes = sizes.long()
    table = torch.full((sizes.numel(), max(1, int(sizes.max()) if sizes.numel() else 1)), -1, dtype=torch.long)
    rank = torch.arange(members.numel()) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    table[torch.repeat_interleave(torch.arange(sizes.numel()), sizes), rank] = members.long()
    return table
