"""Issue 9's two shared jobs: the one EOS rule (`microspec.inputs.eos_ids_of`, `as_id_list`) and the one
teacher-forced target pass (`microspec.lab.teacher`), checked against the model run row by row."""
import pytest
import torch

from microspec.inputs import as_id_list, eos_ids_of
from microspec.lab.drafter_data import special_ids
from microspec.lab.teacher import Teacher, length_batches
from tiny_models import tiny_model


# ---------------------------------------------------------------------------------------------- EOS rule
class _Tok:
    eos_token_id, pad_token_id = 4, None


def test_eos_ids_of_is_the_union_of_generation_config_model_config_and_tokenizer():
    model = tiny_model("llama", eos_token_id=9)
    model.generation_config.eos_token_id = [7, 2, 7]
    assert eos_ids_of(model) == [2, 7, 9]                      # both configs, sorted, distinct
    assert eos_ids_of(model, _Tok()) == [2, 4, 7, 9]
    assert eos_ids_of(model.generation_config) == [2, 7]       # a config alone: its own ids only
    assert eos_ids_of(model.config) == [9]
    assert eos_ids_of(None, _Tok()) == [4] and eos_ids_of(None) == []
    model.generation_config.eos_token_id = torch.tensor([3, 5])
    model.config.eos_token_id = None
    assert eos_ids_of(model) == [3, 5]
    model.generation_config.pad_token_id = None
    assert special_ids(model, _Tok()) == ([3, 4, 5], 3)         # the drafter data's rule; pad: smallest EOS
    model.generation_config.eos_token_id = 2.0
    with pytest.raises(TypeError, match="eos_token_id"):
        eos_ids_of(model)


def test_as_id_list_keeps_order_and_refuses_what_is_not_an_id():
    assert as_id_list([7, 2, 7]) == [7, 2, 7] and as_id_list(None) == [] and as_id_list(3) == [3]
    assert as_id_list(torch.tensor(5)) == [5] and as_id_list(torch.tensor([6, 1])) == [6, 1]
    for bad in (True, [2, 3.0], "2", torch.tensor([2.0])):
        with pytest.raises(TypeError):
            as_id_list(bad)
    with pytest.raises(ValueError, match="eos_token_id 9 out of range"):
        as_id_list([1, 9], vocab_size=9)


# ---------------------------------------------------------------------------------------------- teacher pass
def test_length_batches_respect_the_budget_or_the_old_clustering_rule():
    lengths = [4, 5, 4, 4, 20]
    assert length_batches(lengths, 16) == [[0, 2, 3], [1], [4]]       # 3 x 4 fits, 4 x 5 does not
    assert length_batches(lengths, 16, lookahead=False) == [[0, 2, 3, 1], [4]]   # 4 x (3 + 1) <= 16
    assert length_batches(lengths, 1) == [[0], [2], [3], [1], [4]]


ROWS = [[5, 9, 3], [7, 8, 9, 10, 11, 12, 13], [4], [6, 6, 6, 6]]


def _alone(model, row):
    """The model run on one row, unpadded: final hidden states [n, D] and logits [n, V]."""
    out = model(torch.tensor([row]), output_hidden_states=True)
    return out.hidden_states[-1][0], out.logits[0]


@pytest.mark.parametrize("chunk", [None, 2, 256])
def test_teacher_batches_equal_each_row_run_alone(chunk):
    model = tiny_model("llama")
    teacher = Teacher(model, topk=0 if chunk is None else 3, chunk=chunk)
    seen = []
    for b in teacher.batches(ROWS, length_batches([len(r) for r in ROWS], 12), pad=1):
        assert b.tokens.shape == b.mask.shape == b.hidden.shape[:2] and b.mask.dtype == torch.bool
        for r, i in enumerate(b.rows):
            n = len(ROWS[i])
            assert b.tokens[r, :n].tolist() == ROWS[i] and (b.tokens[r, n:] == 1).all()
            assert b.mask[r].tolist() == [True] * n + [False] * (b.tokens.shape[1] - n)
            hidden, logits = _alone(model, ROWS[i])
            torch.testing.assert_close(b.hidden[r, :n], hidden, rtol=1e-9, atol=1e-9)
            if chunk is None:
                assert b.topk is None
            else:
                assert b.topk[r, :n].tolist() == logits.topk(3, dim=-1).indices.tolist()
            seen.append(i)
    assert sorted(seen) == list(range(len(ROWS)))


def test_teacher_topk_over_a_smaller_vocabulary_and_its_misuse():
    model = tiny_model("llama")
    b = Teacher(model, hidden=False, topk=2, vocab_size=50, chunk=3).run(torch.tensor([ROWS[1]]),
                                                                         torch.ones(1, 7))
    assert b.hidden is None and b.topk.shape == (1, 7, 2) and int(b.topk.max()) < 50
    assert b.topk[0].tolist() == _alone(model, ROWS[1])[1][:, :50].topk(2, dim=-1).indices.tolist()
    with pytest.raises(ValueError, match="chunk"):
        Teacher(model, topk=2)
