"""A whole decode step (policy, head refresh, K drafter forwards, target forward, verification, commit,
stats) never reads device memory from the host: it could run inside a CUDA graph. Checked on CPU with
`no_host_sync()`, which rejects every host read of tensor data whatever the device."""
import pytest
import torch
from tiny_models import FAMILIES, VOCAB, noisy_copy, tiny_model

from microspec import SpecDecoder
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy
from microspec.testing import HostSyncError, no_host_sync

POLICIES = {
    "full": FullVocab,
    "static": lambda: StaticFrequencyPolicy(torch.arange(VOCAB), capacity=40),
    "incontext": lambda: InContextPolicy(capacity=24, topk=3),
}


def started_run(family, policy, do_sample, head_mode="repack"):
    target = tiny_model(family)
    decoder = SpecDecoder(target, noisy_copy(target, 0.3), POLICIES[policy](), 3, head_mode=head_mode)
    ids = torch.randint(3, VOCAB, (3, 6))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :2] = False
    run, _, _ = decoder.new_run(ids, mask, 12, do_sample=do_sample, temperature=0.8,    # no EOS: rows run on
                                top_k=20 if do_sample else None, eos_token_id=[],
                                generator=torch.Generator().manual_seed(0))
    run.start()
    return run


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("do_sample", [False, True])
def test_decode_step_never_syncs(family, policy, do_sample):
    run = started_run(family, policy, do_sample)
    with torch.inference_mode():
        for _ in range(3):
            run.draw_noise()                    # outside the step: the generator lives on the host side
            with no_host_sync():
                run.step()
    assert int(run.generated.min()) >= 4


def test_gather_head_mode_step_never_syncs():
    run = started_run("llama", "incontext", do_sample=True, head_mode="gather")
    with torch.inference_mode(), no_host_sync():
        run.step()


def test_the_detector_would_notice():
    run = started_run("llama", "incontext", do_sample=False)
    run.policy.on_commit = lambda ids, mask, topk=None, hidden=None: ids.tolist()
    with pytest.raises(HostSyncError), torch.inference_mode(), no_host_sync():
        run.step()
