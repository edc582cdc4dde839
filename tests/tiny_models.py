"""Tiny random Hugging Face models (float64 on CPU, so greedy ties are practically impossible) and toy
Markov "language models" with exactly known distributions."""
from __future__ import annotations

import torch
from torch import nn
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 131  # not a power of two, not a multiple of any kernel block
EOS, BOS, PAD = 2, 1, 0

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=BOS,
               eos_token_id=EOS, pad_token_id=PAD, attn_implementation="sdpa")

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 16}),  # window shorter than the tests
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 8}),
}


def tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = VOCAB, **overrides) -> nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**_COMMON, **extra, "vocab_size": vocab_size, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).double().eval()
    with torch.no_grad():  # sharper distributions than the default init: repeated tokens, real acceptance
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def noisy_copy(model: nn.Module, scale: float, seed: int = 1) -> nn.Module:
    """A drafter close to `model`: same weights plus Gaussian noise (partial acceptance)."""
    import copy
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            # CPU generator: any device
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
            p.add_(noise * scale * p.std().clamp_min(1e-3))
    return other


class _Config:
    def __init__(self, vocab_size):
        self.vocab_size = self.hidden_size = vocab_size
        self.num_hidden_layers = 0
        self.bos_token_id = self.eos_token_id = self.pad_token_id = None
        self._attn_implementation = "sdpa"
        self.model_type = "markov"


class _Out:
    def __init__(self, logits=None, last_hidden_state=None):
        self.logits, self.last_hidden_state = logits, last_hidden_state


class _OneHot(nn.Module):
    """The Markov "decoder": no layers; the hidden state is the one-hot current token [B, T, V]."""

    layers = nn.ModuleList()

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids=None, inputs_embeds=None, **_):
        return _Out(last_hidden_state=nn.functional.one_hot(input_ids, self.vocab_size).double())


class MarkovLM(nn.Module):
    """A first-order Markov chain dressed as a Hugging Face causal LM: the next-token distribution is
    probs[current token]. The hidden state is the one-hot current token and the head weight is
    log(probs).T, so a `SparseLMHead` restricts it exactly like a real drafter head.

    probs [V, V] rows sum to 1; zeros become -1e4 logits (exp underflows to exactly 0 in float64).
    """

    base_model_prefix = "model"

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        V = probs.shape[0]
        self.config = _Config(V)
        self.probs = probs.double()
        self.model = _OneHot(V)
        self.lm_head = nn.Linear(V, V, bias=False, dtype=torch.float64)
        with torch.no_grad():
            logp = torch.where(self.probs > 0, self.probs.clamp_min(1e-300).log(),
                               torch.tensor(-1e4, dtype=torch.float64))
            self.lm_head.weight.copy_(logp.T)
        self._anchor = nn.Parameter(torch.zeros(1, dtype=torch.float64), requires_grad=False)

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, head):
        self.lm_head = head

    def forward(self, input_ids, **_):
        return _Out(self.lm_head(self.model(input_ids).last_hidden_state))
