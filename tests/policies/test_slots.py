"""`SlotTable` against a pure-Python reference: after every step the slots hold exactly the reference's ids at
the reference's slots, so a resident id keeps its slot, the set equals the reference set and the capacity
holds; `slot_of` is the inverse of `ids`; the sink columns never leak into the live slots."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from microspec.policies.slots import SlotTable


class Reference:
    """One row: slot -> id (None: empty) in a Python list."""

    def __init__(self, slots: int):
        self.at: list[int | None] = [None] * slots

    def slot(self, token: int) -> int:
        return self.at.index(token) if token in self.at else -1

    def add(self, new: list[int], order: list[int], room: int) -> None:
        """The r-th new id (r < room) takes slot order[r], evicting its occupant."""
        for r, token in enumerate(new[:room]):
            self.at[order[r]] = token

    def replace(self, cand: list[int]) -> None:
        """Slots [0, n) hold exactly cand: residents stay, new ids fill the vacated slots in slot order."""
        n = len(cand)
        vacated = [s for s in range(n) if self.at[s] not in cand]
        for s, token in zip(vacated, [t for t in cand if t not in self.at[:n]]):
            self.at[s] = token


def check(table: SlotTable, refs: list[Reference], before: list[list]) -> None:
    ids, slot_of = table.ids[:, : table.slots].tolist(), table.slot_of[:, : table.vocab_size].tolist()
    for row, ref in enumerate(refs):
        assert ids[row] == [-1 if t is None else t for t in ref.at]
        live = [t for t in ids[row] if t >= 0]
        assert len(live) == len(set(live)) <= table.slots
        assert slot_of[row] == [ref.slot(v) for v in range(table.vocab_size)]
        for s, token in enumerate(before[row]):              # a resident that stays keeps its slot
            if token is not None and token in ref.at:
                assert ref.at[s] == token


@st.composite
def shapes(draw):
    rows, slots = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    return rows, slots, draw(st.integers(slots + 1, 16))


@given(shapes(), st.data())
def test_take_and_install_match_the_reference(shape, data):
    rows, S, V = shape
    table, refs = SlotTable(rows, S, V, torch.device("cpu")), [Reference(S) for _ in range(rows)]
    for _ in range(data.draw(st.integers(1, 6))):
        M = data.draw(st.integers(1, min(2 * S, V)))
        cand = [data.draw(st.lists(st.integers(0, V - 1), min_size=M, max_size=M, unique=True)) for _ in refs]
        x = torch.tensor(cand)
        new = table.lookup(x) < 0
        assert new.tolist() == [[ref.slot(t) < 0 for t in c] for ref, c in zip(refs, cand)]
        # slots ranked: free ones first (slot order), then occupied ones in a drawn eviction order
        orders, rooms = [], []
        for ref in refs:
            free = [s for s in range(S) if ref.at[s] is None]
            used = data.draw(st.permutations([s for s in range(S) if ref.at[s] is not None]))
            orders.append(free + used)
            rooms.append(data.draw(st.integers(0, S)))
        before = [list(ref.at) for ref in refs]
        dest, ok = table.take(new, torch.tensor(orders), torch.tensor(rooms).unsqueeze(1))
        table.install(x, dest, ok)
        for ref, c, n, order, room in zip(refs, cand, new.tolist(), orders, rooms):
            ref.add([t for t, is_new in zip(c, n) if is_new], order, room)
        assert (ok.sum(1) <= torch.tensor(rooms)).all()
        assert (dest[~ok] == S).all()
        check(table, refs, before)


@given(shapes(), st.data())
def test_replace_matches_the_reference(shape, data):
    rows, S, V = shape
    n = data.draw(st.integers(0, S))
    table, refs = SlotTable(rows, S, V, torch.device("cpu")), [Reference(S) for _ in range(rows)]
    first = [data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n, unique=True)) for _ in refs]
    table.reset(torch.tensor(first, dtype=torch.long).reshape(rows, n))
    for ref, c in zip(refs, first):
        ref.at[:n] = c
    check(table, refs, [[None] * S for _ in refs])
    for _ in range(data.draw(st.integers(1, 6))):
        cand = [data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n, unique=True)) for _ in refs]
        before = [list(ref.at) for ref in refs]
        table.replace(torch.tensor(cand, dtype=torch.long).reshape(rows, n))
        for ref, c in zip(refs, cand):
            ref.replace(c)
            assert set(ref.at[:n]) == set(c)
        check(table, refs, before)


def test_reset_broadcasts_one_id_list_to_every_row():
    table = SlotTable(2, 4, 10, torch.device("cpu"))
    table.reset(torch.tensor([7, 3]))
    assert table.ids.tolist() == [[7, 3, -1, -1, -1]] * 2
    assert table.lookup(torch.tensor([[3, 7, 5]] * 2)).tolist() == [[1, 0, -1]] * 2
