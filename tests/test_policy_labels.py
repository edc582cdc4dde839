"""The one label grammar (`microspec.lab.policy_labels`): every form parses and builds the policy it names,
every malformed label is a one-line ValueError naming it, every label the docs show parses, and the command
line's policy names (demo / generate, coverage / tune) map into the grammar."""
import re
from pathlib import Path

import pytest
import torch

from microspec.cli import _common
from microspec.cli import coverage as cli_coverage
from microspec.lab.policy_labels import (PolicyLabel, custom_factory, label_options, parse_label,
                                         policy_from_label)
from microspec.policies import ClusterPolicy, FullVocab, InContextPolicy, StaticFrequencyPolicy, UnionPolicy
from microspec.policies.cluster import MetaClassifier

ROOT = Path(__file__).resolve().parents[1]
V = 100
RANKING = torch.arange(V - 1, -1, -1)                      # id 99 most frequent
SUCCESSORS = torch.randint(-1, V, (V, 4))

PARSED = [
    ("full", PolicyLabel("full")),
    ("static@8", PolicyLabel("static", 8)),
    ("incontext@64", PolicyLabel("incontext", 64)),
    ("incontext@64/k0", PolicyLabel("incontext", 64, topk=0)),
    ("incontext+core@64", PolicyLabel("incontext+core", 64)),
    ("incontext+core16@64", PolicyLabel("incontext+core", 64, core=16)),
    ("incontext+core0@64", PolicyLabel("incontext+core", 64, core=0)),
    ("incontext+core16@64/k7", PolicyLabel("incontext+core", 64, core=16, topk=7)),
    ("incontext+core16@64/k2/s3", PolicyLabel("incontext+core", 64, core=16, topk=2, successors=3)),
    ("incontext@64/s2/k5", PolicyLabel("incontext", 64, topk=5, successors=2)),
    ("incontext@3072/k3/tree/grow", PolicyLabel("incontext", 3072, topk=3, tree=True, grow=True)),
    ("incontext+core8@64/grow", PolicyLabel("incontext+core", 64, core=8, grow=True)),
    ("adaptive@64", PolicyLabel("adaptive", 64)),
    ("adaptive16@64/k2", PolicyLabel("adaptive", 64, core=16, topk=2)),
    ("cluster@8", PolicyLabel("cluster", 8)),
    ("custom@8", PolicyLabel("custom", 8)),
]


@pytest.mark.parametrize("label,expected", PARSED, ids=[x for x, _ in PARSED])
def test_every_form_parses(label, expected):
    assert parse_label(label) == expected
    assert expected.needs_ranking == (expected.kind in ("static", "incontext+core", "adaptive"))


@pytest.fixture
def cluster_file(tmp_path):
    table = torch.tensor([[3, 4, -1], [5, 6, 7], [8, -1, -1]])
    ClusterPolicy(table, MetaClassifier(4, 3), capacity=4).save(tmp_path / "c.safetensors")
    return tmp_path / "c.safetensors"


def _core(policy):
    return None if policy.core_ids is None else policy.core_ids.tolist()


# label -> (type, capacity, what the policy must hold)
BUILT = [
    ("full", FullVocab, None, {}),
    ("static@8", StaticFrequencyPolicy, 8, {}),
    ("incontext@64", InContextPolicy, 64, {"target_topk": 3, "eviction": "lru", "core": None, "succ": 0}),
    ("incontext@64/k0", InContextPolicy, 64, {"target_topk": 0}),
    ("incontext+core@64", InContextPolicy, 64, {"core": RANKING[:16].tolist()}),
    ("incontext+core5@64", InContextPolicy, 64, {"core": RANKING[:5].tolist(), "target_topk": 3}),
    ("incontext+core16@64/k7", InContextPolicy, 64, {"core": RANKING[:16].tolist(), "target_topk": 7}),
    ("incontext+core16@64/k2/s3", InContextPolicy, 64, {"target_topk": 2, "succ": 3}),
    ("incontext@64/s4", InContextPolicy, 64, {"succ": 4}),
    ("incontext@64/k3/tree/grow", InContextPolicy, 64, {"eviction": None, "wants_block": True}),
    ("incontext+core8@64/grow", InContextPolicy, 64, {"eviction": None, "wants_block": False,
                                                      "core": RANKING[:8].tolist()}),
    ("adaptive16@64/k2", UnionPolicy, None, {"target_topk": 2, "wants_block": True}),
    ("cluster@8", ClusterPolicy, 8, {}),
    ("custom@8", InContextPolicy, 8, {"eviction": "fifo", "target_topk": 0}),
]


@pytest.mark.parametrize("label,kind,capacity,holds", BUILT, ids=[b[0] for b in BUILT])
def test_every_form_builds_its_policy(label, kind, capacity, holds, cluster_file):
    def custom(capacity):
        return InContextPolicy(capacity, topk=0, eviction="fifo")
    policy = policy_from_label(label, RANKING, cluster_file, successors=SUCCESSORS, custom=custom)
    assert type(policy) is kind
    if capacity is not None:
        assert policy.capacity == capacity
    for name, value in holds.items():
        if name == "core":
            assert _core(policy) == value
        elif name == "succ":
            assert (policy.successors is None if value == 0
                    else torch.equal(policy.successors, SUCCESSORS[:, :value]))
        else:
            assert getattr(policy, name) == value
    if kind is StaticFrequencyPolicy:
        policy.setup(1, V, [], "cpu")
        assert sorted(policy.active()[0][0].tolist()) == sorted(RANKING[:8].tolist())


def test_builder_defaults_fill_what_the_label_leaves_open():
    p = policy_from_label("incontext+core@64", RANKING, topk=5, core=10, eviction=None)
    assert p.target_topk == 5 and _core(p) == RANKING[:10].tolist() and p.eviction is None
    assert policy_from_label("incontext+core16@64/k1", RANKING, topk=5, core=10).target_topk == 1
    assert _core(policy_from_label("incontext+core16@64", RANKING, core=10)) == RANKING[:16].tolist()
    assert policy_from_label("incontext@8", eviction="fifo").eviction == "fifo"
    assert label_options("incontext+core16@64/k2/s3", 9) == (2, 3)
    assert label_options("static@8", 9) == (9, 0)


BAD = ["", "static", "static@", "static@0", "static@x", "static@-1", "static@8.5", "static@²", "@8",
       "banana@4", "full@8", "full/k3", "incontext+corex@8", "incontext+core-1@8", "incontextx@8",
       "static@8/k3", "cluster@8/s2", "custom@8/k1", "incontext@8/q3", "incontext@8/s", "incontext@8/k",
       "incontext@8/kx", "incontext@8/", "incontext@8/k3@4", "static@8/tree", "incontext@8/trees",
       "adaptive@8/s2", "adaptive@8/tree", "adaptivex@8", "cluster@8/grow"]


@pytest.mark.parametrize("label", BAD)
def test_bad_labels_are_one_line_value_errors(label):
    with pytest.raises(ValueError) as err:
        parse_label(label)
    message = str(err.value)
    assert "\n" not in message and (repr(label) in message or "unknown policy kind" in message), message
    with pytest.raises(ValueError):
        policy_from_label(label, RANKING, successors=SUCCESSORS)


@pytest.mark.parametrize("label,kwargs,fragment", [
    ("static@8", {}, "needs a frequency ranking"),
    ("incontext+core@8", {}, "needs a frequency ranking"),
    ("adaptive@8", {}, "needs a frequency ranking"),
    ("incontext@64/s5", {"successors": SUCCESSORS}, "successor table with >= 5 columns"),
    ("incontext@64/s1", {}, "successor table"),
    ("cluster@8", {}, "--cluster-file"),
    ("custom@8", {}, "--custom MODULE:CALLABLE"),
])
def test_missing_inputs_are_named(label, kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)) as err:
        policy_from_label(label, **kwargs)
    assert "\n" not in str(err.value)


def test_custom_factory_imports_and_checks_what_it_builds():
    make = custom_factory("microspec.policies:InContextPolicy")
    assert isinstance(make(12), InContextPolicy) and make(12).capacity == 12
    with pytest.raises(ValueError, match="returned dict, not a VocabPolicy"):
        custom_factory("builtins:dict")(3)


def test_every_label_in_the_docs_parses():
    pattern = re.compile(r"\b(?:static|incontext(?:\+core\d*)?|adaptive\d*|cluster|custom)@\d+"
                         r"(?:/(?:[ks]\d+|tree|grow))*")
    labels = {m for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
              for m in pattern.findall(path.read_text())}
    assert len(labels) > 5
    for label in sorted(labels):
        parse_label(label)


@pytest.mark.parametrize("name", _common.POLICY_NAMES)
def test_demo_and_generate_names_are_labels(name):
    label = _common.policy_label(name, 256)
    assert parse_label(label).kind == name and label == (name if name == "full" else f"{name}@256")


@pytest.mark.parametrize("name,topk,core,label", [
    ("full", 3, 0, "full"), ("static", 0, 0, "static@64"), ("custom", 0, 0, "custom@64"),
    ("incontext", 0, 0, "incontext@64/k0"), ("incontext", 3, 16, "incontext+core16@64/k3")])
def test_coverage_and_tune_runs_are_labels(name, topk, core, label):
    assert cli_coverage.policy_label(name, 64, topk, core) == label
    spec = parse_label(label)
    assert spec.kind.startswith(name) and spec.core == (core or None)
