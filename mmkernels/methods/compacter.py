"""Compacter and Compacter++ (arXiv 2106.04647); the math is in METHODS.md section 5.

A bottleneck adapter y = h + PHM_up(gelu(PHM_down(h))) (nn.PHMAdapter, one fused op) on a sublayer's output
h, before the block's residual add: after the attention and after the MLP of every block ("compacter",
Houlsby placement) or after the MLP only ("compacterpp"). The phm rule (n, n, n) is one parameter shared by
every adapter of the model (down and up layers alike) when shared_phm_rule is set, as in the paper and the
`adapters` library; the fast weights s, t and the biases are per layer.

    apply(model, CompacterConfig(variant="compacterpp", reduction=32))
    count_parameters(model)          # {"phm_rule": ..., "layers": ..., "total": ...}
    save_adapter(model, "out/"); load_adapter(base_model, "out/")

Placement: the adapter runs as a forward hook of block.self_attn / block.mlp, which return their output
before the residual add (models/llama.py), so the base parameters keep their names and llama.py is unchanged.
For "compacter" this is exactly where the `adapters` library puts its Compacter on LLaMA. Its Compacter++
(SeqBnConfig: original_ln_before=True) instead reads the residual stream after the MLP's add on LLaMA
(adapter input = mlp_out + residual); here both variants read the sublayer output.

There is no merge(): the GELU between the two PHM layers keeps the adapter from folding into the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import torch
from torch import nn

from mmkernels import _checks
from mmkernels.methods import _adapter_io
from mmkernels.models.llama import Llama
from mmkernels.nn.phm_adapter import INITS, SHARED_RULE_STD, PHMAdapter, new_phm_rule

VARIANTS = {"compacter": ("self_attn", "mlp"), "compacterpp": ("mlp",)}
RULE_NAME = "compacter_phm_rule"  # the shared rule, a parameter of the model itself
MODULE_NAME = "compacter"  # the adapter's attribute on each adapted sublayer


@dataclasses.dataclass
class CompacterConfig:
    """variant "compacter" (after attention and MLP) or "compacterpp" (after the MLP only); n: the phm
    dimension (hidden size and bottleneck divisible by it); reduction: bottleneck = hidden // reduction;
    rank: of each s_i t_i (1 in the paper); shared_phm_rule: one rule for all adapters (else each adapter owns
    a rule per PHM layer); init: "adapters" (the library's initialisation, close to the identity) or
    "identity" (t_up = 0 too: the model starts exactly as the base model); seed: of the initialisation."""

    variant: str = "compacter"
    n: int = 4
    reduction: int = 32
    rank: int = 1
    shared_phm_rule: bool = True
    init: str = "adapters"
    seed: int = 0

    def __post_init__(self) -> None:
        _checks.one_of("variant", self.variant, tuple(VARIANTS))
        _checks.one_of("init", self.init, INITS)
        for name in ("n", "reduction", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.shared_phm_rule, bool):
            raise TypeError(f"shared_phm_rule: expected a bool, got {type(self.shared_phm_rule).__name__}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "CompacterConfig":
        return _checks.config_from_dict(cls, raw, "adapter config")


def _adapt_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, MODULE_NAME)(output)


def apply(model: Llama, cfg: CompacterConfig) -> Llama:
    """Install Compacter into `model` in place: freeze the base weights and add the adapters (trainable)."""
    if not isinstance(model, Llama):
        raise TypeError(f"model: expected an mmkernels Llama, got {type(model).__name__}")
    if not isinstance(cfg, CompacterConfig):
        raise TypeError(f"cfg: expected a CompacterConfig, got {type(cfg).__name__}")
    if getattr(model, "compacter_config", None) is not None:
        raise ValueError("model: Compacter is already applied to this model")
    hidden = model.config.hidden_size
    k = hidden // cfg.reduction
    if hidden % cfg.n or k < cfg.n or k % cfg.n:
        raise ValueError(f"cfg: hidden size {hidden} and bottleneck {hidden} // reduction {cfg.reduction} = {k} "
                         f"must both be positive multiples of n = {cfg.n}")
    model.requires_grad_(False)
    ref = model.embed_tokens.weight
    factory = dict(device=ref.device, dtype=ref.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    rule = None
    if cfg.shared_phm_rule:
        rule = new_phm_rule(cfg.n, SHARED_RULE_STD, generator=gen, **factory)
        setattr(model, RULE_NAME, rule)  # first in named_parameters: saved once, under this name
    for block in model.layers:
        for name in VARIANTS[cfg.variant]:
            owner = getattr(block, name)
            adapter = PHMAdapter(hidden, cfg.reduction, cfg.n, cfg.rank, phm_rule=rule, init=cfg.init,
                                 generator=gen, **factory)
            setattr(owner, MODULE_NAME, adapter)
            owner.register_forward_hook(_adapt_output)
    model.compacter_config = cfg
    return model


def adapter_parameters(model: Llama) -> Dict[str, nn.Parameter]:
    """The Compacter parameters by model-relative name (the shared rule once, as `compacter_phm_rule`)."""
    if getattr(model, "compacter_config", None) is None:
        raise ValueError("model: Compacter is not applied (call methods.compacter.apply first)")
    return {n: p for n, p in model.named_parameters() if n == RULE_NAME or f".{MODULE_NAME}." in n}


def count_parameters(model: Llama) -> Dict[str, int]:
    """Trainable Compacter parameters: the phm rule(s), the per-layer fast weights and biases, the total."""
    params = adapter_parameters(model)
    rules = sum(p.numel() for n, p in params.items() if n == RULE_NAME or n.rsplit(".", 1)[1].startswith("phm_rule"))
    total = sum(p.numel() for p in params.values())
    return {"phm_rule": rules, "layers": total - rules, "total": total}


def save_adapter(model: Llama, path: str) -> None:
    """Write the adapter alone: `adapter_model.safetensors` and `adapter_config.json`, each atomically."""
    params = adapter_parameters(model)
    _adapter_io.save(model, path, "compacter", model.compacter_config.to_dict(), params)


def load_adapter(model: Llama, path: str) -> Llama:
    """Apply the saved config to a base model (or check it matches the one applied) and load the weights."""
    return _adapter_io.load(model, path, "compacter", CompacterConfig, "compacter_config", apply, adapter_parameters)
