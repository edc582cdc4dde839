"""Issue 10 on the parts below `SpecDecoder`: policies, token maps, kernels, the sampling guard, GGUF loading.

Each test names the issue item it covers. "Refused" means a TypeError / ValueError with a one-line message
that names the value, raised where the input first arrives (a constructor, `setup`, a loader), never a
silent coercion (2.7 -> 2), a wrong token (0) or an out-of-bounds read.
"""
from __future__ import annotations

import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from microspec.inputs import as_token_ids, unique_stable
from microspec.models.loading import load_gguf
from microspec.policies import (ClusterPolicy, InContextPolicy, StaticFrequencyPolicy, load_token_map,
                                ranked_ids_from_counts, save_token_map)
from microspec.policies.cluster import MetaClassifier
from microspec.sampling import SamplingConfig, invalid_rows, safe_softmax

INF, NAN = float("inf"), float("nan")


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, f"message spans lines: {text!r}"
    return text


# ------------------------------------------------------------------ item 3: negative / out-of-range core ids
@pytest.mark.parametrize("core", [[-1, 4], [3, -7], torch.tensor([-2])])
def test_item3_negative_core_ids_are_refused(core):
    with pytest.raises(ValueError, match="core_ids must be >= 0") as err:
        InContextPolicy(capacity=8, topk=0, core_ids=core)
    _one_line(err)


def test_item3_core_ids_beyond_the_vocabulary_are_refused_at_setup():
    policy = InContextPolicy(capacity=8, topk=0, core_ids=[3, 99])
    with pytest.raises(ValueError, match="core_ids has id 99 >= vocab_size 50"):
        policy.setup(1, 50, [0], "cpu")


def test_item3_cluster_policy_refuses_negative_core_ids():
    table = torch.tensor([[3, 4], [5, 6]])
    with pytest.raises(ValueError, match="core_ids must be >= 0"):
        ClusterPolicy(table, MetaClassifier(4, 2), capacity=4, core_ids=[-3])


# ------------------------------------------------------------------ item 6: no silent coercion of ids, counts
@pytest.mark.parametrize("ids", [[1.0, 2.0], [3, 2.7], torch.tensor([1.0, 2.0]), [True, 2], "12"])
def test_item6_float_or_bool_ids_are_refused_not_truncated(ids):
    with pytest.raises(TypeError, match="integers|int tensor"):
        StaticFrequencyPolicy(ids, capacity=2)
    with pytest.raises(TypeError, match="integers|int tensor"):
        InContextPolicy(capacity=4, core_ids=ids)


@pytest.mark.parametrize("kwargs,err", [({"capacity": True}, TypeError), ({"capacity": 2.0}, TypeError),
                                        ({"topk": True}, TypeError), ({"topk": 1.5}, TypeError),
                                        ({"successors": torch.zeros(4, 2)}, TypeError),
                                        ({"successors": [[1, 2]]}, TypeError)])
def test_item6_policy_arguments_are_not_coerced(kwargs, err):
    with pytest.raises(err):
        InContextPolicy(**{"capacity": 8, **kwargs})


@pytest.mark.parametrize("counts", [torch.tensor([1.0, INF, 2.0]), torch.tensor([1.0, NAN]),
                                    torch.tensor([3.0, -1.0])])
def test_item6_infinite_nan_or_negative_counts_are_refused(counts):
    with pytest.raises(ValueError, match="finite and non-negative"):
        ranked_ids_from_counts(counts)
    with pytest.raises(ValueError, match="finite and non-negative"):
        StaticFrequencyPolicy.from_counts(counts, capacity=2)


def test_item6_float_d2t_offsets_and_inf_counts_in_files_are_refused(tmp_path):
    save_file({"d2t": torch.tensor([0.0, 2.5])}, tmp_path / "d2t.safetensors")
    with pytest.raises(ValueError, match="d2t offsets must be a 1-D integer tensor"):
        load_token_map(tmp_path / "d2t.safetensors")
    save_file({"counts": torch.tensor([1.0, INF])}, tmp_path / "counts.safetensors")
    with pytest.raises(ValueError, match="finite"):
        load_token_map(tmp_path / "counts.safetensors")


def test_special_ids_and_sizes_in_setup_are_checked():
    policy = InContextPolicy(capacity=8, topk=0)
    for args, err in [((0, 50, [0], "cpu"), ValueError), ((1, 50, [2.0], "cpu"), TypeError),
                      ((1, 50, [-1], "cpu"), ValueError), ((1, True, [0], "cpu"), TypeError),
                      ((1, 50, [0], "nowhere"), ValueError)]:
        with pytest.raises(err):
            policy.setup(*args)


# -------------------------------------------------------------- item 10: a policy too big for the vocabulary
def test_item10_target_topk_larger_than_the_vocabulary_is_refused_at_setup():
    with pytest.raises(ValueError, match="top-500 ids, but the vocabulary has only 97"):
        InContextPolicy(capacity=8, topk=500).setup(1, 97, [0], "cpu")


# ------------------------------------------------------------------ item 1 (files), 9, 11: token maps
def test_item1_maps_with_duplicates_load_and_save_each_id_once(tmp_path):
    (tmp_path / "dup.json").write_text("[5, 3, 5, 1, 3]")
    assert load_token_map(tmp_path / "dup.json").tolist() == [5, 3, 1]
    for suffix in (".pt", ".json", ".txt", ".safetensors"):
        path = save_token_map([9, 4, 9, 9, 2, 4], tmp_path / f"out{suffix}")
        assert load_token_map(path).tolist() == [9, 4, 2]
    raw = (tmp_path / "out.txt").read_text().split()
    assert raw == ["9", "4", "2"], "the file itself must hold each id once"


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_item9_corrupt_safetensors_map_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "map.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a token map") as err:
        load_token_map(path)
    _one_line(err)


def test_item11_empty_text_map_says_empty(tmp_path):
    for name, text in (("empty.txt", ""), ("blank.txt", "  \n \n"), ("empty.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="empty token map") as err:
            load_token_map(tmp_path / name)
        assert "float" not in _one_line(err)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_item11_pickled_code_is_refused_in_one_line(tmp_path, protocol, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(_Evil(), f, protocol=protocol)
    with pytest.warns() if protocol == 4 else _nothing():
        with pytest.raises(ValueError, match="refused by torch.load\\(weights_only=True\\)") as err:
            load_token_map(path)
    text = _one_line(err)
    assert "never code" in text and len(text) < 400
    assert "code ran" not in capsys.readouterr().out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------ item 9: GGUF with a truncated header
@pytest.mark.parametrize("content,match", [
    (b"GGUF" + struct.pack("<I", 3) + b"\x01\x00", "truncated GGUF file"),
    (b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + b"\x05\x00\x00", "corrupt or truncated GGUF file"),
    (b"GGUF" + struct.pack("<IQQ", 99, 0, 0), "unsupported GGUF version 99"),
    (b"PK\x03\x04" + bytes(40), "not a GGUF file")])
def test_item9_broken_gguf_is_a_one_line_error(tmp_path, content, match):
    pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        load_gguf(path)
    _one_line(err)


# ------------------------------------------------------------------ item 4: +inf / all -inf target logits
ROWS = torch.tensor([[0.0, 1.0, -2.0],          # fine
                     [0.0, INF, 1.0],           # +inf: softmax gives NaN
                     [-INF, -INF, -INF],        # no finite logit
                     [NAN, 0.0, 1.0],           # NaN
                     [-INF, 3.0, -INF]])        # one finite logit: fine


def _multinomial_raises(row: torch.Tensor) -> bool:
    try:
        torch.multinomial(torch.softmax(row.double(), -1), 1)
        return False
    except RuntimeError:
        return True


def test_item4_invalid_rows_are_exactly_the_rows_multinomial_refuses():
    flagged = invalid_rows(ROWS, SamplingConfig(do_sample=True)).tolist()
    assert flagged == [_multinomial_raises(r) for r in ROWS] == [False, True, True, True, False]
    # greedy takes the argmax of +inf / all -inf rows as transformers does: only NaN is flagged
    assert invalid_rows(ROWS, SamplingConfig()).tolist() == [False, False, False, True, False]


def test_item4_temperature_overflow_is_flagged_like_transformers():
    """logits / temperature overflowing to +-inf makes transformers' softmax NaN, so multinomial raises."""
    cfg = SamplingConfig(do_sample=True, temperature=1e-40)
    rows = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.0, 0.0]])
    scaled = rows / 1e-40
    assert invalid_rows(rows, cfg).tolist() == [_multinomial_raises(r) for r in scaled] == [True, True, False]


def test_item4_no_silent_token_zero_from_an_invalid_row():
    """What the engine must not do: treat such a row as a distribution. safe_softmax of an all -inf row has
    no mass (the caller must flag it); of a +inf row it is NaN, never a valid-looking distribution."""
    probs, has_mass = safe_softmax(ROWS[1:3].double())
    assert torch.isnan(probs[0]).any() and not has_mass[1]


# ------------------------------------------------------------------ helpers of microspec.inputs
def test_as_token_ids_refuses_rather_than_coerces():
    assert as_token_ids([3, 1]).tolist() == [3, 1]
    assert as_token_ids(torch.tensor([3, 1], dtype=torch.int32)).dtype == torch.int64
    for bad, err in [([1.5], TypeError), ([[1, 2]], TypeError),
                     (torch.ones(2, 2, dtype=torch.long), ValueError),
                     ([], ValueError), ([-1], ValueError), (3, TypeError),
                     (torch.tensor([True]), TypeError)]:
        with pytest.raises(err):
            as_token_ids(bad)
    assert unique_stable(torch.tensor([7, 8, 7, 9, 8])).tolist() == [7, 8, 9]
