"""pytest-benchmark: one captured draft step (K = 5) of the EAGLE-shaped drafter, dense head vs policies at
C = 3072 (bench_draft_step.py has the full matrix). extra_info: µs per drafted token and active rows."""
import pytest
import torch

from benchmarks.bench_draft_step import K, filled_run
from benchmarks.shapes import build
from microspec.drafting.base import DraftRequest
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy
from microspec.sampling import SamplingConfig

CUDA = torch.cuda.is_available()
SHAPE = "eagle-llama3-8b" if CUDA else "tiny-llama-1l"
C = 3072 if CUDA else 64


@pytest.fixture(scope="module")
def drafter():
    return build(SHAPE, "cuda" if CUDA else "cpu", torch.bfloat16 if CUDA else torch.float32)


POLICIES = {"dense": FullVocab, "static": lambda V: StaticFrequencyPolicy(torch.randperm(V), C),
            "incontext": lambda V: InContextPolicy(C, topk=3)}


@pytest.mark.parametrize("batch", [1, 8] if CUDA else [1])
@pytest.mark.parametrize("policy", list(POLICIES))
@torch.inference_mode()
def test_draft_step(benchmark, drafter, policy, batch):
    V = drafter.config.vocab_size
    make = POLICIES[policy]
    dec, run = filled_run(drafter, make() if policy == "dense" else make(V), batch, 512 if CUDA else 16)
    ids, n = dec.policy.active()

    def step():
        dec.head.refresh()
        dec.proposer.propose(DraftRequest(run.tokens, run.n, ids, n, SamplingConfig()))
    if CUDA:
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()

        def go():
            graph.replay()
            torch.cuda.synchronize()
    else:
        go = step
    benchmark.group = f"draft-step {SHAPE} B={batch}"
    benchmark.pedantic(go, rounds=20 if CUDA else 1, iterations=1, warmup_rounds=2 if CUDA else 0)
    if benchmark.stats is not None:
        benchmark.extra_info.update(us_per_token=benchmark.stats.stats.median / K * 1e6,
                                    active_rows=float(n.float().mean()))
