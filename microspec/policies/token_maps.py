"""Reading and writing token maps (reduced-vocabulary id lists) in the formats peers use.

| format                       | content                                         | used by                  |
|------------------------------|-------------------------------------------------|--------------------------|
| `.pt` / `.pth`               | 1-D int tensor or id list, most frequent first  | FR-Spec `freq_<V>.pt`,   |
|                              |                                                 | SGLang, vLLM             |
| `.json`                      | a list of ids, or `{"token_ids": [...]}`        | vLLM `draft_token_map`   |
| `.txt` (or any other suffix) | ids separated by white space or commas          | vLLM `draft_token_map`   |
| `.safetensors`               | `token_ids` (ranked), `counts` [V], or `d2t`    | microspec, EAGLE-3       |

`.pt` files are read with `torch.load(weights_only=True)` only: a token map is data, never code
(CVE-2025-32434).
Ids are integers (floats are refused, never truncated); a repeated id keeps its first (best) rank, so no map
read or written here holds an id twice.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from ..inputs import as_token_ids, unique_stable


def ranked_ids_from_counts(counts: Tensor) -> Tensor:
    """Ids with a positive count, most frequent first; ties go to the lower id. counts: [V] -> int64 [n]."""
    if not isinstance(counts, Tensor) or counts.is_complex() or counts.dtype == torch.bool:
        kind = counts.dtype if isinstance(counts, Tensor) else type(counts).__name__
        raise TypeError(f"counts must be a real-valued tensor [V], got {kind}")
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D [V], got shape {tuple(counts.shape)}")
    counts = counts.double()
    if counts.numel() == 0:
        raise ValueError("empty counts")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        bad = counts[~torch.isfinite(counts) | (counts < 0)][0].item()
        raise ValueError(f"counts must be finite and non-negative, got {bad}")
    order = torch.argsort(-counts, stable=True)
    return order[counts[order] > 0]


def _ids_from_tensors(tensors: dict[str, Tensor], path: Path) -> Tensor:
    if "token_ids" in tensors:
        return tensors["token_ids"]
    if "counts" in tensors:
        return ranked_ids_from_counts(tensors["counts"])
    if "d2t" in tensors:  # EAGLE-3: draft index i maps to target id i + d2t[i]
        d2t = tensors["d2t"]
        if d2t.is_floating_point() or d2t.is_complex() or d2t.dtype == torch.bool or d2t.dim() != 1:
            raise ValueError(f"d2t offsets must be a 1-D integer tensor, got {d2t.dtype} {tuple(d2t.shape)}")
        return torch.arange(d2t.numel()) + d2t.long()
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{path}: expected a 'token_ids', 'counts' or 'd2t' tensor, found {sorted(tensors)}")


def load_token_map(path: str | os.PathLike) -> Tensor:
    """Read a token map file into int64 ids [n], most frequent first where the format is ranked, each id once
    (a repeated id keeps its first rank).

    Raises FileNotFoundError for a missing file and a one-line ValueError for an unreadable or corrupt file,
    a `.pt` holding pickled code, an empty map, negative ids or content that is not a list of integers.
    Range checks against a vocabulary happen when a policy is set up.
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
            ids = _ids_from_tensors(_load_safetensors(path), path)
        elif suffix == ".json":
            obj = json.loads(path.read_text())
            ids = obj["token_ids"] if isinstance(obj, dict) else obj
        else:
            text = path.read_text().strip()
            ids = [int(tok) for tok in re.split(r"[\s,]+", text) if tok]
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a token map: refused by torch.load(weights_only=True) "
                         f"({_unpickler_reason(err)}); it holds pickled Python objects or is corrupt "
                         f"(a token map is data, never code)") from None
    except (ValueError, TypeError, KeyError, RuntimeError, UnicodeDecodeError, EOFError) as err:
        raise ValueError(f"{path}: not a token map ({_first_line(err)})") from None
    if (isinstance(ids, (list, tuple)) and len(ids) == 0) or (isinstance(ids, Tensor) and ids.numel() == 0):
        raise ValueError(f"{path}: empty token map")
    if isinstance(ids, Tensor) and ids.dim() > 1:
        ids = ids.flatten()
    try:
        ids = as_token_ids(ids, "token ids")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    return unique_stable(ids)


def _unpickler_reason(err: BaseException) -> str:
    """The one informative phrase of torch's long weights-only message ("Unsupported global: ...")."""
    text = str(err)
    _, found, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if found else text).splitlines() if line.strip()]
    return lines[0].split(". ")[0][:160] if lines else type(err).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    """safetensors' own error types (a corrupt or truncated header) become ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:  # SafetensorError is not a ValueError subclass
        raise ValueError(f"not a safetensors file: {_first_line(err)}") from None


def save_token_map(ids, path: str | os.PathLike) -> Path:
    """Write ranked ids in the format named by the suffix (.pt, .json, .txt or .safetensors); a repeated id
    is written once, at its first rank."""
    path = Path(path)
    ids = unique_stable(as_token_ids(ids, "token ids", allow_empty=True))
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
