"""`microspec.lab.clustering`: torch k-means against scikit-learn, cluster tables, training data, classifier.

scikit-learn's `KMeans(algorithm="lloyd")` is the oracle: from the same initial centroids our Lloyd loop must
reach the same labels, inertia and iteration count (float64, so no near-tie decides differently); from its
own k-means++ seeding our inertia must be no worse than scikit-learn's by more than a small margin.
"""
import pytest
import torch

from microspec.lab.clustering import (assign, cluster_table, collect_states, fit_cluster_policy, kmeans,
                                  kmeans_plusplus, train_classifier, window_recall, window_targets)
from tiny_models import tiny_model



@pytest.fixture
def sk():
    return pytest.importorskip("sklearn.cluster")


def blobs(n=1200, d=6, centers=15, spread=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centers, d, generator=g, dtype=dtype) * 4
    return (mu[torch.randint(centers, (n,), generator=g)]
            + spread * torch.randn(n, d, generator=g, dtype=dtype))


def sklearn_fit(sk, x, k, init, **kw):
    return sk.KMeans(k, init=init.numpy(), n_init=1, algorithm="lloyd", **kw).fit(x.numpy())


@pytest.mark.parametrize("chunk", [None, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_lloyd_matches_sklearn_from_the_same_init(sk, chunk, seed):
    x = blobs(seed=seed, spread=2.0)                       # overlapping blobs: many iterations
    k = 12
    init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]]
    ours = kmeans(x, k, init=init, chunk=chunk)
    ref = sklearn_fit(sk, x, k, init)
    assert ours.n_iter == ref.n_iter_ and ours.n_iter > 2
    assert torch.equal(ours.labels, torch.from_numpy(ref.labels_).long())
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-9)
    assert torch.allclose(ours.centroids, torch.from_numpy(ref.cluster_centers_), atol=1e-8)


def test_tolerance_stop_matches_sklearn(sk):
    x = blobs(n=2000, spread=3.0, seed=3)
    init = x[:20]
    ours = kmeans(x, 20, init=init, tol=1e-2)
    ref = sklearn_fit(sk, x, 20, init, tol=1e-2)
    assert ours.n_iter == ref.n_iter_
    assert torch.equal(ours.labels, torch.from_numpy(ref.labels_).long())


def test_empty_cluster_is_reseeded_like_sklearn(sk):
    x = blobs(n=600, seed=4)
    init = torch.cat([x[:5], torch.full((1, x.shape[1]), 1e3, dtype=x.dtype)])   # far away: starts empty
    ours = kmeans(x, 6, init=init)
    ref = sklearn_fit(sk, x, 6, init)
    assert torch.bincount(ours.labels, minlength=6).min() > 0
    assert torch.equal(ours.labels, torch.from_numpy(ref.labels_).long())
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-9)


def test_kmeans_plusplus_is_as_good_as_sklearns(sk):
    ours, theirs = [], []
    for seed in range(4):
        x = blobs(n=1500, d=8, centers=30, spread=1.5, seed=seed)
        ours.append(kmeans(x, 30, seed=seed).inertia)
        theirs.append(sk.KMeans(30, n_init=1, random_state=seed).fit(x.numpy()).inertia_)
    assert sum(ours) <= 1.03 * sum(theirs), (ours, theirs)


def test_kmeans_plusplus_is_seeded_and_picks_data_points():
    x = blobs(n=300)
    a = kmeans_plusplus(x, 10, torch.Generator().manual_seed(5))
    b = kmeans_plusplus(x, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert ((a.unsqueeze(1) == x.unsqueeze(0)).all(-1).any(1)).all()     # every centre is a data point
    assert len({tuple(r.tolist()) for r in a}) == 10


def test_assign_is_chunk_independent_and_exact():
    x, c = blobs(n=257, d=5, seed=6), blobs(n=9, d=5, seed=7)
    labels, dist = assign(x, c, chunk=10)
    brute = ((x.unsqueeze(1) - c.unsqueeze(0)) ** 2).sum(-1)                   # [N, k]
    assert torch.equal(labels, brute.argmin(1))
    assert torch.allclose(dist, brute.min(1).values)


@pytest.mark.gpu
def test_kmeans_on_cuda_matches_cpu():
    x = blobs(n=3000, d=16, centers=40, spread=1.5, seed=8)
    cpu, gpu = kmeans(x, 40, seed=2), kmeans(x.cuda(), 40, seed=2, chunk=100)
    assert torch.equal(cpu.labels, gpu.labels.cpu())
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-9)


def test_bad_kmeans_inputs():
    x = blobs(n=10)
    for bad in (lambda: kmeans(x, 0), lambda: kmeans(x, 11), lambda: kmeans(x.long(), 2),
                lambda: kmeans(x, 3, init=x[:2])):
        with pytest.raises(ValueError):
            bad()


def test_cluster_table_orders_members_by_frequency():
    labels = torch.tensor([1, 0, 1, 1, 2, 0])
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    counts = torch.zeros(20)
    counts[[10, 12, 13, 11, 15]] = torch.tensor([1.0, 5.0, 5.0, 2.0, 3.0])
    table, sizes = cluster_table(labels, 4, ids=ids, counts=counts)
    assert sizes.tolist() == [2, 3, 1, 0]
    assert table.tolist() == [[15, 11, -1], [12, 13, 10], [14, -1, -1], [-1, -1, -1]]


def test_window_targets_and_recall():
    cluster_of = torch.tensor([-1, 0, 0, 1, 2, -1])
    windows = torch.tensor([[1, 3, -1], [5, 0, 4]])
    assert window_targets(windows, cluster_of, 3).tolist() == [[1, 1, 0], [0, 0, 1]]
    sets = torch.tensor([[1, 2, -1], [4, 5, 0]])
    assert window_recall(sets, windows) == (1 + 3, 2 + 3)


class _ByteTokenizer:
    """Characters -> ids 3 + (ord % 100); no chat template (the prompt is used raw)."""
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 100 for c in text]


def test_collect_states_gives_the_lm_head_input_and_the_next_tokens():
    model = tiny_model("llama", vocab_size=131)
    tok = _ByteTokenizer()
    pairs = [("ab", "hello"), ("xyz", "no"), ("", "qrstuvw")]
    st = collect_states(model, tok, pairs, positions=100, window=3, eos_id=2, batch_tokens=16)
    # one sample per response token (+ EOS), minus the first position of the empty prompt
    assert st.hidden.shape == (6 + 3 + 7, 32) and st.windows.shape == (16, 3)
    assert st.windows[0].tolist() == tok.encode("hel") and st.windows[5].tolist() == [2, -1, -1]
    assert st.doc.tolist() == [0] * 6 + [1] * 3 + [2] * 7
    ids = torch.tensor([tok.encode("ab" + "hello") + [2]])
    logits = model(ids).logits[0]                                     # [L, V]
    head = model.get_output_embeddings().weight
    assert torch.allclose(st.hidden[:6].double() @ head.T, logits[1:7], atol=1e-4)
    # the context committed when the state at t is handed over: tokens 0..t+1 ("ab" + "h" for t = 1)
    seen = st.context_bitmap(0, 2, 131)
    assert seen[0].nonzero().flatten().tolist() == sorted(set(tok.encode("abh")))
    assert seen[1].sum() == len(set(tok.encode("abhe")))
    first = collect_states(model, tok, pairs, positions=4, window=3, eos_id=2)
    assert first.hidden.shape[0] == 4 and torch.allclose(first.hidden, st.hidden[:4], atol=1e-5)


def test_classifier_learns_a_separable_routing_task():
    """Context i (a noisy prototype) is always followed by tokens of cluster i % k: top-1 accuracy near 1."""
    g = torch.Generator().manual_seed(123)    # not the classifier's init seed: same stream, correlated draws
    k, D, N = 8, 16, 2000
    proto = torch.randn(k, D, generator=g) * 3
    ctx = torch.randint(k, (N,), generator=g)
    hidden = proto[ctx] + torch.randn(N, D, generator=g)
    cluster_of = torch.arange(40) % k
    windows = (ctx.unsqueeze(1) + k * torch.randint(5, (N, 3), generator=g))          # ids of cluster ctx
    for loss in ("softmax", "bce"):
        clf = train_classifier(hidden, windows, cluster_of, k, epochs=4, loss=loss, batch_size=64)
        acc = (clf(hidden).argmax(1) == ctx).float().mean()
        assert acc > 0.9, (loss, acc)              # chance: 1/8


def test_fit_cluster_policy_partitions_the_fitted_vocabulary():
    g = torch.Generator().manual_seed(0)
    V, D = 60, 8
    windows = torch.randint(0, 50, (300, 4), generator=g)              # ids 50..59 never seen
    policy = fit_cluster_policy(torch.randn(V, 5, generator=g), torch.randn(300, D, generator=g), windows,
                                num_clusters=7, capacity=20, special_ids=[2], core_size=5, epochs=1)
    members = policy.members.tolist()
    assert len(members) == len(set(members)) == 50 - 5 - 1             # seen ids minus core minus EOS
    assert max(members) < 50 and 2 not in members
    assert not set(policy.core_ids.tolist()) & set(members) and policy.core_ids.numel() == 5
    assert policy.num_clusters == 7 and policy.hidden_size == D


def _cli_args(tmp_path, *extra):
    import argparse

    from microspec.cli import fit_clusters
    parser = argparse.ArgumentParser()
    fit_clusters.register(parser.add_subparsers())
    return parser.parse_args(["fit-clusters", "--out", str(tmp_path / "c.safetensors"), "--clusters", "8",
                              "--positions", "80", "--holdout-positions", "30", "--core", "4",
                              "--epochs", "1", "--report-capacity", "12", "40", "--no-progress", *extra])


def test_fit_clusters_command_pipeline(tmp_path):
    """The command's pipeline on a tiny model: a saved policy that loads, and a report in [0, 1]."""
    from microspec.cli import fit_clusters
    from microspec.policies.cluster import ClusterPolicy
    args = _cli_args(tmp_path)
    words = ["alpha beta", "gamma delta epsilon", "zeta eta", "theta iota kappa lambda"]
    train = [(f"q{i}", words[i % 4] * 3) for i in range(12)]
    held = [(f"h{i}", words[(i + 1) % 4] * 2) for i in range(5)]
    policy, rows, timings = fit_clusters.fit(tiny_model("llama"), _ByteTokenizer(), train, held, args, "cpu")
    assert [r["capacity"] for r in rows] == [12, 40] and rows[0]["tokens"] > 0
    for r in rows:
        assert all(0 <= r[name] <= 1 for name in fit_clusters.COLUMNS)
    assert rows[1]["static"] >= rows[0]["static"]                    # a bigger list covers at least as much
    policy.save(args.out)
    text = fit_clusters.format_report(rows, timings, args, policy, 123)
    assert "static+ctx" in text and "routed+ctx" in text
    loaded = ClusterPolicy.load(args.out, capacity=16)
    assert loaded.num_clusters == 8 and loaded.hidden_size == 32 and loaded.core_ids.numel() == 4


@pytest.mark.parametrize("extra,error", [(("--window", "4"), ValueError), (("--clusters", "0"), ValueError),
                                         (("--holdout", "1.5"), ValueError),
                                         (("--model", "/nope/m.gguf"), FileNotFoundError)])
def test_fit_clusters_command_rejects_bad_arguments(tmp_path, extra, error):
    args = _cli_args(tmp_path, *extra)
    with pytest.raises(error):
        args.func(args)
    bad_out = _cli_args(tmp_path)
    bad_out.out = str(tmp_path / "missing" / "c.safetensors")
    with pytest.raises(FileNotFoundError):
        bad_out.func(bad_out)
