"""StaticFrequencyPolicy and the token-map formats peers use (FR-Spec/SGLang .pt, JSON, text, safetensors)."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from microspec.policies import StaticFrequencyPolicy, load_token_map, ranked_ids_from_counts, save_token_map


def active(policy, vocab=50, special=(3,)):
    policy.setup(2, vocab, list(special), "cpu")
    ids, n = policy.active()
    return ids[0, : int(n[0])].tolist()


def test_top_capacity_by_count_sorted_with_eos_forced():
    counts = torch.zeros(50)
    counts[[10, 20, 30, 40]] = torch.tensor([4.0, 9.0, 1.0, 7.0])
    assert active(StaticFrequencyPolicy.from_counts(counts, capacity=3)) == [3, 20, 40]


def test_ties_go_to_the_lower_id_and_zero_counts_never_enter():
    assert ranked_ids_from_counts(torch.tensor([1, 0, 1, 2])).tolist() == [3, 0, 2]
    policy = StaticFrequencyPolicy.from_counts(torch.tensor([0, 0, 5] + [0] * 47), capacity=10)
    assert active(policy) == [2, 3]


def test_duplicates_keep_their_best_rank():
    policy = StaticFrequencyPolicy([7, 8, 7, 9, 8], capacity=3)
    assert policy.ranked_ids.tolist() == [7, 8, 9]
    assert active(policy) == [3, 7, 8]


def test_shared_across_rows():
    policy = StaticFrequencyPolicy([5, 6], capacity=3)
    policy.setup(4, 50, [3], "cpu")
    assert policy.active()[0].shape == (1, 3)


@pytest.mark.parametrize("suffix", [".pt", ".json", ".txt", ".safetensors"])
def test_token_map_round_trip(tmp_path, suffix):
    ids = torch.tensor([5, 1, 9, 2])
    path = save_token_map(ids, tmp_path / f"map{suffix}")
    assert load_token_map(path).tolist() == ids.tolist()
    assert active(StaticFrequencyPolicy.from_file(path, capacity=3)) == [1, 3, 5]


def test_fr_spec_style_pt_list_and_counts_and_d2t(tmp_path):
    torch.save([4, 2, 8], tmp_path / "freq_3.pt")                      # a plain list, as some dumps are
    assert load_token_map(tmp_path / "freq_3.pt").tolist() == [4, 2, 8]
    save_file({"counts": torch.tensor([0.0, 3.0, 0.0, 5.0])}, tmp_path / "counts.safetensors")
    assert load_token_map(tmp_path / "counts.safetensors").tolist() == [3, 1]
    save_file({"d2t": torch.tensor([0, 2, 5])}, tmp_path / "eagle3.safetensors")   # EAGLE-3 offsets
    assert load_token_map(tmp_path / "eagle3.safetensors").tolist() == [0, 3, 7]
    (tmp_path / "ids.txt").write_text("1, 2,3\n4 5")
    assert load_token_map(tmp_path / "ids.txt").tolist() == [1, 2, 3, 4, 5]


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("content,match", [
    ("", "empty"), ("1 two 3", "not a token map"), ("[1.5, 2.0]", "integers"), ("-1 4", "negative")])
def test_bad_token_map_text(tmp_path, content, match):
    path = tmp_path / ("map.json" if content.startswith("[") else "map.txt")
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_token_map(path)


def test_missing_file_and_pickled_code_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_token_map(tmp_path / "nope.pt")
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(ValueError, match="not a token map"):
        load_token_map(path)


def test_ids_beyond_the_vocabulary_raise_at_setup():
    with pytest.raises(ValueError, match="vocab_size"):
        StaticFrequencyPolicy([1, 2, 99], capacity=3).setup(1, 50, [3], "cpu")


@pytest.mark.parametrize("ids", [[], [-2, 4]])
def test_empty_or_negative_id_lists_raise(ids):
    with pytest.raises(ValueError):
        StaticFrequencyPolicy(ids)
