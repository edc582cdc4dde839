"""`ClusterPolicy` (DynaSpec): a learned router from the context to token clusters.

The vocabulary is grouped offline into k disjoint clusters (k-means over normalised LM-head rows, see
`microspec.lab.clustering`). A small meta-classifier maps a summary of the context to one score per cluster.
A row's active set is the special ids (EOS) and an always-in core of frequent ids, pinned in the first slots,
then `C - pinned` ids chosen by one of two fills:

* ``fill="tokens"`` (default): every other id t is ranked by
      log σ(score[cluster(t)]) + freq_weight · log count(t)  (+ a bonus that puts ids already in the context,
      prompt and committed tokens, first when `context=True`)
  i.e. the classifier's belief that t's cluster is needed soon, times a frequency prior inside the cluster:
  DynaSpec's "frequency-ranked subset selection" within the routed clusters, at token granularity. Ids that
  were never seen in the fitting corpora belong to no cluster and rank last unless the context holds them.
* ``fill="clusters"``: DynaSpec's union of the top-scoring clusters, taken whole in score order; the cluster
  that straddles the capacity is cut to its most frequent members (members are stored most frequent first).
  Measured on SmolLM2 it covers less than the token fill at every capacity (docs/cluster_policy.md).

Either way the set always holds exactly min(C, |candidates|) ids, so `n_active` never changes.

The context summary is the **target's** final hidden state (`wants_hidden = True`: the input of its LM head
at the newest position whose input token is committed). DynaSpec routes on the drafter's hidden states
instead; the target's state costs nothing (verification computed it) and is ready before the next block,
but it is one token stale after a rejection, so the classifier is trained on the clusters of the next W
tokens, not only the next one. Before any hidden state arrives (or for callers that pass `hidden=None`),
cluster scores are flat (token fill: frequency order, plus the context) or the prior (cluster fill: clusters
by total frequency).

Device-side update, static shapes, no host sync (the hooks run inside CUDA graphs): scores [B, k] -> token
scores [B, V] -> `topk` (token fill), or top-m clusters -> cumulative sizes -> `searchsorted` per slot
(cluster fill) -> candidate ids [B, n_c], distinct by construction -> slot-stable install
(`SlotTable.replace`): ids that stay keep their slot, new ids take the slots of the ids that left, so the
sparse head's delta gather copies only rows that changed.

No side CUDA stream for the classifier (DynaSpec runs it beside the drafter): in microspec the hidden state
exists only after verification, and the next reader of `active_ids` is the sparse head's refresh at the start
of the next step, whose stream forks from the main stream. A side stream would have to be joined back to the
main stream before the hook returns (nothing else orders it before that refresh), so it would run serially
anyway; docs/cluster_policy.md describes the engine change that would let it overlap. The classifier is one
[B, D] x [D, k] GEMM: microseconds on a GPU.
"""
from __future__ import annotations

import itertools
import os

import torch
from torch import Tensor, nn

from ..inputs import as_token_ids, unique_stable
from .base import VocabPolicy
from .slots import SlotTable

FORMAT = "microspec.cluster_policy"
_FILLS = ("tokens", "clusters")
_FLOOR, _UNCLUSTERED, _BONUS = -1e3, -2e3, 1e4   # score tiers: clustered > unclustered; context first


class MetaClassifier(nn.Module):
    """hidden [B, D] -> cluster logits float32 [B, k]: standardise (buffers set by training), then a linear
    layer (`hidden_units=0`) or Linear-GELU-Linear."""

    def __init__(self, in_features: int, num_clusters: int, hidden_units: int = 0):
        super().__init__()
        self.in_features, self.num_clusters, self.hidden_units = in_features, num_clusters, hidden_units
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("inv_std", torch.ones(in_features))
        dims = [in_features, hidden_units, num_clusters] if hidden_units else [in_features, num_clusters]
        layers = [nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
        self.net = nn.Sequential(*([layers[0], nn.GELU(), layers[1]] if hidden_units else layers))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net((hidden.to(self.mean.dtype) - self.mean) * self.inv_std)


class ClusterPolicy(VocabPolicy):
    """Per-row active set = specials ∪ core ∪ ids routed by the classifier, at a fixed capacity.

    Args:
        table:       int64 [k, S] cluster -> member ids, -1 padding; clusters disjoint; members most frequent
                     first. Cluster members that are special or core ids are dropped from their clusters.
        classifier:  a `MetaClassifier` (or any module) mapping hidden [B, D] -> logits [B, k].
        capacity:    slots per row.
        core_ids:    ids always in the set after the special ids, most important first (cut to fit).
        counts:      float [n] frequency of each member, in table order (row-major, -1 skipped); token
                     fill only (default: all equal).
        prior:       float [k] cluster scores of the cluster fill before any hidden state (default: sizes).
        fill:        "tokens" or "clusters" (see the module docstring).
        freq_weight: token fill: weight of log count(t).
        context:     token fill: ids of the prompt and of committed tokens come first.
        size_penalty: cluster fill: rank by log σ(logit) - size_penalty · log size (0: by logit).
        metadata:    strings saved with the policy (model, corpora, ...).

    Example (random classifier; `microspec.lab.clustering.fit_cluster_policy` trains one):
        >>> table = torch.tensor([[3, 4, -1], [5, 6, 7], [8, -1, -1]])
        >>> policy = ClusterPolicy(table, MetaClassifier(4, 3), capacity=4)
        >>> policy.setup(batch_size=2, vocab_size=10, special_ids=[0], device="cpu")
        >>> mask = torch.ones(2, 1, dtype=torch.bool)
        >>> policy.on_commit(torch.tensor([[9], [9]]), mask, hidden=torch.randn(2, 4))
        >>> policy.n_active.tolist(), 9 in policy.active_ids[0].tolist()   # EOS, 9 (in context), 2 routed
        ([4, 4], True)
    """

    wants_hidden = True

    def __init__(self, table: Tensor, classifier: nn.Module, capacity: int, core_ids=None, counts=None,
                 prior=None, fill: str = "tokens", freq_weight: float = 0.5, context: bool = True,
                 size_penalty: float = 0.0, metadata: dict | None = None):
        super().__init__(capacity)
        table = torch.as_tensor(table, dtype=torch.long).cpu()
        if table.dim() != 2 or table.shape[0] < 1 or bool((table < -1).any()):
            raise ValueError(f"table must be [k, S] (k >= 1) of ids >= 0 and -1 padding, got "
                             f"{tuple(table.shape)}")
        if fill not in _FILLS:
            raise ValueError(f"fill must be one of {_FILLS}, got {fill!r}")
        self.members = table[table >= 0]                                              # cluster-major
        self.sizes = (table >= 0).sum(1)                                              # [k]
        if self.members.numel() and int(torch.bincount(self.members).max()) > 1:
            raise ValueError("clusters must be disjoint: a token id appears twice in the table")
        self.num_clusters = k = table.shape[0]
        core = as_token_ids([] if core_ids is None else core_ids, "core_ids", allow_empty=True)
        self.core_ids = unique_stable(core)                                          # keep first occurrences
        self.counts = (torch.ones(self.members.numel()) if counts is None
                       else torch.as_tensor(counts, dtype=torch.float32).flatten().cpu())
        self.prior = (self.sizes.float() if prior is None
                      else torch.as_tensor(prior, dtype=torch.float32).cpu())
        if self.counts.shape != self.members.shape or self.prior.shape != (k,):
            raise ValueError(f"counts must be [{self.members.numel()}] and prior [{k}], got "
                             f"{tuple(self.counts.shape)} and {tuple(self.prior.shape)}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.hidden_size = getattr(classifier, "in_features", None)
        if getattr(classifier, "num_clusters", k) != k:
            raise ValueError(f"classifier gives {classifier.num_clusters} scores, the table has {k} clusters")
        self.fill, self.freq_weight = fill, float(freq_weight)
        self.context = bool(context) and fill == "tokens"
        self.size_penalty = float(size_penalty)
        self.metadata = {str(a): str(b) for a, b in (metadata or {}).items()}

    # ------------------------------------------------------------------ host side
    def _allocate(self, rows: int, vocab_size: int, device: torch.device) -> None:
        top = int(torch.cat([self.members, self.core_ids, torch.tensor([-1])]).max())
        if top >= vocab_size:
            raise ValueError(f"cluster table has id {top} >= vocab_size {vocab_size}: fitted for another "
                             f"tokenizer or model? (fitted on {self.metadata.get('model', 'unknown')})")
        self.classifier.to(device)
        C, V, k = self.capacity, vocab_size, self.num_clusters
        self._table = SlotTable(rows, C, V, device)          # routed slots [0, n_c) <-> ids (slot s: P + s)
        self._seen = torch.zeros((rows, V + 1), dtype=torch.bool, device=device)        # context ids, sink V
        self._lp = torch.zeros((rows, k), dtype=torch.float32, device=device)           # last cluster scores

    def _reset(self) -> None:
        """Pinned ids, the candidate layout without them, and the initial set. Host work, once per request."""
        dev, C, V, k = self.device, self.capacity, self.vocab_size, self.num_clusters
        special = self.special_ids.cpu()
        core = self.core_ids[~torch.isin(self.core_ids, special)]
        pinned = torch.cat([special, core[: C - special.numel()]])
        cluster = torch.repeat_interleave(torch.arange(k), self.sizes)                 # [n_members]
        keep = ~torch.isin(self.members, pinned)
        members, cluster = self.members[keep], cluster[keep]
        sizes = torch.bincount(cluster, minlength=k)                                    # [k]
        self._P = P = pinned.numel()
        self._n_c = n_c = min(C - P, V - P if self.fill == "tokens" else members.numel())
        if self.fill == "tokens":   # candidates: every id that is not pinned; [V] score terms and clusters
            base = torch.full((V,), _UNCLUSTERED)
            base[members] = self.freq_weight * self.counts[keep].clamp_min(0.5).log()
            base[pinned] = float("-inf")
            self._base = base.to(dev)
            self._cluster_of = torch.full((V,), k, dtype=torch.long).index_put_((members,), cluster).to(dev)
        else:
            asc = sizes[sizes > 0].sort().values.cumsum(0)
            self._m = int((asc < n_c).sum()) + 1                 # any m non-empty clusters fill n_c slots
            self._members_d, self._sizes_d = members.to(dev), sizes.to(dev)
            self._offsets_d = (sizes.cumsum(0) - sizes).to(dev)
            self._bias = torch.where(sizes > 0, 0.0, float("-inf")).to(dev)            # empty: never chosen
            self._log_size = sizes.clamp_min(1).float().log().to(dev)
        self._pos = torch.arange(n_c, device=dev)
        self.active_ids.fill_(-1)
        self.active_ids[:, :P] = pinned.to(dev)
        self.n_active.fill_(P + n_c)
        self._seen.fill_(False)
        self._lp.copy_(self._initial_scores(1))
        rows = self._lp.shape[0]
        cand = self._select(self._lp) if n_c else torch.zeros((rows, 0), dtype=torch.long, device=dev)
        self._table.reset(cand)
        self.active_ids[:, P: P + n_c] = cand

    def _initial_scores(self, rows: int) -> Tensor:
        """Cluster scores before any hidden state: flat (token fill: frequency order) or the prior."""
        flat = torch.zeros(self.num_clusters) if self.fill == "tokens" else self.prior
        return flat.to(self.device).expand(rows, -1)

    # ------------------------------------------------------------------ device side
    def on_prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, target_topk: Tensor | None = None,
                   hidden: Tensor | None = None) -> None:
        self._observe(prompt_ids, prompt_mask, hidden)

    def on_commit(self, committed_ids: Tensor, committed_mask: Tensor, target_topk: Tensor | None = None,
                  hidden: Tensor | None = None) -> None:
        self._observe(committed_ids, committed_mask, hidden)

    def _observe(self, ids: Tensor, mask: Tensor, hidden: Tensor | None) -> None:
        if not self._n_c or (hidden is None and not self.context):
            return
        if self.context:
            self._seen.scatter_(1, torch.where(mask, ids, self.vocab_size), True)
        if hidden is not None:
            self._lp.copy_(self.scores(hidden))
        self._install(self._select(self._lp, self._seen[:, : self.vocab_size] if self.context else None))

    def scores(self, hidden: Tensor) -> Tensor:
        """Cluster scores float32 [B, k] for hidden [B, D], higher is better: log σ(logit) for the token
        fill, log σ(logit) - size_penalty · log size (or the logit when 0) for the cluster fill."""
        if self.hidden_size is not None and hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden has width {hidden.shape[-1]}, the classifier expects "
                             f"{self.hidden_size}")
        logits = self.classifier(hidden).float()
        if self.fill == "clusters" and not self.size_penalty:
            return logits
        lp = nn.functional.logsigmoid(logits)
        return lp if self.fill == "tokens" else lp - self.size_penalty * self._log_size

    def _select(self, lp: Tensor, seen: Tensor | None = None, ordered: bool = False) -> Tensor:
        """Candidate ids [B, n_c] for cluster scores lp [B, k] and context bitmap seen [B, V] (best first
        when `ordered`; the install does not need the order, and an unsorted `topk` is cheaper)."""
        if self.fill == "tokens":
            lp = torch.nan_to_num(lp, nan=_FLOOR).clamp(_FLOOR, 0.0)
            lp = torch.cat([lp, torch.full_like(lp[:, :1], 0.0)], dim=1)               # column k: unclustered
            s = lp[:, self._cluster_of] + self._base                                     # [B, V]
            if seen is not None:
                s = s + seen * _BONUS
            return torch.topk(s, self._n_c, dim=1, sorted=ordered).indices
        big = torch.finfo(torch.float32).max          # any finite score beats an empty cluster (-inf)
        s = torch.nan_to_num(lp.float(), nan=-big, posinf=big, neginf=-big) + self._bias
        B, n_c = s.shape[0], self._n_c
        top = torch.topk(s, self._m, dim=1).indices                                      # [B, m]
        size = self._sizes_d[top]                                                        # [B, m]
        end = size.cumsum(1)                                                              # exclusive ends
        pos = self._pos.expand(B, n_c).contiguous()                                       # [B, n_c]
        r = torch.searchsorted(end, pos, right=True).clamp_(max=self._m - 1)            # cluster per slot
        start = end.gather(1, r) - size.gather(1, r)
        return self._members_d[self._offsets_d[top.gather(1, r)] + pos - start]

    def _install(self, cand: Tensor) -> None:
        """Make the routed slots hold the ids cand [B, n_c] (distinct), keeping resident ids in place."""
        n_c, P = self._n_c, self._P
        self._table.replace(cand)
        self.active_ids[:, P: P + n_c] = self._table.ids[:, :n_c]

    def shortlist(self, hidden: Tensor | None, seen: Tensor | None = None) -> Tensor:
        """The set for hidden [B, D] (None: no classifier) and context bitmap seen bool [B, V] (None: no
        context), without touching the policy's state: int64 [B, n_active], pinned ids then the routed ids
        best first. Call `setup` first (any batch size)."""
        B = hidden.shape[0] if hidden is not None else seen.shape[0]
        pinned = self.active_ids[:1, : self._P].expand(B, -1)
        if not self._n_c:
            return pinned.clone()
        lp = self.scores(hidden) if hidden is not None else self._initial_scores(B)
        return torch.cat([pinned, self._select(lp, seen if self.context else None, ordered=True)], dim=1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write clusters, counts, core, prior, classifier and settings to a safetensors file (no pickle)."""
        from safetensors.torch import save_file
        tensors = {"members": self.members.int(), "sizes": self.sizes.int(), "counts": self.counts.float(),
                   "core": self.core_ids.int(), "prior": self.prior.float(),
                   **{f"classifier.{a}": b.detach().float().cpu()
                      for a, b in self.classifier.state_dict().items()}}
        meta = {**self.metadata, "format": FORMAT, "num_clusters": str(self.num_clusters),
                "hidden_size": str(self.hidden_size),
                "hidden_units": str(getattr(self.classifier, "hidden_units", 0)),
                "fill": self.fill, "freq_weight": str(self.freq_weight), "context": str(int(self.context)),
                "size_penalty": str(self.size_penalty)}
        save_file({a: b.contiguous() for a, b in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, capacity: int, **overrides) -> ClusterPolicy:
        """Read a policy saved by `save` (or `microspec fit-clusters`). `overrides` replace saved settings:
        fill, freq_weight, context, size_penalty."""
        from safetensors import safe_open
        if not os.path.isfile(path):
            raise FileNotFoundError(f"cluster policy file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, tensors = dict(f.metadata() or {}), {a: f.get_tensor(a) for a in f.keys()}
        except Exception as err:  # safetensors raises its own error types on a malformed header
            raise ValueError(f"{path}: not a safetensors file ({err})") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a ClusterPolicy file (format {meta.get('format')!r})")
        sizes = tensors["sizes"].long()
        clf = MetaClassifier(int(meta["hidden_size"]), sizes.numel(), int(meta["hidden_units"]))
        clf.load_state_dict({a[len("classifier."):]: b for a, b in tensors.items()
                             if a.startswith("classifier.")})
        settings = {"fill": meta["fill"], "freq_weight": float(meta["freq_weight"]),
                    "context": meta["context"] == "1", "size_penalty": float(meta["size_penalty"]),
                    **overrides}
        known = ("format", "num_clusters", "hidden_size", "hidden_units", *settings)
        return cls(pad_table(tensors["members"], sizes), clf, capacity, core_ids=tensors["core"].long(),
                   counts=tensors["counts"], prior=tensors["prior"],
                   metadata={a: b for a, b in meta.items() if a not in known}, **settings)

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity}, clusters={self.num_clusters}, core={self.core_ids.numel()}, "
                f"fill={self.fill!r}, context={self.context}, hidden_size={self.hidden_size}")


def pad_table(members: Tensor, sizes: Tensor) -> Tensor:
    """Cluster-major member ids [n] and sizes [k] -> padded table int64 [k, max(sizes)] (-1 padding)."""
    sizes = sizes.long()
    table = torch.full((sizes.numel(), max(1, int(sizes.max()))), -1, dtype=torch.long)
    rank = torch.arange(members.numel()) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    table[torch.repeat_interleave(torch.arange(sizes.numel()), sizes), rank] = members.long()
    return table
