"""Real model shapes with random weights, for GPU benchmarks (no hub: configs only).

Drafters: an EAGLE-style drafter of Llama-3-8B (one decoder layer + the 128,256 x 4096 head), a standalone
drafter of Llama-3.2-1B shape (head 128,256 x 2048) and one of Qwen2.5-0.5B shape (151,936 x 896).
Targets: Llama-3-8B, Qwen2.5-7B for the Qwen drafter (its head is padded to 152,064: the same tokenizer
with different padding, which microspec accepts), and Qwen2.5-1.5B, the target of the real Qwen2.5-Coder pair
whose acceptance traces `microspec eval` records on the CPU.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    # name: (config class, model class, config kwargs)
    "eagle-llama3-8b": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=4096, intermediate_size=14336,
                                                          num_hidden_layers=1, num_attention_heads=32,
                                                          num_key_value_heads=8, vocab_size=128256)),
    "llama3.2-1b": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=2048, intermediate_size=8192,
                                                      num_hidden_layers=16, num_attention_heads=32,
                                                      num_key_value_heads=8, vocab_size=128256,
                                                      tie_word_embeddings=True)),
    "qwen2.5-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=896, intermediate_size=4864,
                                                       num_hidden_layers=24, num_attention_heads=14,
                                                       num_key_value_heads=2, vocab_size=151936,
                                                       tie_word_embeddings=True)),
    "qwen2.5-1.5b": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=1536, intermediate_size=8960,
                                                       num_hidden_layers=28, num_attention_heads=12,
                                                       num_key_value_heads=2, vocab_size=151936,
                                                       tie_word_embeddings=True)),
    "llama3-8b": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=4096, intermediate_size=14336,
                                                    num_hidden_layers=32, num_attention_heads=32,
                                                    num_key_value_heads=8, vocab_size=128256)),
    "qwen2.5-7b": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=3584, intermediate_size=18944,
                                                     num_hidden_layers=28, num_attention_heads=28,
                                                     num_key_value_heads=4, vocab_size=152064)),
    # tiny stand-ins for CPU smoke runs of the benchmark scripts
    "tiny-llama": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2, vocab_size=3000)),
    "tiny-llama-1l": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=1, num_attention_heads=4,
                                                        num_key_value_heads=2, vocab_size=3000)),
}

PAIRS = {  # target -> drafters benchmarked with it
    "llama3-8b": ("eagle-llama3-8b", "llama3.2-1b"),
    "qwen2.5-7b": ("qwen2.5-0.5b",),
    "qwen2.5-1.5b": ("qwen2.5-0.5b",),   # the Qwen2.5-Coder pair of `microspec eval`, for its replayed traces
    "tiny-llama": ("tiny-llama-1l",),
}


def build(name: str, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """A model of the named shape with random weights (std 0.02, Hugging Face's init), built on `device`."""
    return build_spec(SHAPES[name], device, dtype, seed)


def build_spec(spec, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """A model of shape `spec` = (config class, model class, config kwargs) with random weights, on `device`
    (the kwargs may override the defaults: context 8192, bos 1, eos 2, pad 0)."""
    config_cls, model_cls, kwargs = spec
    config = config_cls(**{"max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
                           "pad_token_id": 0, **kwargs}, attn_implementation="sdpa")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
