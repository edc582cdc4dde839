"""`EagleDrafter`: an EAGLE-1/2 feature drafter over a target's own embedding and LM head.

    e_t  = embed(x_{t+1})                       the target's input embedding (Gemma: times sqrt(d)), frozen
    z_t  = fc([e_t ; f_t])                      fc: Linear(2D -> D), embedding first; no activation
    g_t  = layer(z_<=t)                         ONE decoder layer of the target's family, causal attention;
                                                no input norm on the layer, no final norm after it
    p    = softmax(target_head(g_t))            the target's own LM head, frozen and shared by reference

f_t is the target's final hidden state at position t (after its final norm: the input of its LM head), so
drafter position t pairs f_t with the *next* token x_{t+1}, and its output g_t regresses f_{t+1}: the head
turns it into a guess of x_{t+2}. Drafting a chain feeds g_t back as the next feature (EAGLE's loop). Because
the head is the target's, every vocabulary policy prunes it with no retraining.

The layer is built as a one-layer copy of the target's own decoder class (`type(target.base_model)`) from a
copy of the target's config; for families with per-layer attention types (Gemma-3: five sliding-window
layers per global one) the drafter's layer is "full_attention": it reads the drafter's whole cache (its
context is the sequence so far, not a window), tree drafting needs no window rule, and it uses the global
RoPE base. Trainable weights are `fc` and the layer only (~2D^2 + one layer: 4.2M for SmolLM2-135M).

    >>> drafter = EagleDrafter.from_target(target)                          # doctest: +SKIP
    >>> g = drafter.forward_train(next_ids, features)                       # [B, T, D]  # doctest: +SKIP
    >>> drafter.save_pretrained("ckpt"); EagleDrafter.from_pretrained("ckpt", target)  # doctest: +SKIP

Checkpoint (`save_pretrained`): `eagle_drafter.json` (format, the target's fingerprint, fc bias, layer
type, the one-layer config) + `eagle_drafter.safetensors` (fc.* and decoder.layers.0.*). `from_pretrained`
refuses, in one line and before loading any weight, a checkpoint trained for another target.
`export_eagle` / `import_eagle` (in `eagle_export.py`) speak the EAGLE / SGLang / vLLM layout.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..kernels.skinny_linear import skinny_linear
from ..models.base import apply_logit_transform

FORMAT = "microspec-eagle"
VERSION = 1
CONFIG_FILE = "eagle_drafter.json"
WEIGHTS_FILE = "eagle_drafter.safetensors"
PROBE_ROWS, PROBE_DIMS = 4, 8          # fingerprint: a few rows of the target's embedding and head
PROBE_RTOL = 0.02                      # of the probe's largest value: dtype changes pass, other models don't


def target_fingerprint(target: nn.Module) -> dict:
    """What identifies a target for a drafter: family, sizes, and a few rows of its embedding and head.

    The probe values survive a dtype change (bf16/fp32/fp64 of the same weights match within PROBE_RTOL)
    and differ between any two trained or randomly initialised models of one shape.
    """
    emb = target.get_input_embeddings().weight
    head = target.get_output_embeddings().weight
    def probe(w: Tensor) -> list[list[float]]:
        ids = torch.linspace(0, w.shape[0] - 1, PROBE_ROWS).long().to(w.device)
        return [[round(float(v), 6) for v in row] for row in w.detach()[ids, :PROBE_DIMS].float().cpu()]
    return {"model_type": getattr(target.config, "model_type", None), "hidden_size": int(emb.shape[1]),
            "vocab_size": int(head.shape[0]), "input_vocab": int(emb.shape[0]),
            "embedding_probe": probe(emb), "head_probe": probe(head)}


def fingerprint_mismatch(saved: dict, target: nn.Module) -> str | None:
    """Why a drafter trained for `saved` cannot serve `target` (one line), or None when it can."""
    have = target_fingerprint(target)
    for key in ("model_type", "hidden_size", "vocab_size", "input_vocab"):
        if saved.get(key) != have[key]:
            return f"{key} {saved.get(key)} != this target's {have[key]}"
    for key in ("embedding_probe", "head_probe"):
        a, b = torch.tensor(saved[key]), torch.tensor(have[key])
        if a.shape != b.shape or (a - b).abs().max() > PROBE_RTOL * max(float(a.abs().max()), 1e-6):
            return f"its {key.replace('_', ' ')} differs from this target's (weights of another model)"
    return None


def one_layer_config(config, layer_type: str | None = None):
    """A copy of the target's config with one decoder layer (its attention type: `layer_type`, default
    "full_attention", for families that list per-layer types)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [layer_type or "full_attention"]
    elif layer_type not in (None, "full_attention"):
        raise ValueError(f"{cfg.model_type} has no per-layer attention types; layer_type={layer_type!r}")
    return cfg


class EagleDrafter(nn.Module):
    """EAGLE-1/2 drafter: `fc` + one decoder layer, over the target's embedding and head (not owned).

    Attributes:
        fc       Linear(2D -> D), bias per `fc_bias`
        decoder  the target family's decoder model with one layer; its embedding is removed (inputs come
                 as `inputs_embeds`), its final norm and layer 0's input norm are Identity (EAGLE-1); the
                 lean backend runs such norm-free layers too
        target   the target model (held by reference outside the module tree: `.to()`, `state_dict()` and
                 `parameters()` never touch it)
    """

    def __init__(self, target: nn.Module, decoder: nn.Module, fc_bias: bool = False):
        super().__init__()
        D = target.get_input_embeddings().weight.shape[1]
        self._target = [target]                       # a list: not registered as a submodule
        self._view: list[nn.Module] = []              # the `as_causal_lm` view its backends run (made once)
        self.fc = nn.Linear(2 * D, D, bias=fc_bias)
        self.decoder = decoder
        self.layer_type = (getattr(decoder.config, "layer_types", None) or [None])[0]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_target(cls, target: nn.Module, fc_bias: bool = False, layer_type: str | None = None,
                    dtype: torch.dtype | None = None, device=None, seed: int | None = None) -> "EagleDrafter":
        """A freshly initialised drafter for `target` (its family's init for the layer, PyTorch's for fc).

        dtype / device default to the target's. The layer is built at a one-row vocabulary so no V x D
        embedding is ever allocated (262k x 640 for Gemma-3), then the config gets the real sizes back.
        """
        if seed is not None:
            torch.manual_seed(seed)
        cfg = one_layer_config(target.config, layer_type)
        vocab, pad = cfg.vocab_size, getattr(cfg, "pad_token_id", None)
        cfg.vocab_size, cfg.pad_token_id = 1, None
        decoder = type(target.base_model)(cfg)
        cfg.vocab_size, cfg.pad_token_id = vocab, pad
        decoder.embed_tokens = None
        decoder.norm = nn.Identity()
        decoder.layers[0].input_layernorm = nn.Identity()
        ref = next(target.parameters())
        return cls(target, decoder, fc_bias).to(device=device or ref.device, dtype=dtype or ref.dtype)

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    @property
    def hidden_size(self) -> int:
        return self.fc.out_features

    @property
    def head_weight(self) -> Tensor:
        """The target's LM-head weight [V, D] (what a `SparseLMHead` for this drafter wraps)."""
        return self.target.get_output_embeddings().weight

    # ------------------------------------------------------------------ compute
    def embed(self, tokens: Tensor) -> Tensor:
        """The target's input embedding of tokens [B, T] -> [B, T, D] (detached: it is frozen). Ids beyond
        the embedding (a padded head's extra rows) are clamped."""
        emb = self.target.get_input_embeddings()
        return emb(tokens.clamp(0, emb.weight.shape[0] - 1)).detach()

    def fuse(self, tokens: Tensor, features: Tensor) -> Tensor:
        """fc([embed(tokens) ; features]): tokens [B, T] (x_{t+1}), features [B, T, D] (f_t) -> [B, T, D],
        the layer's input (`embeds` of a model backend)."""
        x = torch.cat([self.embed(tokens).to(features.dtype), features], dim=-1)
        if torch.is_grad_enabled():        # training: autograd through nn.Linear
            return self.fc(x)
        return skinny_linear(x, self.fc.weight, self.fc.bias)   # drafting: a few rows (see the kernel)

    def forward_train(self, input_ids: Tensor, features: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None) -> Tensor:
        """Predicted next features over whole sequences, full causal attention, no cache.

        input_ids [B, T] with input_ids[:, t] = x_{t+1}; features [B, T, D] with features[:, t] = f_t;
        attention_mask [B, T] (1 = real, right padding); returns g [B, T, D], g[:, t] ~ f_{t+1}.
        """
        out = self.decoder(inputs_embeds=self.fuse(input_ids, features), attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: Tensor, features: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.forward_train(input_ids, features, attention_mask)

    def logits(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary logits of hidden [..., D] through the target's head and logit transform."""
        head = self.target.get_output_embeddings()
        return apply_logit_transform(self.target.config, head(hidden.to(head.weight.dtype)))

    def as_causal_lm(self) -> nn.Module:
        """The drafter as a one-layer model of the target's own `...ForCausalLM` class, for a model backend
        (`microspec.models.hf.CausalLM`). It shares every weight: this drafter's layer, the target's
        embedding (as `embed_tokens`) and head; nothing is copied. Feed it `inputs_embeds = fuse(...)`."""
        target = self.target
        decoder = copy.copy(self.decoder)
        decoder._modules = dict(self.decoder._modules)
        decoder.embed_tokens = target.get_input_embeddings()
        lm = copy.copy(target)
        lm._modules = dict(target._modules)
        lm.config = self.decoder.config
        setattr(lm, target.base_model_prefix, decoder)
        return lm

    def make_proposer(self, head=None, num_speculative_tokens: int = 5, backend: str = "auto",
                      compile: bool = False, tree=None):
        """An `EagleProposer` drafting through `head` (a `SparseLMHead` over the target's head weight;
        `SpecDecoder` builds it from the policy): K-token chains, or EAGLE-2 dynamic trees when `tree` is a
        `microspec.drafting.tree.TreeSpec`. `backend` ("auto", "lean", "hf") runs the one-layer model; it
        gets a cache of its own."""
        from ..decoder import model_backend
        from .eagle_proposer import EagleProposer
        if not self._view:                     # one view per drafter: its proposers share compiled graphs
            self._view.append(self.as_causal_lm())
        runner = model_backend(self._view[0], backend, compile=compile)
        return EagleProposer(self, runner, num_speculative_tokens, head=head, tree=tree, compile=compile)

    # ------------------------------------------------------------------ checkpoints
    def config_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "architecture": "eagle1",
                "fc_bias": self.fc.bias is not None, "layer_type": self.layer_type,
                "target": target_fingerprint(self.target),
                "trainable_parameters": sum(p.numel() for p in self.parameters()),
                "layer_config": self.decoder.config.to_dict()}

    def save_pretrained(self, path: str | Path, extra: dict | None = None,
                        dtype: torch.dtype | None = None) -> Path:
        """Write `eagle_drafter.json` + `eagle_drafter.safetensors` (trainable weights only, in `dtype`,
        default their own: bfloat16 halves a float32 checkpoint) into `path`; `extra` joins the JSON."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": FORMAT})
        config = {**self.config_dict(), **(extra or {})}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str) + "\n")
        return path

    @staticmethod
    def read_config(path: str | Path) -> dict:
        path = Path(path)
        file = path / CONFIG_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no EAGLE drafter checkpoint at {path} (expected {CONFIG_FILE})")
        config = json.loads(file.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{file} is not a microspec EAGLE drafter (format {config.get('format')!r})")
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path, target: nn.Module, dtype: torch.dtype | None = None,
                        device=None) -> "EagleDrafter":
        """Load a checkpoint of `save_pretrained` for `target`; ValueError (one line) if it was trained for
        another model. dtype / device default to the target's."""
        from safetensors.torch import load_file
        path = Path(path)
        config = cls.read_config(path)
        why = fingerprint_mismatch(config["target"], target)
        if why:
            raise ValueError(f"EAGLE drafter {path} was trained for another model: {why}")
        drafter = cls.from_target(target, fc_bias=config["fc_bias"], layer_type=config.get("layer_type"),
                                  dtype=dtype, device=device)
        drafter.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)   # cast to the drafter's
        return drafter

    def export_eagle(self, path: str | Path, include_embedding: bool = True) -> Path:
        """Write the EAGLE-1/2 checkpoint layout (config.json + model.safetensors) read by EAGLE, SGLang and
        vLLM. See `microspec.drafting.eagle_export.export_eagle`."""
        from .eagle_export import export_eagle
        return export_eagle(self, path, include_embedding=include_embedding)

    @classmethod
    def import_eagle(cls, path: str | Path, target: nn.Module, dtype: torch.dtype | None = None,
                     device=None) -> "EagleDrafter":
        """Load an EAGLE-1/2 checkpoint directory (config.json + model.safetensors) for `target`."""
        from .eagle_export import import_eagle
        return import_eagle(path, target, dtype=dtype, device=device)
