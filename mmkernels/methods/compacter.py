"""Compacter and Compacter++ (arXiv 2106.04647); the math is in METHODS.md section 5.

A bottleneck adapter Ad(v) = v + PHM_up(gelu(PHM_down(v))) (nn.PHMAdapter, one fused op): after the attention
and after the MLP of every block ("compacter", Houlsby placement) or after the MLP only ("compacterpp"). The
phm rule (n, n, n) is one parameter shared by every adapter of the model (down and up layers alike) when
shared_phm_rule is set, as in the paper and the `adapters` library; the fast weights s, t and the biases are
per layer. The shared rule is a parameter of the model itself (compacter_phm_rule), which each adapter reads
at its forward; no block holds it, so FSDP2 shards every block on its own.

    apply(model, CompacterConfig(variant="compacterpp", reduction=32))
    count_parameters(model)          # {"phm_rule": ..., "layers": ..., "total": ...}
    save_adapter(model, "out/"); load_adapter(base_model, "out/")

What the adapter reads (`input`), with r the residual stream entering the sublayer and o the sublayer's output
(attention or MLP, before the residual add):
    "sublayer"  stream' = r + Ad(o)          (default of "compacter"; the library's Compacter)
    "stream"    stream' = Ad(r + o)          (default of "compacterpp"; the library's Compacter++, MLP only)
Both are the `adapters` library's exact formulas on LLaMA (its LlamaDecoderLayer calls
output_adapters(o, r, layer_norm=None)). Its Compacter (DoubleSeqBnConfig: original_ln_before=False,
residual_before_ln=True, original_ln_after=True) feeds the adapter o with o as the adapter's skip input and
adds r afterwards: (o + A(o)) + r, with A = PHM_up gelu PHM_down. Its Compacter++ (SeqBnConfig:
original_ln_before=True, residual_before_ln=True, original_ln_after=True) has no layer norm to apply (None),
so pre_forward only adds the residual, s = o + r, and feeds the adapter s; residual_before_ln=True then means
the adapter's own skip input is o (the value before that add), and post_forward adds r once more without a
norm: (o + A(s)) + r = s + A(s) = Ad(s). So the output replaces the stream; r is counted once. (With
residual_before_ln=False the skip input would be s and r would be added twice.) Here Ad(s) is computed as
s + A(s) in one op, which differs from the library's order of additions by rounding only.

Placement, by forward hooks (the base parameters keep their names, models/llama.py is unchanged):
"sublayer" hooks block.self_attn / block.mlp, which return o before the residual add. "stream" hooks the
block, which returns (o, r) for the next fused add + norm (models/llama.py), and returns (Ad(o + r), None): the
next block (or the final norm) then reads Ad(s) as the whole stream. The adapter module is block.mlp.compacter in
every case, so the saved parameter names do not depend on `input`.

Adapters saved before `input` existed have no "input" key in adapter_config.json, and both variants then
read the sublayer output; load_adapter gives such a file input="sublayer" (a "compacterpp" one too, whose
default is now "stream"), so it loads with the behaviour it was trained with. A config built from a dict
elsewhere (CompacterConfig.from_dict, the trainer's method options) gets the variant's default.

There is no merge(): the GELU between the two PHM layers keeps the adapter from folding into the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch
from torch import nn

from mmkernels import _checks
from mmkernels.methods import _adapter_io
from mmkernels.models.llama import Llama
from mmkernels.nn.phm_adapter import INITS, SHARED_RULE_STD, PHMAdapter, new_phm_rule

VARIANTS = {"compacter": ("self_attn", "mlp"), "compacterpp": ("mlp",)}
INPUTS = ("sublayer", "stream")
DEFAULT_INPUT = {"compacter": "sublayer", "compacterpp": "stream"}  # the `adapters` library's behaviour
RULE_NAME = "compacter_phm_rule"  # the shared rule, a parameter of the model itself
MODULE_NAME = "compacter"  # the adapter's attribute on each adapted sublayer


@dataclasses.dataclass
class CompacterConfig:
    """variant "compacter" (after attention and MLP) or "compacterpp" (after the MLP only); input: what the
    adapter reads, "sublayer" (the sublayer's output, before the residual add) or "stream" (the residual stream
    after the MLP's add; "compacterpp" only); None: the variant's default, as the `adapters` library ("sublayer"
    for "compacter", "stream" for "compacterpp"); n: the phm dimension (hidden size and bottleneck divisible by
    it); reduction: bottleneck = hidden // reduction; rank: of each s_i t_i (1 in the paper); shared_phm_rule:
    one rule for all adapters (else each adapter owns a rule per PHM layer); init: "adapters" (the library's
    initialisation, close to the identity) or "identity" (t_up = 0 too: the model starts exactly as the base
    model); seed: of the initialisation."""

    variant: str = "compacter"
    input: Optional[str] = None
    n: int = 4
    reduction: int = 32
    rank: int = 1
    shared_phm_rule: bool = True
    init: str = "adapters"
    seed: int = 0

    def __post_init__(self) -> None:
        _checks.one_of("variant", self.variant, tuple(VARIANTS))
        if self.input is None:
            self.input = DEFAULT_INPUT[self.variant]
        _checks.one_of("input", self.input, INPUTS)
        if self.variant == "compacter" and self.input == "stream":
            # The stream after the attention's add exists only inside the block's fused add + norm.
            raise ValueError("variant, input: variant='compacter' adapts the attention's output too, which has "
                             "no 'stream' placement; input='stream' is only for variant='compacterpp' (the "
                             "library's Compacter++), got variant='compacter' with input='stream'")
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

    @classmethod
    def from_saved_dict(cls, raw: Dict[str, Any]) -> "CompacterConfig":
        """from_dict for an adapter_config.json: one without "input" predates the option, when every variant
        read the sublayer output."""
        if isinstance(raw, dict) and "input" not in raw:
            raw = {**raw, "input": "sublayer"}
        return cls.from_dict(raw)


def _adapt_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, MODULE_NAME)(output)


def _adapt_stream(block: nn.Module, args, output):
    x, residual = output  # the MLP's output and the stream before its add
    # No residual: the next block's norm (or the final norm) takes Ad(s) as the whole stream, as the first
    # block takes the embeddings.
    return getattr(block.mlp, MODULE_NAME)(x + residual), None


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
        # Held by the model alone, read by every adapter at its forward (PHMAdapter's (module, name) form).
        setattr(model, RULE_NAME, rule)
    for block in model.layers:
        for name in VARIANTS[cfg.variant]:
            owner = getattr(block, name)
            shared = None if rule is None else (model, RULE_NAME)
            adapter = PHMAdapter(hidden, cfg.reduction, cfg.n, cfg.rank, phm_rule=shared, init=cfg.init,
                                 generator=gen, **factory)
            setattr(owner, MODULE_NAME, adapter)
            if cfg.input == "sublayer":
                owner.register_forward_hook(_adapt_output)
            else:  # "compacterpp": the MLP's adapter, run on the stream after the block's last add
                block.register_forward_hook(_adapt_stream)
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
    """Apply the saved config to a base model (or check it matches the one applied) and load the weights; a
    config saved without "input" gets input="sublayer" (CompacterConfig.from_saved_dict)."""
    return _adapter_io.load(model, path, "compacter", CompacterConfig, "compacter_config", apply, adapter_parameters)
