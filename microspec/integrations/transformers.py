"""microspec speculation without leaving `model.generate(...)`.

transformers 5.x lets `generate` hand its decoding loop to a callable (`custom_generate=`): `generate` does
its usual preparation (generation config, special tokens, attention mask, length limits, logits processors and
stopping criteria) and then calls the callable with them; keyword arguments that the callable names and
`GenerationMixin._sample` does not (here: `drafter`, `policy`, `num_speculative_tokens`, `generator`,
`decoder_options`) are passed through from the `generate` call.

    >>> from microspec.integrations import microspec_generate
    >>> from microspec.policies import InContextPolicy
    >>> out = model.generate(input_ids, attention_mask=mask, custom_generate=microspec_generate,
    ...                      drafter=model, policy=InContextPolicy(capacity=1024), num_speculative_tokens=5,
    ...                      max_new_tokens=64, do_sample=False)                    # doctest: +SKIP

Greedy output equals plain `model.generate` and `SpecDecoder.generate`; sampling follows the target's
processed distribution and, for one seeded `generator`, gives exactly `SpecDecoder.generate`'s tokens.
What `generate` would apply that microspec does not (repetition penalty, min length, min-p, stop strings,
beams, scores...) raises ValueError instead of being ignored. Runnable example: docs/transformers.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..decoder import SpecDecoder
from ..inputs import as_id_list
from ..outputs import SpecStats
from ..policies import FullVocab, VocabPolicy

_OUTPUT_OPTIONS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


@dataclass
class SpecGenerateOutput(GenerateDecoderOnlyOutput):
    """What `generate(..., return_dict_in_generate=True)` returns here: `sequences` [B, L + new] as usual
    (scores, logits, attentions, hidden states and cache stay None), plus microspec's `spec_stats`."""

    spec_stats: SpecStats | None = None


def microspec_generate(model, input_ids: Tensor, logits_processor=None, stopping_criteria=None,
                       generation_config=None, *, drafter=None, policy: VocabPolicy | None = None,
                       num_speculative_tokens: int = 5, generator: torch.Generator | None = None,
                       decoder_options: dict | None = None, **model_kwargs):
    """The `custom_generate` callable: runs `microspec.SpecDecoder` on what `generate` prepared.

    drafter: a causal LM sharing the target's tokenizer (default: the target itself, self-speculation with a
        pruned head). policy: a `VocabPolicy` (default `FullVocab()`: dense-head speculation).
    num_speculative_tokens: K drafts per verification. generator: a `torch.Generator` for sampling.
    decoder_options: extra `SpecDecoder` arguments (tokenizer, head_mode, cuda_graph, compile, ...).
    Returns LongTensor [B, L + new], or `SpecGenerateOutput` with `return_dict_in_generate=True`.
    """
    if generation_config is None:
        raise ValueError("microspec_generate is called by model.generate(custom_generate=microspec_generate)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("microspec_generate supports decoder-only models")
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("microspec_generate needs input_ids, not inputs_embeds")
    if (generation_config.num_beams or 1) > 1:
        raise ValueError("microspec_generate does not do beam search (num_beams must be 1)")
    asked = [o for o in _OUTPUT_OPTIONS if getattr(generation_config, o, False)]
    if generation_config.return_dict_in_generate and asked:
        raise ValueError(f"microspec_generate returns sequences (and spec_stats) only, not "
                         f"{', '.join(asked)}")
    sampling = _sampling_options(logits_processor or [])
    max_length, eos = _stopping(stopping_criteria or [], generation_config)
    pad = getattr(generation_config, "_pad_token_tensor", None)
    pad = int(pad) if pad is not None else (generation_config.pad_token_id or 0)
    decoder = SpecDecoder(model, model if drafter is None else drafter,
                          FullVocab() if policy is None else policy, num_speculative_tokens,
                          **(decoder_options or {}))
    out = decoder.generate(input_ids, attention_mask=model_kwargs.get("attention_mask"),
                           max_new_tokens=max_length - input_ids.shape[1],
                           do_sample=bool(generation_config.do_sample), eos_token_id=eos, pad_token_id=pad,
                           generator=generator, **sampling)
    if generation_config.return_dict_in_generate:
        return SpecGenerateOutput(sequences=out.sequences, spec_stats=out.stats)
    return out.sequences


def _sampling_options(processors) -> dict:
    """The logits processors `generate` built -> SpecDecoder's temperature / top_k / top_p. They are built
    from the generation config (the model's defaults merged with the call's), so reading them applies exactly
    what `generate` would; any other processor raises ValueError."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    options = {}
    for proc in processors:
        if isinstance(proc, TemperatureLogitsWarper):
            options["temperature"] = float(proc.temperature)
        elif isinstance(proc, TopKLogitsWarper):
            options["top_k"] = int(proc.top_k)
        elif isinstance(proc, TopPLogitsWarper):
            options["top_p"] = float(proc.top_p)
        else:
            raise ValueError(f"microspec_generate applies temperature, top_k and top_p only; "
                             f"{type(proc).__name__} was requested (unset the option that adds it)")
    return options


def _stopping(criteria, generation_config) -> tuple[int, list[int]]:
    """The stopping criteria `generate` built -> (max_length, EOS ids); any other one raises ValueError."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
    max_length, eos = generation_config.max_length, []
    for crit in criteria:
        if isinstance(crit, MaxLengthCriteria):
            max_length = crit.max_length
        elif isinstance(crit, EosTokenCriteria):
            eos = as_id_list(crit.eos_token_id, "eos_token_id")     # a tensor [n] of the config's ids
        else:
            raise ValueError(f"microspec_generate stops at EOS and max length only; {type(crit).__name__} "
                             "was requested")
    return max_length, eos
