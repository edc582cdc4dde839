"""GPU-only checks of the EAGLE paths (skipped without CUDA): chain and EAGLE-2 tree drafting on the lean and
Hugging Face backends, eager and compiled, the whole step captured in a CUDA graph; greedy output equals the
target's own greedy output (float32), the captured step equals the eager one, and the step never syncs with
the host (`torch.cuda.set_sync_debug_mode("error")`)."""
import pytest
import torch
from tiny_models import EOS, PAD, VOCAB, tiny_model

from microspec import SpecDecoder
from microspec.testing import cuda_sync_errors
from microspec.baseline import PlainDecoder
from microspec.drafting.eagle import EagleDrafter
from microspec.drafting.tree import TreeSpec
from microspec.policies import FullVocab, InContextPolicy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA required")]

TREES = {"chain": None, "tree": TreeSpec(top_k=4, depth=4, total_tokens=16)}


def _setup(family="llama"):
    target = tiny_model(family).to("cuda", torch.float32)
    drafter = EagleDrafter.from_target(target, seed=0)
    ids = torch.randint(3, VOCAB, (4, 11), device="cuda")
    mask = torch.ones_like(ids)
    mask[2, :5] = 0
    return target, drafter, ids, mask


@pytest.mark.parametrize("backend", ["lean", "hf"])
@pytest.mark.parametrize("shape", sorted(TREES))
@pytest.mark.parametrize("compile", [False, True])
def test_eagle_greedy_exact_captured(backend, shape, compile):
    target, drafter, ids, mask = _setup()
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30,
                               eos_token_id=[EOS], pad_token_id=PAD)
    for policy in (FullVocab(), InContextPolicy(48, topk=3)):
        dec = SpecDecoder(target, drafter, policy, 4, tree=TREES[shape], backend=backend, compile=compile)
        out = dec.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[EOS], pad_token_id=PAD)
        assert torch.equal(out.sequences, expected), (backend, shape, type(policy).__name__)


@pytest.mark.parametrize("shape", sorted(TREES))
@pytest.mark.parametrize("do_sample", [False, True])
def test_eagle_captured_equals_eager_and_never_syncs(shape, do_sample):
    target, drafter, ids, mask = _setup()
    outs = []
    for graph in (True, False):
        dec = SpecDecoder(target, drafter, InContextPolicy(48, topk=3), 4, tree=TREES[shape],
                          cuda_graph=graph)
        gen = torch.Generator(device="cuda").manual_seed(3)
        outs.append(dec.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=do_sample,
                                 eos_token_id=[EOS], pad_token_id=PAD, generator=gen))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    with torch.inference_mode():
        run, _, _ = dec.new_run(ids, mask, 24, do_sample=do_sample, eos_token_id=[],
                                generator=torch.Generator(device="cuda").manual_seed(0))
        run.start()
        run.draw_noise()
        with cuda_sync_errors():
            run.step()


@pytest.mark.parametrize("backend", ["lean", "hf"])
def test_plain_decoder_backends_agree(backend):
    target, _, ids, mask = _setup()
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                               eos_token_id=[EOS], pad_token_id=PAD)
    out = PlainDecoder(target, backend=backend, compile=True).generate(ids, mask, max_new_tokens=20,
                                                                       eos_token_id=[EOS], pad_token_id=PAD)
    assert torch.equal(out, expected)
