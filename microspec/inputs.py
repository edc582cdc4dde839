"""Host-side validation of everything a caller hands `SpecDecoder`: checked up front, before any model work.

The rule (TESTING.md §4): refuse rather than coerce. A bool or a float where an int is expected, an id of
2.7, a list where a tensor is expected, a tokenizer given as a path string, an id outside the vocabulary, a
generator on the wrong device: each raises `TypeError` (wrong kind) or `ValueError` (wrong value) with a
one-line message that names the argument, what it got and what it expects.

    check_int / check_bool / check_real     scalar arguments
    as_token_ids                            id lists (maps, core ids, ranked ids) -> int64 [n], no coercion
    check_prompt                            input_ids / attention_mask -> (int64 [B, L], bool [B, L])
    as_id_list                              special ids (int, list, tensor or None) -> list[int], in order
    eos_ids_of                              the one EOS rule: the ids that end a model's generation
    resolve_special_ids                     eos / pad ids, with `NOT_GIVEN` (transformers' convention)
    check_generator                         None, one torch.Generator, or one per row, on the model's device
    check_streamer                          None, or an object with put() / end() for a batch of one
    check_vocabularies                      target, drafter and tokenizers share one vocabulary
    check_decoder_options                   K, head mode, prefill chunk and the boolean switches
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn

PADDED_VOCAB_SLACK = 128  # same tokenizer, embedding padded differently (Qwen 151936 vs 152064); vLLM's rule
HEAD_MODES = ("repack", "gather")


class _NotGiven:
    """Sentinel default: the argument was not passed (so `None` can mean "none", as in transformers)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __reduce__(self):
        return (_NotGiven, ())


NOT_GIVEN = _NotGiven()


# ---------------------------------------------------------------------------------------------- scalars
def _kind(value) -> str:
    return type(value).__name__


def is_int(value) -> bool:
    """A Python or NumPy integer, never a bool (bool is an int subclass in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int, or TypeError (bool, float, str, tensor, ...) / ValueError (outside the range)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {_kind(value)} {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {_kind(value)} {value!r}")
    return bool(value)


def check_real(name: str, value, *, positive: bool = False, finite: bool = True) -> float:
    """A real number (int or float, not bool); optionally finite and > 0."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {_kind(value)} {value!r}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- id lists
def as_token_ids(value, name: str = "token ids", *, allow_empty: bool = False) -> Tensor:
    """An id list (1-D int tensor, NumPy array, list or tuple of ints) as int64 [n] on the CPU.

    Refuses floats (2.0 included), bools, nested lists, negative ids and, unless `allow_empty`, an empty list.
    Ranges against a vocabulary are checked where the vocabulary is known (a policy's `setup`).
    """
    if isinstance(value, Tensor):
        ids = value
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integers, got a NumPy array of {value.dtype}")
        ids = torch.from_numpy(np.ascontiguousarray(value).astype(np.int64))
    elif isinstance(value, (list, tuple, range)):
        bad = next((v for v in value if not is_int(v)), None)
        if bad is not None:
            raise TypeError(f"{name} must be integers, got {_kind(bad)} {bad!r}")
        ids = torch.tensor([int(v) for v in value], dtype=torch.long)
    else:
        raise TypeError(f"{name} must be a 1-D int tensor, array or list of ints, got {_kind(value)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    ids = ids.detach().to("cpu", torch.long)
    if ids.numel() == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got the negative id {int(ids.min())}")
    return ids


def unique_stable(ids: Tensor) -> Tensor:
    """1-D ids with every repeat removed, first occurrences kept in order: [7, 8, 7, 9] -> [7, 8, 9]."""
    if ids.numel() == 0:
        return ids
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full_like(uniq, ids.numel()).scatter_reduce_(0, inverse, torch.arange(ids.numel()), "amin")
    return uniq[first.argsort()]


# ---------------------------------------------------------------------------------------------- prompt
def check_prompt(input_ids, attention_mask, vocab_size: int,
                 device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """input_ids int [B, L] (or [L]), attention_mask 0/1 or bool of the same shape (None: all real).

    Returns (int64 [B, L], bool [B, L]) on input_ids' device. Raises for wrong types, shapes, devices, rows
    with no real token and real tokens outside [0, vocab_size). `device` is the model's: the prompt may be
    there or on the CPU (it is moved), nowhere else.
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be an integer torch.Tensor [B, L], got {_kind(input_ids)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor [B, L], got {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [B, L] tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.device.type == "meta":
        raise ValueError("input_ids is on the meta device (it holds no values)")
    if device is not None and input_ids.device.type != "cpu" and not _same_device(input_ids.device,
                                                                                 torch.device(device)):
        raise ValueError(f"input_ids is on {input_ids.device}, the model on {device}: move it to {device} "
                         f"(or pass it on the CPU)")
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor of 0/1 (or bool) or None, got "
                            f"{_kind(attention_mask)}")
        mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"attention_mask must be an integer or bool tensor of 0/1, got {mask.dtype}")
        if mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {mask.device}, input_ids on {input_ids.device}")
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                values = mask.unique().tolist()[:5]
                raise ValueError(f"attention_mask must hold only 0 and 1, got values {values}")
            mask = mask.bool()
    if not bool(mask.any(1).all()):
        rows = (~mask.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"empty prompt in batch rows {rows}")
    real = input_ids[mask]
    lo, hi = int(real.min()), int(real.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}); got min {lo}, max {hi}")
    return input_ids.long(), mask


# ---------------------------------------------------------------------------------------------- special ids
def as_id_list(value, name: str = "eos_token_id", vocab_size: int | None = None,
               source: str = "") -> list[int]:
    """Special ids in any of the forms configs and callers use -> a list of ints, order and repeats kept
    (the first id is the pad fallback of `resolve_special_ids`).

    None -> []; an int, a list/tuple of ints or a 0-D/1-D int tensor -> its ids. Refuses floats, bools and
    strings (TypeError) and, when `vocab_size` is given, ids outside [0, vocab_size) (ValueError). `source`
    ends the messages' argument name (e.g. " (from the target's generation_config)").
    """
    if value is None:
        return []
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool or value.dim() > 1:
            raise TypeError(f"{name}{source} must be an int or a list of ints, got a {value.dtype} tensor of "
                            f"shape {tuple(value.shape)}")
        ids = [int(v) for v in value.flatten().tolist()]
    elif isinstance(value, (list, tuple)):
        bad = next((v for v in value if not is_int(v)), None)
        if bad is not None:
            raise TypeError(f"{name}{source} must be an int or a list of ints, got element {_kind(bad)} "
                            f"{bad!r}")
        ids = [int(v) for v in value]
    elif is_int(value):
        ids = [int(value)]
    else:
        raise TypeError(f"{name}{source} must be an int, a list of ints or None, got {_kind(value)} "
                        f"{value!r}")
    for e in ids if vocab_size is not None else ():
        if not 0 <= e < vocab_size:
            raise ValueError(f"{name} {e}{source} out of range [0, {vocab_size})")
    return ids


def eos_ids_of(source, tokenizer=None) -> list[int]:
    """The one EOS rule: every id that ends a generation of `source`, sorted and distinct.

    source: a Hugging Face model (its generation config's ids and its model config's: a
    `generation_config.json` may list ids the model config lacks, and the reverse), a generation config or a
    model config (its own ids only), or None (no model at hand). tokenizer: its `eos_token_id` is added when
    given. A union, because these ids serve as stop ids and as special ids kept in every active set, where a
    missing end id costs more than an extra one. Where a model's `generate` must be matched exactly, pass
    its generation config alone (`resolve_special_ids` keeps that config's order too: its first id is the
    pad fallback).
    """
    if isinstance(source, nn.Module):
        holders = [getattr(source, "generation_config", None), source.config]
    else:
        holders = [source]
    ids = [e for h in holders if h is not None for e in as_id_list(getattr(h, "eos_token_id", None))]
    if tokenizer is not None:
        ids += as_id_list(getattr(tokenizer, "eos_token_id", None), "tokenizer.eos_token_id")
    return sorted(set(ids))


def resolve_special_ids(eos_token_id=NOT_GIVEN, pad_token_id=NOT_GIVEN, generation_config=None,
                        vocab_size: int = 0) -> tuple[list[int], int]:
    """(EOS ids, pad id) with transformers' `generate` conventions.

    Not given (`NOT_GIVEN`): taken from `generation_config`. Given as None: no EOS (rows run to the budget),
    or, for pad, no pad id from the config: pad = the first EOS id (0 when there is no EOS: nothing is then
    ever padded, since rows only finish early at an EOS). EOS ids must be in [0, vocab_size); an explicit pad
    id too (a pad id from the config is kept as it is, as transformers does).
    """
    if eos_token_id is NOT_GIVEN:       # not `eos_ids_of`: `generate` reads the generation config alone
        eos = as_id_list(getattr(generation_config, "eos_token_id", None), "eos_token_id", vocab_size,
                         " (from the target's generation_config)")
    else:
        eos = as_id_list(eos_token_id, "eos_token_id", vocab_size)
    if pad_token_id is NOT_GIVEN:
        pad = getattr(generation_config, "pad_token_id", None)
        if isinstance(pad, Tensor) and pad.numel() == 1 and not pad.is_floating_point():
            pad = int(pad)
        if pad is not None and not is_int(pad):
            raise TypeError(f"pad_token_id (from the target's generation_config) must be an int, got "
                            f"{_kind(pad)} {pad!r}")
    elif pad_token_id is None:
        pad = None
    else:
        pad = check_int("pad_token_id", pad_token_id, 0, vocab_size - 1)
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)


# ---------------------------------------------------------------------------------------------- generators
def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def check_generator(generator, batch_size: int, device) -> None:
    """None, one `torch.Generator`, or a list/tuple of one per row; each on the model's device."""
    if generator is None:
        return
    device = torch.device(device)
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, a list of one per row, or None; got "
                            f"{_kind(g)} {g!r} (to seed, pass torch.Generator().manual_seed(seed))")
        if not _same_device(torch.device(g.device), device):
            raise ValueError(f"generator is on {g.device}, the models on {device}: create it with "
                             f"torch.Generator(device={str(device)!r})")
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} generators for {batch_size} rows")


def check_streamer(streamer, batch_size: int) -> None:
    """None, or a transformers-style streamer (`put(ids)`, `end()`) for a batch of one row."""
    if streamer is None:
        return
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must have put(ids) and end() methods (a transformers streamer), got "
                        f"{_kind(streamer)}")
    if batch_size != 1:
        raise ValueError(f"a streamer takes a batch of one row, got {batch_size} rows")


# ---------------------------------------------------------------------------------------------- models
def _vocab_size_of(model, name: str) -> int:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module (a Hugging Face causal LM), got {_kind(model)}")
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"{name} ({_kind(model)}) has no output head with a [V, D] weight")
    if not hasattr(model, "config"):
        raise TypeError(f"{name} ({_kind(model)}) has no .config: not a Hugging Face model")
    return weight.shape[0]


def _check_tokenizer(name: str, tok) -> None:
    if tok is None:
        return
    if isinstance(tok, (str, bytes)) or hasattr(tok, "__fspath__"):
        raise TypeError(f"{name} must be a tokenizer object, got the path {str(tok)!r}: load it first, e.g. "
                        f"AutoTokenizer.from_pretrained(path)")
    if not (callable(getattr(tok, "get_vocab", None)) and callable(getattr(tok, "__len__", None))):
        raise TypeError(f"{name} must be a tokenizer with get_vocab() and len(), got {_kind(tok)}")


def _config_ids(model, name: str) -> list[int]:
    value = getattr(model.config, name, None)
    if value is None:
        return []
    if isinstance(value, Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def check_vocabularies(target: nn.Module, drafter: nn.Module, tokenizer=None, drafter_tokenizer=None) -> int:
    """Raise unless target and drafter share one tokenizer; return the shared vocabulary size.

    Always structural: the heads may differ only by embedding padding (<= 128 rows), the special ids of the
    two configs must agree, and a tokenizer may not be longer than the heads by more than padding. With both
    tokenizers given (and not the same object) their vocabularies are also compared entry by entry. The
    shared size is min(V_target, V_drafter, len(tokenizer)).
    """
    v_t, v_d = _vocab_size_of(target, "target"), _vocab_size_of(drafter, "drafter")
    _check_tokenizer("tokenizer", tokenizer)
    _check_tokenizer("drafter_tokenizer", drafter_tokenizer)
    distinct = tokenizer is not None and drafter_tokenizer is not None and tokenizer is not drafter_tokenizer
    if distinct and tokenizer.get_vocab() != drafter_tokenizer.get_vocab():
        raise ValueError("target and drafter tokenizers differ; microspec needs one shared vocabulary")
    if abs(v_t - v_d) > PADDED_VOCAB_SLACK:
        raise ValueError(f"target vocabulary ({v_t}) and drafter vocabulary ({v_d}) differ by more than "
                         f"embedding padding; the models must share one tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a, b = _config_ids(target, name), _config_ids(drafter, name)
        if a and b and sorted(a) != sorted(b):
            raise ValueError(f"target and drafter disagree on {name} ({a} vs {b}): different tokenizers?")
    common = min(v_t, v_d)
    for name, tok in (("tokenizer", tokenizer), ("drafter_tokenizer", drafter_tokenizer)):
        if tok is None:
            continue
        n = len(tok)
        if n > common + PADDED_VOCAB_SLACK:
            raise ValueError(f"{name} has {n} entries but the models' heads only {common} rows: the "
                             f"tokenizer of another model?")
        common = min(common, n)
    if common < 1:
        raise ValueError("the shared vocabulary is empty")
    return common


# ---------------------------------------------------------------------------------------------- options
def check_decoder_options(num_speculative_tokens=4, head_mode: str = "repack", prefill_chunk=512,
                          cuda_graph=True, async_gather=False, compile=False) -> None:
    """The scalar options of `SpecDecoder(...)`: K and prefill_chunk ints >= 1, head_mode one of
    HEAD_MODES, the switches real bools."""
    try:
        check_int("num_speculative_tokens", num_speculative_tokens, minimum=1)
    except TypeError as err:   # historically a ValueError: keep catching code working
        raise ValueError(str(err)) from None
    check_int("prefill_chunk", prefill_chunk, minimum=1)
    if not isinstance(head_mode, str) or head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    for name, value in (("cuda_graph", cuda_graph), ("async_gather", async_gather), ("compile", compile)):
        check_bool(name, value)


def check_policy_fits(policy, vocab_size: int) -> None:
    """A policy that asks the target for more top ids than the vocabulary holds cannot run."""
    k = getattr(policy, "target_topk", 0)
    if k > vocab_size:
        raise ValueError(f"{type(policy).__name__} asks for the target's top-{k} ids, but the shared "
                         f"vocabulary has only {vocab_size}")
