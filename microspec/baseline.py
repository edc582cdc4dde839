"""Plain greedy decoding of one model through the same static-cache path, optionally captured in a CUDA graph:
the strong baseline every speed-up is measured against (Hugging Face's eager `generate` spends most of its
time in Python and kernel launches for small models).

Output equals `model.generate(do_sample=False)` (same prompts, EOS and padding conventions).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .models.hf import CausalLM


class PlainDecoder:
    """Greedy decoding, one token per step, per-row positions, no host sync inside a step.

    >>> out = PlainDecoder(model).generate(input_ids, attention_mask, max_new_tokens=128)   # [B, L + new]
    """

    def __init__(self, model: nn.Module, cuda_graph: bool = True, prefill_chunk: int = 512, compile: bool = False):
        self.lm = CausalLM.of(model, compile=compile)
        self.cuda_graph = cuda_graph
        self.prefill_chunk = prefill_chunk
        self.num_steps = 0
        self.steady_state: tuple[int, float] | None = None   # (tokens, seconds) after graph capture

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id=None, pad_token_id: int = 0) -> Tensor:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        dev = self.lm.device
        ids = input_ids.to(dev)
        mask = (torch.ones_like(ids) if attention_mask is None else attention_mask).to(dev).bool()
        B, L = ids.shape
        S = L + max_new_tokens + 1
        lengths = mask.sum(1)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        self.tokens = torch.zeros(B, S, dtype=torch.long, device=dev)
        self.tokens[:, :L] = ids.gather(1, order).masked_fill(~mask.gather(1, order), 0)
        eos = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                           dtype=torch.long, device=dev)
        self.lm.allocate(B, S)
        last = None
        for c0 in range(0, L, self.prefill_chunk):
            c1 = min(L, c0 + self.prefill_chunk)
            logits = self.lm(self.tokens[:, c0:c1], torch.arange(c0, c1, device=dev).expand(B, -1))
            idx = (lengths - 1 - c0).clamp(0, c1 - c0 - 1).view(B, 1, 1).expand(B, 1, logits.shape[-1])
            cand = logits.gather(1, idx).squeeze(1)
            here = ((lengths - 1 >= c0) & (lengths - 1 < c1)).unsqueeze(1)
            last = cand if last is None else torch.where(here, cand, last)
        self.n, self.done = lengths.clone(), torch.zeros(B, dtype=torch.bool, device=dev)
        self.generated = torch.zeros(B, dtype=torch.long, device=dev)
        self.eos, self.max_new = eos, max_new_tokens
        self._commit(last.argmax(-1))
        graph = None
        self.num_steps = 0
        timer = _SteadyStateTimer(dev)
        for _ in range(max_new_tokens - 1):
            if self.cuda_graph and dev.type == "cuda" and graph is None:
                graph = self._capture()
                timer.start(self.generated)
            elif graph is not None:
                graph.replay()
            else:
                self.step()
            self.num_steps += 1
        self.steady_state = timer.stop(self.generated)
        G = int(self.generated.max())
        span = torch.arange(G, device=dev)
        new = self.tokens.gather(1, lengths.unsqueeze(1) + span).masked_fill(span >= self.generated[:, None],
                                                                              pad_token_id)
        return torch.cat([ids, new], dim=1)

    def _commit(self, token: Tensor) -> None:
        live = ~self.done
        self.tokens.scatter_(1, self.n.unsqueeze(1), token.unsqueeze(1))
        self.done |= live & (torch.isin(token, self.eos) | (self.generated + 1 >= self.max_new))
        self.n.add_(live.long())
        self.generated.add_(live.long())

    def step(self) -> None:
        """One token for every unfinished row (finished rows recompute their last position, harmlessly)."""
        pos = (self.n - 1).unsqueeze(1)
        logits = self.lm.decode(self.tokens.gather(1, pos), pos)[:, -1]
        self._commit(logits.argmax(-1))

    def _capture(self) -> "torch.cuda.CUDAGraph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()                                    # a real step, as warm-up
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        return graph


class _SteadyStateTimer:
    """(tokens, seconds) decoded after the CUDA graph was captured: the decode rate without start-up costs.
    None off CUDA or without a graph."""

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
