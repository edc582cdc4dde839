"""Reading and writing token maps (reduced-vocabulary id lists) in the formats peers use.

| format                         | content                                           | used by                     |
|--------------------------------|---------------------------------------------------|-----------------------------|
| `.pt` / `.pth`                 | 1-D int tensor or list of ids, most frequent first | FR-Spec `freq_<V>.pt`, SGLang `--speculative-token-map`, vLLM `draft_token_map` |
| `.json`                        | a list of ids, or `{"token_ids": [...]}`           | vLLM `draft_token_map`      |
| `.txt` (or any other suffix)   | ids separated by white space or commas             | vLLM `draft_token_map`      |
| `.safetensors`                 | `token_ids` (ranked ids), `counts` [V], or EAGLE-3 `d2t` offsets | microspec, EAGLE-3 checkpoints |

`.pt` files are read with `torch.load(weights_only=True)` only: a token map is data, never code (CVE-2025-32434).
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor


def ranked_ids_from_counts(counts: Tensor) -> Tensor:
    """Ids with a positive count, most frequent first; ties go to the lower id. counts: [V] -> int64 [n]."""
    counts = counts.flatten().double()
    if counts.numel() == 0:
        raise ValueError("empty counts")
    if torch.isnan(counts).any() or (counts < 0).any():
        raise ValueError("counts must be finite and non-negative")
    order = torch.argsort(-counts, stable=True)
    return order[counts[order] > 0]


def _ids_from_tensors(tensors: dict[str, Tensor], path: Path) -> Tensor:
    if "token_ids" in tensors:
        return tensors["token_ids"]
    if "counts" in tensors:
        return ranked_ids_from_counts(tensors["counts"])
    if "d2t" in tensors:  # EAGLE-3: draft index i maps to target id i + d2t[i]
        d2t = tensors["d2t"].long()
        return torch.arange(d2t.numel()) + d2t
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{path}: expected a 'token_ids', 'counts' or 'd2t' tensor, found {sorted(tensors)}")


def load_token_map(path: str | os.PathLike) -> Tensor:
    """Read a token map file into int64 ids [n], most frequent first where the format is ranked.

    Raises FileNotFoundError for a missing file and ValueError for an empty map, negative ids or content
    that is not a list of integers. Range checks against a vocabulary happen when a policy is set up.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token map not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            ids = _ids_from_tensors(obj, path) if isinstance(obj, dict) else obj
        elif suffix == ".safetensors":
            from safetensors.torch import load_file
            ids = _ids_from_tensors(load_file(path), path)
        elif suffix == ".json":
            obj = json.loads(path.read_text())
            ids = obj["token_ids"] if isinstance(obj, dict) else obj
        else:
            text = path.read_text().strip()
            ids = [int(tok) for tok in re.split(r"[\s,]+", text) if tok]
        ids = torch.as_tensor(ids)
    except (ValueError, TypeError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not a token map ({err})") from err
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{path}: token ids must be integers, got {ids.dtype}")
    ids = ids.long().flatten()
    if ids.numel() == 0:
        raise ValueError(f"{path}: empty token map")
    if ids.min() < 0:
        raise ValueError(f"{path}: negative token id {int(ids.min())}")
    return ids


def save_token_map(ids, path: str | os.PathLike) -> Path:
    """Write ranked ids in the format named by the suffix (.pt, .json, .txt or .safetensors)."""
    path = Path(path)
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        torch.save(ids, path)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({"token_ids": ids.contiguous()}, path)
    elif suffix == ".json":
        path.write_text(json.dumps(ids.tolist()))
    else:
        path.write_text("\n".join(map(str, ids.tolist())) + "\n")
    return path
