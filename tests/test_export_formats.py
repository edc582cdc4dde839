"""The files docs/serving.md promises, written by microspec and read back the way each engine reads them:
SGLang's `--speculative-token-map` (`.pt`), the vLLM-tree `draft_token_map` (`.pt`, JSON, text), microspec's
own safetensors, and EAGLE-3 `d2t` offsets (read only). The readers below restate the engines' loaders
(SGLang `load_token_map`; vLLM-tree `DraftVocab`, ../shared/REFERENCES.md a10-a12) so that a format change
on either side fails here."""
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from microspec.cli import main
from microspec.lab.frequency import FrequencyTable, export_top, save_table
from microspec.policies import StaticFrequencyPolicy, load_token_map

V, EOS = 1000, [2, 7]


def sglang_reader(path) -> torch.Tensor:
    """SGLang `load_token_map` for a local file: the hot token ids, in file order."""
    with warnings.catch_warnings():                         # torch.tensor(a tensor) warns; SGLang does it
        warnings.simplefilter("ignore", UserWarning)
        return torch.tensor(torch.load(path, weights_only=True), dtype=torch.int64)


def vllm_tree_reader(path, vocab_size: int, eos_ids) -> torch.Tensor:
    """vLLM-tree `draft_token_map`: .pt (tensor or list), a flat JSON list, or white-space/comma text; EOS ids
    added; deduplicated and sorted; ids outside [0, V) and empty maps refused."""
    path = str(path)
    if path.endswith(".json"):
        ids = json.loads(open(path).read())
    elif path.endswith((".pt", ".pth")):
        ids = torch.load(path, map_location="cpu", weights_only=True)
        ids = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids
    else:
        ids = [int(t) for t in re.split(r"[\s,]+", open(path).read().strip()) if t]
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError("draft_token_map must hold a non-empty flat list of ids")
    out = torch.unique(torch.tensor([int(i) for i in ids] + list(eos_ids), dtype=torch.int64), sorted=True)
    if int(out.min()) < 0 or int(out.max()) >= vocab_size:
        raise ValueError("draft_token_map id outside the vocabulary")
    return out


@pytest.fixture
def table():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (V,), generator=g) * (torch.rand(V, generator=g) < 0.6)
    counts[EOS] = 0                                         # EOS never counted: the export must force it in
    meta = {"format": "microspec-frequency/1", "tokenizer": "synthetic", "vocab_size": V, "eos_ids": EOS}
    return FrequencyTable(counts, meta)


@pytest.mark.parametrize("suffix", [".pt", ".json", ".txt", ".safetensors"])
def test_export_top_round_trips_through_microspec(tmp_path, table, suffix):
    ids = export_top(table.ranked(), tmp_path / f"map{suffix}", 64, EOS)
    assert ids.numel() == 64 and set(EOS) <= set(ids.tolist())
    assert torch.equal(ids[:62], table.ranked()[:62])      # ranked order kept; EOS take the last slots
    assert torch.equal(load_token_map(tmp_path / f"map{suffix}"), ids)


def test_pt_export_is_what_sglang_reads(tmp_path, table):
    ids = export_top(table.ranked(), tmp_path / "freq_64.pt", 64, EOS)
    hot = sglang_reader(tmp_path / "freq_64.pt")
    assert hot.dtype == torch.int64 and torch.equal(hot, ids)
    assert hot.unique().numel() == hot.numel() and int(hot.max()) < V
    head = torch.randn(V, 8)
    assert torch.equal(head[hot][5], head[int(ids[5])])    # SGLang's sliced head row i is target id hot[i]


@pytest.mark.parametrize("suffix", [".pt", ".json", ".txt"])
def test_exports_are_what_the_vllm_tree_draft_token_map_reads(tmp_path, table, suffix):
    ids = export_top(table.ranked(), tmp_path / f"map{suffix}", 64, EOS)
    assert torch.equal(vllm_tree_reader(tmp_path / f"map{suffix}", V, EOS), ids.sort().values)


def test_safetensors_table_and_ids_load_as_microspec_policies(tmp_path, table):
    save_table(table, tmp_path / "table.safetensors")
    export_top(table.ranked(), tmp_path / "ids.safetensors", 64, EOS)
    assert set(load_file(tmp_path / "ids.safetensors")) == {"token_ids"}
    expected = torch.cat([table.ranked()[:30], torch.tensor(EOS)]).sort().values
    for name in ("table.safetensors", "ids.safetensors"):
        policy = StaticFrequencyPolicy.from_file(tmp_path / name, capacity=32)
        policy.setup(batch_size=1, vocab_size=V, special_ids=EOS, device="cpu")
        ids, n = policy.active()
        assert torch.equal(ids[0, : int(n.flatten()[0])], expected), name


def test_eagle3_d2t_offsets_read_back_as_the_draft_vocabulary(tmp_path, table):
    """EAGLE-3's scandata: the N most frequent ids sorted by id, d2t[i] = id_i - i, t2d a mask over V."""
    used = table.ranked()[:100].sort().values
    d2t = used - torch.arange(used.numel())
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[used] = True
    save_file({"d2t": d2t, "t2d": t2d}, str(tmp_path / "eagle3_vocab.safetensors"))
    got = load_token_map(tmp_path / "eagle3_vocab.safetensors")
    assert torch.equal(got, used) and torch.equal(t2d.nonzero().flatten(), got)


def test_fit_frequency_cli_converts_between_every_format(tmp_path, table):
    """`microspec fit-frequency --import A --export B`: a table in, every peer format out, EOS kept in from
    the table's metadata, and each output readable by its engine."""
    save_table(table, tmp_path / "table.safetensors")
    outs = {s: tmp_path / f"freq_64{s}" for s in (".pt", ".json", ".txt", ".safetensors")}
    for out in outs.values():
        assert main(["fit-frequency", "--import", str(tmp_path / "table.safetensors"), "--export", str(out),
                     "--top", "64", "--quiet"]) == 0
    expected = export_top(table.ranked(), tmp_path / "reference.pt", 64, EOS)
    for suffix, out in outs.items():
        assert torch.equal(load_token_map(out), expected), suffix
    assert torch.equal(sglang_reader(outs[".pt"]), expected)
    assert torch.equal(vllm_tree_reader(outs[".json"], V, EOS), expected.sort().values)
    # and back: an exported .pt converts to the same .txt
    assert main(["fit-frequency", "--import", str(outs[".pt"]), "--export", str(tmp_path / "again.txt"),
                 "--quiet"]) == 0
    assert torch.equal(load_token_map(tmp_path / "again.txt"), expected)
