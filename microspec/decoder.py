"""`SpecDecoder`: chain speculative decoding with a policy-chosen draft vocabulary, lossless by construction.

This file holds the public object: it checks that target and drafter share a vocabulary, installs the sparse
head on a shallow copy of the drafter, validates every input of `generate` before anything runs on the
device, and hands one request batch to `engine.DecodeRun`, where the decode step lives.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .engine import DecodeRun
from .models.hf import CausalLM, vocab_size_of
from .outputs import GenerateOutput
from .policies import FullVocab, VocabPolicy
from .sampling import SamplingConfig
from .sparse_head import sparsify_lm_head_


PADDED_VOCAB_SLACK = 128  # same tokenizer, embedding padded differently (Qwen 151936 vs 152064); vLLM's rule


def _shallow_model_copy(model: nn.Module) -> nn.Module:
    """A copy sharing every parameter and submodule, with its own module table, so swapping its head
    leaves the caller's model untouched (also when drafter and target are the same object)."""
    clone = copy.copy(model)
    clone._modules = dict(model._modules)
    return clone


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, Tensor):
        return [int(v) for v in value.flatten()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def check_vocabularies(target: nn.Module, drafter: nn.Module, tokenizer=None, drafter_tokenizer=None) -> int:
    """Raise ValueError unless target and drafter share one tokenizer; return the shared vocabulary size.

    With both tokenizers given their vocabularies are compared entry by entry. Without them the check is
    structural: head sizes may differ only by embedding padding (<= 128 rows) and the special ids in the
    two configs must agree.
    """
    v_t, v_d = vocab_size_of(target), vocab_size_of(drafter)
    if tokenizer is not None and drafter_tokenizer is not None and tokenizer is not drafter_tokenizer:
        if tokenizer.get_vocab() != drafter_tokenizer.get_vocab():
            raise ValueError("target and drafter tokenizers differ; microspec needs one shared vocabulary")
    elif abs(v_t - v_d) > PADDED_VOCAB_SLACK:
        raise ValueError(f"target vocabulary ({v_t}) and drafter vocabulary ({v_d}) differ by more than "
                         f"embedding padding; the models must share one tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a = _as_id_list(getattr(target.config, name, None))
        b = _as_id_list(getattr(drafter.config, name, None))
        if a and b and sorted(a) != sorted(b):
            raise ValueError(f"target and drafter disagree on {name} ({a} vs {b}): different tokenizers?")
    common = min(v_t, v_d)
    if tokenizer is not None:
        common = min(common, len(tokenizer))
    return common


class SpecDecoder:
    """Speculative decoding of `target` with `drafter`, the drafter scoring only `policy`'s active set.

    Args:
        target, drafter: Hugging Face causal LMs on one device sharing one tokenizer (drafter may be the
            target itself: self-speculation with a pruned head). Neither model is modified: the drafter's
            head is swapped on a shallow copy.
        policy: a `VocabPolicy` (FullVocab, StaticFrequencyPolicy, InContextPolicy, or your own).
        num_speculative_tokens: K, drafts per verification.
        tokenizer / drafter_tokenizer: optional, to check the vocabularies entry by entry and bound the
            active set by len(tokenizer).
        head_mode: "repack" (delta gather into a buffer, default) or "gather" (fused gather-GEMV).
        prefill_chunk: prompt positions per prefill forward (bounds the [B, chunk, V] logits).
        cuda_graph: capture the whole decode step in a CUDA graph and replay it (CUDA only; default on).
        async_gather: copy newly admitted head rows on a side CUDA stream, overlapping the drafter's layers.
            Off by default: on the H100 the stream fork/join inside a captured step cost more than the copy of
            the few dozen rows an update admits (docs/benchmarks.md, "Async gather").
        compile: run the decode-step forwards of both models through `torch.compile` (Inductor fuses each
            layer's small element-wise kernels; the first generate call pays the compilation).

    Example:
        >>> out = SpecDecoder(target, drafter, InContextPolicy(capacity=2048), 5).generate(ids, max_new_tokens=64)
        >>> out.sequences, out.stats.mean_accepted_length
    """

    def __init__(self, target: nn.Module, drafter: nn.Module, policy: VocabPolicy, num_speculative_tokens: int = 4,
                 *, tokenizer=None, drafter_tokenizer=None, head_mode: str = "repack", prefill_chunk: int = 512,
                 cuda_graph: bool = True, async_gather: bool = False, compile: bool = False):
        if not isinstance(policy, VocabPolicy):
            raise TypeError(f"policy must be a VocabPolicy, got {type(policy).__name__}")
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {num_speculative_tokens!r}")
        self.vocab_size = check_vocabularies(target, drafter, tokenizer, drafter_tokenizer)
        self.target_vocab_size = vocab_size_of(target)
        self.policy = policy
        self.K = num_speculative_tokens
        self.prefill_chunk = prefill_chunk
        self.cuda_graph = cuda_graph
        self.target = CausalLM.of(target, compile=compile)
        drafter_view = _shallow_model_copy(drafter)
        mode = "dense" if isinstance(policy, FullVocab) else head_mode
        self.head = sparsify_lm_head_(drafter_view, mode=mode, async_gather=async_gather).head
        self.drafter = CausalLM(drafter_view, compile=compile)
        if self.drafter.device != self.target.device:
            raise ValueError(f"drafter on {self.drafter.device}, target on {self.target.device}")
        self._generation_config = getattr(target, "generation_config", None)

    # ------------------------------------------------------------------ input handling (host side)
    def _special_ids(self, eos_token_id, pad_token_id) -> tuple[list[int], int]:
        gen = self._generation_config
        eos = _as_id_list(eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None))
        for e in eos:
            if not 0 <= e < self.target_vocab_size:
                raise ValueError(f"eos_token_id {e} out of range [0, {self.target_vocab_size})")
        if pad_token_id is None:
            pad_token_id = getattr(gen, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        return eos, int(pad_token_id)

    def _check_prompt(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError("input_ids must be an integer tensor [B, L]")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [B, L] tensor, got shape {tuple(input_ids.shape)}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        mask = mask.to(device=input_ids.device).bool()
        if not mask.any(1).all():
            rows = (~mask.any(1)).nonzero().flatten().tolist()
            raise ValueError(f"empty prompt in batch rows {rows}")
        real = input_ids[mask]
        lo, hi = int(real.min()), int(real.max())
        if lo < 0 or hi >= self.target_vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.target_vocab_size}); got min {lo}, max {hi}")
        return input_ids.long(), mask

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=None, pad_token_id: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None) -> GenerateOutput:
        """Generate up to `max_new_tokens` per row. Greedy output equals `target.generate(do_sample=False)`;
        sampled output follows the target's processed distribution (temperature, top_k, top_p).

        input_ids int [B, L] (left padding marked by attention_mask, the Hugging Face convention).
        generator: one torch.Generator, or one per row (then a row's samples do not depend on the batch).
        Seeded speculative sampling does not reproduce seeded plain sampling token for token (it follows
        the same distribution).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        cfg = SamplingConfig(do_sample, temperature, top_k, top_p)
        input_ids, mask = self._check_prompt(input_ids, attention_mask)
        eos, pad = self._special_ids(eos_token_id, pad_token_id)
        if isinstance(generator, (list, tuple)) and len(generator) != input_ids.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {input_ids.shape[0]} rows")
        run = DecodeRun(self, input_ids.to(self.target.device), mask.to(self.target.device), max_new_tokens, cfg,
                        eos, generator, cuda_graph=self.cuda_graph)
        try:
            return run.execute(input_ids, pad)
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"{err}\nmicrospec: out of memory with batch={run.B}, K={self.K}, "
                f"vocab={self.target_vocab_size}, capacity={self.policy.capacity}, cache length={run.S}") from err

