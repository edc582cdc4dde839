"""Fitting a `ClusterPolicy`: token clusters (torch k-means), the meta-classifier, and its training data.

* **k-means in torch**: clustering 49k-262k LM-head rows of width 576-8192 into ~1k clusters is a few Lloyd
  iterations of one [N, D] x [D, k] GEMM each, on the GPU when there is one and on the CPU otherwise, with
  the same seeded result (random draws come from a CPU generator). Distances are computed in row chunks, so
  151,936 x 1536 rows against 2048 centroids never materialise the full [N, k] matrix. The algorithm mirrors
  scikit-learn's `KMeans(algorithm="lloyd")` (greedy k-means++, relative `tol`, strict-convergence stop,
  empty clusters re-seeded with the farthest points), the tests' oracle.
* **Cluster tables**: cluster -> member ids, padded [k, S] with -1, members most frequent first (so a cluster
  cut at the capacity keeps its frequent members).
* **Training data** (`collect_states`): the hidden state at position t and the ids t+1..t+W, from a real
  model run teacher-forced over chat-formatted (prompt, response) pairs.
* **Classifier** (`train_classifier`) on "which clusters hold a token of the next W", and
  `fit_cluster_policy`, which ties everything together from plain tensors (the command runs it on SmolLM2,
  the tests on random data of the right shapes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .teacher import Teacher, TeacherBatch, length_batches
from ..policies.cluster import ClusterPolicy, MetaClassifier, pad_table
from ..prompts import chat_rows

_CHUNK_BYTES = 1 << 28  # distance block budget: 256 MiB


# ---------------------------------------------------------------------------------------------- k-means
@dataclass
class KMeansResult:
    centroids: Tensor   # [k, D]
    labels: Tensor      # int64 [N]
    inertia: float      # sum of squared distances to the assigned centroid
    n_iter: int


def _chunk_rows(k: int, itemsize: int, chunk: int | None) -> int:
    return chunk or max(1, _CHUNK_BYTES // max(1, k * itemsize))


def assign(x: Tensor, centroids: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row: labels int64 [N] and squared distances [N] (same dtype as x).

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, evaluated `chunk` rows at a time ([chunk, k] blocks)."""
    N, k = x.shape[0], centroids.shape[0]
    step = _chunk_rows(k, x.element_size(), chunk)
    c2 = (centroids * centroids).sum(1)                                           # [k]
    labels = torch.empty(N, dtype=torch.long, device=x.device)
    dist = torch.empty(N, dtype=x.dtype, device=x.device)
    for s in range(0, N, step):
        xb = x[s: s + step]                                                       # [n, D]
        d = torch.addmm(c2.unsqueeze(0), xb, centroids.T, alpha=-2.0)            # [n, k]
        best, idx = d.min(1)
        labels[s: s + step] = idx
        dist[s: s + step] = (best + (xb * xb).sum(1)).clamp_min_(0)
    return labels, dist


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator | None = None,
                    n_local_trials: int | None = None, chunk: int | None = None) -> Tensor:
    """Greedy k-means++ seeding (scikit-learn's): each new centre is the best of `n_local_trials` candidates
    drawn with probability proportional to the squared distance to the nearest centre so far.
    Returns centroids [k, D]. Random numbers come from the CPU `generator`, so CPU and CUDA agree."""
    N = x.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, {N}] (number of points), got {k}")
    trials = n_local_trials or 2 + int(math.log(k))
    g = generator or torch.Generator().manual_seed(0)
    first = int(torch.randint(N, (1,), generator=g))
    draws = torch.rand(k, trials, generator=g, dtype=torch.float64).to(x.device)   # [k, trials]
    x2 = (x * x).sum(1)                                                           # [N]

    def sq_dist(rows: Tensor) -> Tensor:                                           # [t, D] -> [t, N]
        out = torch.empty(rows.shape[0], N, dtype=x.dtype, device=x.device)
        step = _chunk_rows(rows.shape[0], x.element_size(), chunk)
        r2 = (rows * rows).sum(1, keepdim=True)
        for s in range(0, N, step):
            out[:, s: s + step] = (r2 - 2 * rows @ x[s: s + step].T + x2[s: s + step]).clamp_min_(0)
        return out

    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centers[0] = x[first]
    closest = sq_dist(x[first: first + 1])[0].double()                            # [N]
    for c in range(1, k):
        cum = closest.cumsum(0)                                                    # [N]
        cand = torch.searchsorted(cum, draws[c] * cum[-1]).clamp_(max=N - 1)     # [trials]
        d = torch.minimum(closest, sq_dist(x[cand]).double())                      # [trials, N]
        best = d.sum(1).argmin()
        closest = d[best]
        centers[c] = x[cand[best]]
    return centers


def kmeans(x: Tensor, k: int, *, max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
           init: Tensor | None = None, chunk: int | None = None, progress=None) -> KMeansResult:
    """Lloyd's k-means on the rows of x [N, D] (any device, float32 or float64).

    init: centroids [k, D] to start from (default: greedy k-means++ with a seeded CPU generator).
    tol:  stop when the summed squared centre shift is <= tol * mean per-feature variance (scikit-learn's
          rule); a pass that changes no label also stops. Empty clusters take the points farthest from
          their centres. `progress`: a tqdm bar advanced once per iteration.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float [N, D] matrix, got {tuple(x.shape)} {x.dtype}")
    N = x.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, {N}] (number of points), got {k}")
    g = torch.Generator().manual_seed(seed)
    centers = (init.to(x) if init is not None else kmeans_plusplus(x, k, g, chunk=chunk)).clone()
    if centers.shape != (k, x.shape[1]):
        raise ValueError(f"init must be [{k}, {x.shape[1]}], got {tuple(centers.shape)}")
    tol_abs = float(x.var(0, unbiased=False).mean()) * tol
    old = torch.full((N,), -1, dtype=torch.long, device=x.device)
    strict = False
    for it in range(max_iter):
        labels, dist = assign(x, centers, chunk)
        new = _update(x, labels, dist, k)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if progress is not None:
            progress.update(1)
        if torch.equal(labels, old):
            strict = True
            break
        if shift <= tol_abs:
            break
        old = labels
    if not strict:  # final E-step so that the labels match the returned centroids
        labels, dist = assign(x, centers, chunk)
    return KMeansResult(centers, labels, float(dist.sum()), it + 1)


def _update(x: Tensor, labels: Tensor, dist: Tensor, k: int) -> Tensor:
    """Centroid means; an empty cluster is re-seeded with one of the points farthest from their centre
    (which leaves its old cluster), as scikit-learn does."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)                         # [k]
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        far = torch.topk(dist, empty.numel()).indices                                # farthest points first
        sums.index_add_(0, labels[far], -x[far])
        counts.index_add_(0, labels[far], -torch.ones_like(far, dtype=x.dtype))
        sums[empty], counts[empty] = x[far], 1
    return sums / counts.clamp_min(1).unsqueeze(1)


def cluster_table(labels: Tensor, k: int, ids: Tensor | None = None, counts: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Padded cluster -> ids table. labels int64 [N] (cluster of each point), ids int64 [N] the token id of
    each point (default arange), counts [V] token frequencies used to order members (most frequent first,
    then by id). Returns table int64 [k, S] (-1 padding, S = largest cluster) and sizes int64 [k]."""
    labels = labels.cpu()
    ids = torch.arange(labels.numel()) if ids is None else ids.cpu()
    freq = torch.zeros(labels.numel(), dtype=torch.float64) if counts is None else counts.cpu()[ids].double()
    order = torch.argsort(ids, stable=True)                                          # ties: smaller id first
    order = order[torch.argsort(-freq[order], stable=True)]
    order = order[torch.argsort(labels[order], stable=True)]                          # cluster-major
    sizes = torch.bincount(labels, minlength=k)
    return pad_table(ids[order], sizes), sizes


# ---------------------------------------------------------------------------------------------- features
def token_features(model, kind: str = "lm-head") -> Tensor:
    """Per-token feature rows [V, D], L2-normalised (so k-means groups by direction, as logits do):
    "lm-head" = output head rows, "embedding" = input embedding rows (the same matrix when tied)."""
    if kind == "lm-head":
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(model).__name__} has no output head with a weight; "
                             "use --features embedding")
        w = head.weight
    elif kind == "embedding":
        w = model.get_input_embeddings().weight
    else:
        raise ValueError(f"features must be 'lm-head' or 'embedding', got {kind!r}")
    return F.normalize(w.detach().float(), dim=1)


# ---------------------------------------------------------------------------------------------- data
def _chat_prefix(tokenizer, prompt: str) -> list[int]:
    """Token ids before the response: the chat template with a generation prompt, else the raw prompt."""
    return chat_rows(tokenizer, [prompt])[0]


@dataclass
class States:
    """Training samples from `collect_states`.

    hidden   float32 [N, D]  the model's final hidden state at position t (the input of its LM head)
    windows  int64 [N, W]    token ids t+1..t+W (EOS after the response, then -1)
    docs     list of int64 [L_d] token ids of each document (chat prefix + response + EOS)
    doc, end int64 [N]       sample n's document and context length t+2: what a decoder has committed when
                             it hands the (one token stale) hidden state at t to the policy
    """
    hidden: Tensor
    windows: Tensor
    docs: list
    doc: Tensor
    end: Tensor

    def context_bitmap(self, start: int, stop: int, vocab_size: int) -> Tensor:
        """bool [stop - start, V]: the committed context ids of samples start..stop-1."""
        out = torch.zeros(stop - start, vocab_size, dtype=torch.bool)
        for row, n in enumerate(range(start, stop)):
            ids = self.docs[int(self.doc[n])][: int(self.end[n])]
            out[row, ids[ids < vocab_size]] = True
        return out


def collect_states(model, tokenizer, pairs, *, positions: int, window: int, eos_id: int,
                   max_response: int = 192, batch_tokens: int = 2048, progress=None) -> States:
    """Teacher-forced (hidden state, next W tokens) samples from `model` over (prompt, response) pairs.

    Every response position t gives a sample: the final hidden state at t (the last prompt token's state
    predicts the first response token) and the ids t+1..t+W. Pairs are taken in the given order, each response
    cut at `max_response` tokens and closed with `eos_id`, until `positions` samples exist; prompts go through
    the tokenizer's chat template when it has one. Documents run through `microspec.lab.teacher` (the model's
    own decoder, whose output is the final normed state) in length-sorted, right-padded batches of about
    `batch_tokens` tokens. Returns `States` on the CPU, in pair order.
    """
    docs, total = [], 0
    for prompt, response in pairs:
        if total >= positions:
            break
        prefix = _chat_prefix(tokenizer, prompt)
        resp = tokenizer.encode(response, add_special_tokens=False)[:max_response] + [eos_id]
        docs.append((prefix, resp))
        total += len(resp) - (not prefix)
    if total <= 0:
        raise ValueError("no response tokens in the training pairs")
    out: list = [None] * len(docs)
    rows = [p + r for p, r in docs]
    done = 0
    batches = length_batches([len(r) for r in rows], batch_tokens, lookahead=False)
    for b in Teacher(model).batches(rows, batches):
        for i, res in zip(b.rows, _samples(b, [docs[i] for i in b.rows], window)):
            out[i] = res
        done += sum(len(docs[i][1]) for i in b.rows)
        if progress is not None:
            progress.update(min(done, positions) - progress.n)
    n = [h.shape[0] for h, _, _ in out]
    doc = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(n))[:positions]
    return States(torch.cat([h for h, _, _ in out])[:positions],
                  torch.cat([w for _, w, _ in out])[:positions],
                  [torch.tensor(r) for r in rows], doc, torch.cat([e for _, _, e in out])[:positions])


def _samples(batch: TeacherBatch, docs, window: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """One teacher batch's samples; per doc: hidden [n, D] float32, windows [n, W], context ends [n]."""
    ids = batch.tokens.cpu()                                                          # [B, L]
    results = []
    for i, (p, r) in enumerate(docs):
        length = len(p) + len(r)
        start, stop = max(len(p) - 1, 0), length - 1                                   # t predicts t+1
        t = torch.arange(start, stop)                                                 # [n]
        idx = t.unsqueeze(1) + 1 + torch.arange(window)                               # [n, W]
        padded = torch.cat([ids[i, :length], torch.full((window,), -1, dtype=torch.long)])
        results.append((batch.hidden[i, start:stop].float().cpu(), padded[idx], t + 2))
    return results


# ---------------------------------------------------------------------------------------------- classifier
def window_targets(windows: Tensor, cluster_of: Tensor, k: int) -> Tensor:
    """Multi-hot labels float32 [N, k]: clusters holding a token of each window. windows int64 [N, W]
    (-1 padding), cluster_of int64 [V] (-1: the id is in no cluster, e.g. special or core)."""
    c = torch.where(windows >= 0, cluster_of[windows.clamp_min(0)], -1)
    c = torch.where(c >= 0, c, k)                                                     # k: sink column
    out = torch.zeros(windows.shape[0], k + 1, device=windows.device)
    return out.scatter_(1, c, 1.0)[:, :k]


def train_classifier(hidden: Tensor, windows: Tensor, cluster_of: Tensor, k: int, *, hidden_units: int = 0,
                     loss: str = "softmax", epochs: int = 4, batch_size: int = 256, lr: float = 2e-3,
                     weight_decay: float = 1e-4, seed: int = 0, device="cpu",
                     progress=None) -> MetaClassifier:
    """Fit a `MetaClassifier` hidden [N, D] -> k cluster logits on `window_targets` labels.

    loss "softmax": cross-entropy against the label set normalised to a distribution (the clusters compete
    for probability mass, which is what ranking them for a fixed budget needs); "bce": one independent
    binary question per cluster. AdamW, cosine decay, seeded shuffling. Few epochs on purpose: samples of
    one document share their labels, so the classifier memorises documents quickly (on SmolLM2, 12 epochs
    covered less held-out text than 4)."""
    if loss not in ("softmax", "bce"):
        raise ValueError(f"loss must be 'softmax' or 'bce', got {loss!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = MetaClassifier(hidden.shape[1], k, hidden_units)
    clf.mean.copy_(hidden.mean(0))
    clf.inv_std.copy_(hidden.std(0).clamp_min(1e-6).reciprocal())
    clf.to(device).train()
    hidden, windows, cluster_of = hidden.to(device), windows.to(device), cluster_of.to(device)
    N = hidden.shape[0]
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * math.ceil(N / batch_size)))
    for _ in range(epochs):
        for idx in torch.randperm(N, generator=g).to(device).split(batch_size):
            logits = clf(hidden[idx])                                                  # [b, k]
            target = window_targets(windows[idx], cluster_of, k)                       # [b, k]
            if loss == "bce":
                value = F.binary_cross_entropy_with_logits(logits, target)
            else:
                dist = target / target.sum(1, keepdim=True).clamp_min(1)
                value = -(dist * F.log_softmax(logits, 1)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress.update(1)
    return clf.eval().requires_grad_(False)


def window_recall(sets: Tensor, windows: Tensor) -> tuple[int, int]:
    """(hits, total) of window tokens [N, w] (-1 ignored) that lie in the id sets [N, C] (-1 ignored)."""
    valid = windows >= 0
    hit = ((windows.unsqueeze(-1) == sets.unsqueeze(1)) & (sets >= 0).unsqueeze(1)).any(-1) & valid
    return int(hit.sum()), int(valid.sum())


# ---------------------------------------------------------------------------------------------- end to end
def fit_cluster_policy(features: Tensor, hidden: Tensor, windows: Tensor, *, num_clusters: int,
                       capacity: int, counts: Tensor | None = None, special_ids=(), core_size: int = 0,
                       min_count: int = 1, hidden_units: int = 0, loss: str = "softmax", epochs: int = 4,
                       seed: int = 0, device="cpu", metadata: dict | None = None, progress=None,
                       **policy_kwargs) -> ClusterPolicy:
    """Clusters + classifier from plain tensors -> a `ClusterPolicy`.

    features [V, F] token features (`token_features`); hidden [N, D] and windows [N, W] from
    `collect_states`; counts [V] token frequencies (default: counted over `windows`). The core is the
    `core_size` most frequent non-special ids; the clustered ids are the other non-special ids seen at
    least `min_count` times (0: every id), so clusters, core and specials are disjoint. `progress(name,
    total)` may return a tqdm bar for the "k-means" and "classifier" phases. `policy_kwargs` go to
    `ClusterPolicy` (fill, freq_weight, context, size_penalty).
    """
    V = features.shape[0]
    if counts is None:
        w = windows[windows >= 0]
        counts = torch.bincount(w[w < V], minlength=V)
    counts = counts.double().cpu()
    special = torch.as_tensor(list(special_ids), dtype=torch.long)
    ranked = torch.argsort(-counts, stable=True)
    ranked = ranked[~torch.isin(ranked, special)]
    core = ranked[:core_size][counts[ranked[:core_size]] > 0]
    ids = ranked[core.numel():]
    ids = ids[counts[ids] >= min_count].sort().values                                # clustered ids [n]
    if ids.numel() == 0:
        raise ValueError(f"no token id left to cluster (min_count={min_count}, core_size={core_size})")
    k = min(num_clusters, ids.numel())
    bar = progress("k-means", 100) if progress else None
    km = kmeans(features[ids].to(device), k, max_iter=100, seed=seed, progress=bar)
    table, _ = cluster_table(km.labels, k, ids=ids, counts=counts)
    cluster_of = torch.full((V,), -1, dtype=torch.long)
    cluster_of[ids] = km.labels.cpu()
    bar = progress("classifier", epochs * math.ceil(hidden.shape[0] / 256)) if progress else None
    clf = train_classifier(hidden, windows, cluster_of, k, hidden_units=hidden_units, loss=loss,
                           epochs=epochs, seed=seed, device=device, progress=bar)
    prior = torch.zeros(k, dtype=torch.float64).index_add_(0, km.labels.cpu(), counts[ids])
    meta = {"num_clustered": ids.numel(), "kmeans_inertia": f"{km.inertia:.6g}", "kmeans_iters": km.n_iter,
            "loss": loss, "seed": seed, **(metadata or {})}
    return ClusterPolicy(table, clf.cpu(), capacity, core_ids=core, counts=counts[table[table >= 0]].float(),
                         prior=prior.float(), metadata=meta, **policy_kwargs)
