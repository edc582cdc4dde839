"""`model.generate(custom_generate=microspec_generate, ...)` (microspec/integrations/transformers.py): the
same tokens as `SpecDecoder.generate` (greedy: also plain `generate`; sampling: same seeded generator), the
`generate` return types, refusals instead of silently ignored options, and the docs/transformers.md
example."""
import re
from pathlib import Path

import pytest
import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from microspec import SpecDecoder
from microspec.integrations import SpecGenerateOutput, microspec_generate
from microspec.models import early_exit_drafter, tiny_random_model
from microspec.policies import FullVocab, InContextPolicy

DOC = Path(__file__).resolve().parents[1] / "docs" / "transformers.md"


@pytest.fixture(scope="module")
def tiny():
    model = tiny_random_model(vocab_size=512, seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                  # ragged batch, left padding
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return model, ids, mask


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spec(**kw):
    return dict(custom_generate=microspec_generate, num_speculative_tokens=3, **kw)


@pytest.mark.parametrize("policy", [FullVocab, lambda: InContextPolicy(64, topk=2)],
                         ids=["full", "incontext"])
def test_greedy_equals_plain_generate_and_spec_decoder(tiny, policy):
    model, ids, mask = tiny
    drafter = early_exit_drafter(model, 1)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         **_spec(drafter=drafter, policy=policy()))
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    direct = SpecDecoder(model, drafter, policy(), 3).generate(ids, attention_mask=mask, max_new_tokens=12)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    assert torch.equal(out, plain)
    assert torch.equal(out, direct.sequences)


def test_sampling_equals_spec_decoder_with_the_same_seed(tiny):
    model, ids, mask = tiny
    opts = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    spec = _spec(policy=InContextPolicy(64))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, generator=_gen(7),
                         **opts, **spec)
    direct = SpecDecoder(model, model, InContextPolicy(64), 3).generate(
        ids, attention_mask=mask, max_new_tokens=12, generator=_gen(7), **opts)
    assert torch.equal(out, direct.sequences)
    other = model.generate(ids, attention_mask=mask, max_new_tokens=12, generator=_gen(8),
                           **opts, **spec)
    assert not torch.equal(out, other)               # the generator is really used


def test_sampling_reads_the_model_generation_config_defaults(tiny):
    """top_k set only in the model's generation_config reaches microspec, as it would reach plain generate."""
    model, ids, mask = tiny
    model.generation_config.top_k = 5
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                             generator=_gen(1), **_spec())
    finally:
        model.generation_config.top_k = None
    direct = SpecDecoder(model, model, FullVocab(), 3).generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=5,
        generator=_gen(1))
    assert torch.equal(out, direct.sequences)


def test_return_dict_in_generate_gives_a_generate_output_with_stats(tiny):
    model, ids, mask = tiny
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         return_dict_in_generate=True, **_spec(policy=InContextPolicy(64)))
    assert isinstance(out, SpecGenerateOutput) and isinstance(out, GenerateDecoderOnlyOutput)
    assert out.sequences.shape == (3, ids.shape[1] + 8) and out.scores is None
    assert out.spec_stats.num_committed > 0 and 0 < out.spec_stats.coverage <= 1


def test_eos_and_max_length_come_from_generate(tiny):
    model, ids, mask = tiny
    first = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    eos = int(first[0, ids.shape[1] + 2])            # row 0's third new token: row 0 must stop there
    out = model.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 6, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, **_spec())
    plain = model.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 6, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, plain)
    assert (out[0, ids.shape[1] + 3:] == 0).all()


@pytest.mark.parametrize("option", [dict(repetition_penalty=1.3), dict(min_new_tokens=4), dict(num_beams=2),
                                    dict(do_sample=True, min_p=0.1), dict(return_dict_in_generate=True,
                                                                          output_scores=True)],
                         ids=["repetition_penalty", "min_new_tokens", "beams", "min_p", "output_scores"])
def test_options_microspec_does_not_apply_raise(tiny, option):
    model, ids, mask = tiny
    with pytest.raises(ValueError, match="microspec_generate"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, **{"do_sample": False, **option},
                       **_spec())


@pytest.mark.real_model
@pytest.mark.slow
def test_docs_example_runs_and_greedy_equals_spec_decoder_on_smollm2(smollm2_gguf):
    """The example loads the weights itself (as a reader would); the fixture skips where they are absent."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)     # the example asserts equality with plain generate itself
    model, inputs, greedy = scope["model"], scope["inputs"], scope["greedy"]
    direct = SpecDecoder(model, model, InContextPolicy(capacity=1024), 5).generate(
        inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=32)
    assert torch.equal(greedy, direct.sequences)
    assert scope["sampled"].spec_stats.mean_accepted_length > 1
