"""Model backends (how a model runs inside a decode step) and model loading.

    base.py     the backend contract (`ModelBackend`) and its slot-visibility rule (`visible_slots`)
    hf.py       `CausalLM`: any Hugging Face causal LM through a per-row static KV cache
    lean/       compact compiled code for Llama, Qwen2 and Gemma3 that loads a Hugging Face model's weights
    select.py   `make_backend(model, "auto" | "hf" | "lean")`
    loading.py  real weights (SmolLM2 GGUF, Hugging Face directories), early-exit drafters, tiny random models
"""
from ..paths import cache_dir
from .loading import early_exit_drafter, find_smollm2, load_gguf, load_model, tiny_random_model

__all__ = ["cache_dir", "early_exit_drafter", "find_smollm2", "load_gguf", "load_model", "tiny_random_model"]
