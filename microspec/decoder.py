"""`SpecDecoder`: chain speculative decoding with a policy-chosen draft vocabulary, lossless by construction.

This file holds the public object: it checks that target and drafter share a vocabulary, installs the sparse
head on a shallow copy of the drafter, validates every input of `generate` before anything runs on the
device, and hands one request batch to `engine.DecodeRun`, where the decode step lives.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .drafting.model_drafter import ModelDrafter
from .drafting.tree import TreeSpec
from .engine import DecodeRun, EngineParts
from .inputs import (  # noqa: F401  (PADDED_VOCAB_SLACK, check_vocabularies: re-exported)
    NOT_GIVEN,
    PADDED_VOCAB_SLACK,
    check_decoder_options,
    check_generator,
    check_int,
    check_policy_fits,
    check_prompt,
    check_streamer,
    check_vocabularies,
    resolve_special_ids,
)
from .models.hf import CausalLM, vocab_size_of
from .models.select import BACKENDS
from .outputs import GenerateOutput
from .policies import FullVocab, VocabPolicy
from .sampling import SamplingConfig
from .sparse_head import sparse_head_for

_SHARED_BACKENDS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def model_backend(model: nn.Module, backend: str = "auto", compile: bool = False, shared: bool = True):
    """The `ModelBackend` running `model`: "hf" (any Hugging Face causal LM), "lean" (compact code for the
    families in `microspec.models.lean`) or "auto" (lean where supported). With `shared`, decoders over the
    same model share one backend (its compiled graphs and cache buffers; used one call at a time); a drafter
    that is the target itself takes `shared=False`, so it gets a cache of its own."""
    if not shared:
        return _new_backend(model, backend, compile)
    per_model = _SHARED_BACKENDS.setdefault(model, {})
    if (backend, compile) not in per_model:
        per_model[(backend, compile)] = _new_backend(model, backend, compile)
    return per_model[(backend, compile)]


def _new_backend(model: nn.Module, backend: str, compile: bool):
    if backend == "hf":
        return CausalLM(model, compile=compile)
    from .models.select import make_backend
    return make_backend(model, backend, compile=compile)


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
        >>> dec = SpecDecoder(target, drafter, InContextPolicy(capacity=2048), 5)
        >>> out = dec.generate(ids, max_new_tokens=64)
        >>> out.sequences, out.stats.mean_accepted_length
    """

    def __init__(self, target: nn.Module, drafter, policy: VocabPolicy, num_speculative_tokens: int = 4,
                 *, tokenizer=None, drafter_tokenizer=None, head_mode: str = "repack",
                 prefill_chunk: int = 512,
                 cuda_graph: bool = True, async_gather: bool = False, compile: bool = False,
                 backend: str = "auto", tree=None):
        check_decoder_options(num_speculative_tokens, head_mode, prefill_chunk, cuda_graph, async_gather,
                              compile)
        if not isinstance(policy, VocabPolicy):
            raise TypeError(f"policy must be a VocabPolicy, got {type(policy).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if tree is not None and not isinstance(tree, TreeSpec):
            raise TypeError(f"tree must be a microspec.drafting.tree.TreeSpec or None, "
                            f"got {type(tree).__name__}")
        feature_drafter = hasattr(drafter, "make_proposer")
        drafter_model = drafter.target if feature_drafter else drafter
        if feature_drafter and drafter.target is not target:
            raise ValueError("this feature drafter was built for another target model; load it with "
                             "EagleDrafter.from_pretrained(path, target) for this one")
        self.vocab_size = check_vocabularies(target, drafter_model, tokenizer, drafter_tokenizer)
        self.target_vocab_size = vocab_size_of(target)
        self.policy = policy
        self.K = num_speculative_tokens
        self.prefill_chunk = prefill_chunk
        self.cuda_graph, self.compile = cuda_graph, compile
        self.target = model_backend(target, backend, compile=compile)
        mode = "dense" if isinstance(policy, FullVocab) else head_mode
        if feature_drafter:  # EAGLE-style: drafts from the target's features through the target's own head
            self.head = sparse_head_for(self.target.head, mode=mode, async_gather=async_gather)
            self.proposer = drafter.make_proposer(self.head, num_speculative_tokens, backend=backend,
                                                  compile=compile, tree=tree)
        else:
            if tree is not None:
                raise ValueError("tree drafting needs a feature drafter (EagleDrafter); a standalone model "
                                 "drafts chains")
            drafter_backend = model_backend(drafter, backend, compile=compile, shared=False)
            if drafter_backend.device != self.target.device:
                raise ValueError(f"drafter on {drafter_backend.device}, target on {self.target.device}")
            self.head = sparse_head_for(drafter_backend.head, mode=mode, async_gather=async_gather)
            self.proposer = ModelDrafter(drafter_backend, num_speculative_tokens, self.head)
        self._generation_config = getattr(target, "generation_config", None)

    def parts(self) -> EngineParts:
        """The engine's view of this decoder (what `new_run` hands to `DecodeRun`)."""
        return EngineParts(self.target, self.proposer, self.policy, self.vocab_size, self.prefill_chunk,
                           compile=self.compile)

    # ------------------------------------------------------------------ input handling (host side)
    def _special_ids(self, eos_token_id=NOT_GIVEN, pad_token_id=NOT_GIVEN) -> tuple[list[int], int]:
        return resolve_special_ids(eos_token_id, pad_token_id, self._generation_config,
                                   self.target_vocab_size)

    def _check_prompt(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return check_prompt(input_ids, attention_mask, self.target_vocab_size, self.target.device)

    # ------------------------------------------------------------------ public API
    def new_run(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32, *,
                do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, eos_token_id=NOT_GIVEN, pad_token_id=NOT_GIVEN,
                generator=None, observers=(), streamer=None, cuda_graph: bool | None = None):
        """A validated, not yet started `DecodeRun` for one batch -> (run, input_ids, pad_token_id).

        For tools that drive the engine themselves (evaluation traces, benchmarks, step-level tests):
        `run.start()`, then `run.step()` / `run.capture()` / `run.run_steps()`, `run.sequences(input_ids,
        pad)`, `run.summary()`. `generate` is `new_run` + `run.execute`. Arguments as in `generate`;
        observers: callables given each step's `microspec.engine.StepRecord`.
        """
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
        cfg = SamplingConfig(do_sample, temperature, top_k, top_p)
        input_ids, mask = self._check_prompt(input_ids, attention_mask)
        eos, pad = self._special_ids(eos_token_id, pad_token_id)
        check_generator(generator, input_ids.shape[0], self.target.device)
        check_streamer(streamer, input_ids.shape[0])
        check_policy_fits(self.policy, self.vocab_size)
        dev = self.target.device
        run = DecodeRun(self.parts(), input_ids.to(dev), mask.to(dev), max_new_tokens, cfg, eos, generator,
                        cuda_graph=self.cuda_graph if cuda_graph is None else cuda_graph,
                        observers=observers, streamer=streamer)
        return run, input_ids, pad

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=NOT_GIVEN, pad_token_id=NOT_GIVEN,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 streamer=None) -> GenerateOutput:
        """Generate up to `max_new_tokens` per row. Greedy output equals `target.generate(do_sample=False)`;
        sampled output follows the target's processed distribution (temperature, top_k, top_p).

        input_ids int [B, L] (left padding marked by attention_mask, the Hugging Face convention).
        generator: one torch.Generator, or one per row (then a row's samples do not depend on the batch).
        Seeded speculative sampling does not reproduce seeded plain sampling token for token (it follows
        the same distribution).
        streamer: a transformers-style streamer (`put(LongTensor [n])`, `end()`), batch 1: it receives the
        tokens as they are committed (then no CUDA graph is captured, and the host waits for every step).
        eos_token_id / pad_token_id: as in transformers: not given, they come from the target's generation
        config; `eos_token_id=None` (or []) means no EOS: every row runs to max_new_tokens.

        Every argument is checked (type, range, device: `microspec.inputs`) before any model work.
        """
        run, input_ids, pad = self.new_run(input_ids, attention_mask, max_new_tokens, do_sample=do_sample,
                                           temperature=temperature, top_k=top_k, top_p=top_p,
                                           eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                           generator=generator, streamer=streamer)
        try:
            return run.execute(input_ids, pad)
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"{err}\nmicrospec: out of memory with batch={run.B}, K={self.K}, nodes per step={run.N}, "
                f"vocab={self.target_vocab_size}, capacity={self.policy.capacity}, "
                f"cache length={run.S}") from err
