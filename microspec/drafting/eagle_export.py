"""The EAGLE-1/2 checkpoint layout, as EAGLE (`eagle/model/cnets1.py`), SGLang (`LlamaForCausalLMEagle`) and
vLLM (`EagleLlamaForCausalLM`, `llama_eagle.py`) read it: a directory with

    config.json        a Llama config with num_hidden_layers = 1, "architectures": ["LlamaForCausalLM"] and
                       EAGLE's "bias" key (fc bias; EAGLE defaults it to True when absent, so it is written)
    model.safetensors  fc.weight [D, 2D] (+ fc.bias), layers.0.self_attn.{q,k,v,o}_proj.weight,
                       layers.0.mlp.{gate,up,down}_proj.weight, layers.0.post_attention_layernorm.weight
                       (no input_layernorm: EAGLE's layer 0 has none), and optionally embed_tokens.weight (the
                       target's embedding: EAGLE loads with strict=True and wants it; vLLM and SGLang skip it
                       and share the target's)

There is no final norm and no lm_head: the target's head is used. vLLM and SGLang prefix "model." to every
name except lm_head when loading. The layout describes a *Llama* layer, so only drafters of Llama-family
targets without attention/MLP biases (SmolLM2, Llama) can be exported; a Gemma-3 layer (q/k norms, four
norms per layer, GELU MLP, sqrt(d) embedding scale) has no counterpart there and is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

EXPORTABLE = ("llama",)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def _rope_scaling(cfg) -> dict | None:
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params.pop("rope_theta", None)
    return None if params.get("rope_type", "default") == "default" else params


def eagle_config(drafter) -> dict:
    """config.json of the EAGLE layout for `drafter` (a Llama-family `EagleDrafter`)."""
    cfg = drafter.decoder.config
    if cfg.model_type not in EXPORTABLE:
        raise ValueError(f"the EAGLE-1/2 layout holds Llama layers; a {cfg.model_type!r} drafter layer has "
                         f"no counterpart there (exportable: {', '.join(EXPORTABLE)})")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("the EAGLE-1/2 Llama layer has no attention or MLP biases; this drafter's layer has")
    D = drafter.hidden_size
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bias": drafter.fc.bias is not None,
        "hidden_size": D, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or D // cfg.num_attention_heads,
        "hidden_act": cfg.hidden_act, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": _rope_theta(cfg),
        "rope_scaling": _rope_scaling(cfg), "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": drafter.head_weight.shape[0], "tie_word_embeddings": False,
        **{k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "initializer_range": cfg.initializer_range,
        "torch_dtype": str(drafter.fc.weight.dtype).removeprefix("torch."),
    }


def eagle_state_dict(drafter, include_embedding: bool = True) -> dict[str, torch.Tensor]:
    """The drafter's weights under EAGLE's names (CPU, contiguous)."""
    state = {f"fc.{k}": v for k, v in drafter.fc.state_dict().items()}
    state.update({f"layers.0.{k}": v for k, v in drafter.decoder.layers[0].state_dict().items()})
    if include_embedding:
        emb = drafter.target.get_input_embeddings().weight
        state["embed_tokens.weight"] = emb.to(drafter.fc.weight.dtype)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def export_eagle(drafter, path: str | Path, include_embedding: bool = True) -> Path:
    """Write config.json + model.safetensors of the EAGLE-1/2 layout into directory `path`."""
    from safetensors.torch import save_file
    config = eagle_config(drafter)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(eagle_state_dict(drafter, include_embedding), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def import_eagle(path: str | Path, target: nn.Module, dtype: torch.dtype | None = None, device=None):
    """An `EagleDrafter` for `target` from an EAGLE-1/2 directory (config.json + model.safetensors).

    Refuses (ValueError, one line, before loading weights) a checkpoint whose sizes differ from the target's,
    and one whose embed_tokens, when present, is not the target's embedding.
    """
    from safetensors import safe_open

    from .eagle import PROBE_RTOL, EagleDrafter
    path = Path(path)
    files = path / "config.json", path / "model.safetensors"
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"no EAGLE checkpoint at {path} (missing {f.name})")
    config = json.loads(files[0].read_text())
    family = getattr(target.config, "model_type", None)
    if family not in EXPORTABLE:
        raise ValueError(f"EAGLE-1/2 checkpoints hold Llama layers; this target is {family!r}")
    if config.get("rope_theta") is not None and float(config["rope_theta"]) != _rope_theta(target.config):
        raise ValueError(f"EAGLE checkpoint {path} uses rope_theta {config['rope_theta']}, this target "
                         f"{_rope_theta(target.config)}")
    emb = target.get_input_embeddings().weight
    V, D = target.get_output_embeddings().weight.shape[0], emb.shape[1]
    for key, want in (("hidden_size", D), ("vocab_size", V), ("num_hidden_layers", 1)):
        if config.get(key) != want:
            raise ValueError(f"EAGLE checkpoint {path} does not fit this target: {key} {config.get(key)} != "
                             f"{want}")
    with safe_open(str(files[1]), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    saved_emb = state.pop("embed_tokens.weight", None)
    if saved_emb is not None:
        ids = torch.linspace(0, emb.shape[0] - 1, 16).long()
        a, b = saved_emb[ids].float(), emb.detach()[ids.to(emb.device)].float().cpu()
        if saved_emb.shape != emb.shape or (a - b).abs().max() > PROBE_RTOL * float(b.detach().abs().max()):
            raise ValueError(f"EAGLE checkpoint {path} was trained for another model: its embedding differs")
    fc_bias = bool(config.get("bias", True))                  # EAGLE's default when the key is absent
    drafter = EagleDrafter.from_target(target, fc_bias=fc_bias, dtype=dtype, device=device)
    fc = {k[3:]: v for k, v in state.items() if k.startswith("fc.")}
    layer = {k[len("layers.0."):]: v for k, v in state.items() if k.startswith("layers.0.")}
    unknown = set(state) - {f"fc.{k}" for k in fc} - {f"layers.0.{k}" for k in layer}
    if unknown:
        raise ValueError(f"EAGLE checkpoint {path} has weights this drafter does not: {sorted(unknown)[:4]}")
    drafter.fc.load_state_dict(fc, strict=True)
    drafter.decoder.layers[0].load_state_dict(layer, strict=True)
    return drafter
