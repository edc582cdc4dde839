"""Plain decoding of one model on the same engine and backends as `SpecDecoder`: the baseline every speed-up
is measured against (Hugging Face's `generate` spends most of its time in Python and kernel launches for
small models). It is the engine with a proposer that drafts nothing: each step verifies the last committed
token alone and commits the target's next token, so EOS, budget and padding follow the one rule of
`microspec.engine`, and the step is captured in a CUDA graph like a speculative one.

Output equals `model.generate(do_sample=False)` (same prompts, EOS and padding conventions).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .drafting.base import Commit, DraftRequest, Drafts
from .engine import DecodeRun, EngineParts
from .inputs import as_id_list
from .policies import FullVocab
from .sampling import SamplingConfig


class NoDraft:
    """The proposer of plain decoding: zero nodes per step, no head, nothing to observe."""

    head = None
    wants_target_hidden = False
    draws_noise = False
    num_nodes = 0

    def plan(self, max_nodes: int) -> int:
        return 0

    def allocate(self, batch_size: int, max_len: int) -> None:
        pass

    def prefill(self, tokens: Tensor, positions: Tensor, target_hidden: Tensor | None) -> None:
        pass

    def propose(self, request: DraftRequest) -> Drafts:
        empty = request.n.new_zeros(request.n.shape[0], 0)
        return Drafts(tokens=empty, parents=empty, depth=empty, valid=empty.bool())

    def observe(self, commit: Commit) -> None:
        pass

    def snapshot(self):
        return None

    def restore(self, state) -> None:
        pass


class PlainDecoder:
    """Greedy decoding, one token per step, per-row positions, no host sync inside a step.

    >>> out = PlainDecoder(model).generate(input_ids, attention_mask, max_new_tokens=128)   # [B, L + new]

    backend: "hf", "lean" or "auto" (see `microspec.decoder.model_backend`). After a CUDA run,
    `steady_state` = (tokens, seconds) decoded after the graph was captured: the rate without start-up costs.
    After `generate`, `generated` [B] holds each row's number of new tokens.
    """

    def __init__(self, model: nn.Module, cuda_graph: bool = True, prefill_chunk: int = 512,
                 compile: bool = False, backend: str = "auto"):
        from .decoder import model_backend
        self.lm = model_backend(model, backend, compile=compile)
        self.policy = FullVocab()
        self.cuda_graph = cuda_graph
        self.prefill_chunk = prefill_chunk
        self.num_steps = 0
        self.steady_state: tuple[int, float] | None = None

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id=None, pad_token_id: int = 0) -> Tensor:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        dev = self.lm.device
        ids = input_ids.to(dev)
        mask = (torch.ones_like(ids) if attention_mask is None else attention_mask).to(dev).bool()
        eos = as_id_list(eos_token_id, "eos_token_id")
        parts = EngineParts(self.lm, NoDraft(), self.policy, self.lm.vocab_size, self.prefill_chunk)
        run = DecodeRun(parts, ids, mask, max_new_tokens, SamplingConfig(), eos, cuda_graph=self.cuda_graph)
        run.start()
        timer = _SteadyStateTimer(dev)
        if run.cuda_graph and max_new_tokens > 1:
            run.capture()
            timer.start(run.generated)
        run.run_steps()
        self.num_steps = run.num_steps
        self.generated = run.generated        # [B] new tokens per row (the first included)
        self.steady_state = timer.stop(run.generated)
        return run.sequences(ids, pad_token_id)


class _SteadyStateTimer:
    """(tokens, seconds) decoded after the CUDA graph was captured. None off CUDA or without a graph."""

    def __init__(self, device: torch.device):
        self.cuda, self.begin = device.type == "cuda", None

    def start(self, generated: Tensor) -> None:
        if self.cuda:
            self.tokens0 = generated.sum()
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()

    def stop(self, generated: Tensor):
        if self.begin is None:
            return None
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return int(generated.sum() - self.tokens0), self.begin.elapsed_time(end) / 1e3
