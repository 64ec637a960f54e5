"""PHMAdapter: the Compacter bottleneck adapter as a module, y = x + PHM_up(gelu(PHM_down(x))).

    PHM layer: x @ sum_i kron(A_i, s_i t_i) + b, never materialised (ops.phm_adapter, one fused kernel)
    x (..., d) -> (..., d); bottleneck k = d // reduction; d and k divisible by n; s_i t_i of rank r.

Parameters and their names in the `adapters` library (Compacter, factorized_phm_W=True), so that weights
transfer 1:1 (ADAPTERS_NAMES):
    s_down (n, d/n, r)  adapter_down.0.W_left      s_up (n, k/n, r)  adapter_up.W_left
    t_down (n, r, k/n)  adapter_down.0.W_right     t_up (n, r, d/n)  adapter_up.W_right
    b_down (k,)         adapter_down.0.b           b_up (d,)         adapter_up.b
    phm rule (n, n, n): shared (the library's default, shared_parameters[name]["phm_rule"], one tensor for
    the down and up layers of every adapter) when `phm_rule` is given; otherwise the module owns
    phm_rule_down / phm_rule_up (the library's adapter_down.0.phm_rule / adapter_up.phm_rule).

A shared rule is given either as an nn.Parameter, registered in every adapter that shares it (one object
under several names), or as (module, name): a parameter that a parent holds as `module.name`, read at each
forward and registered nowhere else. The second keeps the rule in one place, which FSDP2 needs to shard each
block on its own (a parameter belongs to one group) and which a cast of the parent's parameters cannot
split into copies (methods/compacter.py uses it).

Initialisation (init="adapters"), as the library does it in effect: s_i and t_i xavier-normal per i (the
library's config says "glorot-uniform", but its init_W tests the option's truthiness first, so every
non-empty value draws Glorot-normal), biases zero, an own phm rule N(0, 0.01^2), a shared rule (made by
`new_phm_rule`) N(0, phm_init_range^2) with phm_init_range = 1e-4. The adapter then starts close to, not
exactly at, the identity. init="identity" also zeroes t_up: the adapter starts exactly as y = x and still
learns (t_up's gradient u_up^T dy is non-zero, as LoRA's zero B).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from mmkernels.ops.phm import phm_adapter

ADAPTERS_NAMES: Dict[str, str] = {
    "s_down": "adapter_down.0.W_left", "t_down": "adapter_down.0.W_right", "b_down": "adapter_down.0.b",
    "s_up": "adapter_up.W_left", "t_up": "adapter_up.W_right", "b_up": "adapter_up.b",
    "phm_rule_down": "adapter_down.0.phm_rule", "phm_rule_up": "adapter_up.phm_rule",
}
INITS = ("adapters", "identity")
SHARED_RULE_STD = 1e-4  # the library's phm_init_range (a shared rule's std)
OWN_RULE_STD = 0.01  # the library's std of a per-layer rule


def new_phm_rule(n: int, std: float = SHARED_RULE_STD, device=None, dtype=None,
                 generator: Optional[torch.Generator] = None) -> nn.Parameter:
    """A phm rule (n, n, n) ~ N(0, std^2), to share among PHMAdapters."""
    rule = torch.empty(n, n, n, dtype=torch.float32, device="cpu")
    rule.normal_(0.0, std, generator=generator)
    return nn.Parameter(rule.to(device=device, dtype=dtype))


class PHMAdapter(nn.Module):
    def __init__(self, d: int, reduction: int = 32, n: int = 4, rank: int = 1,
                 phm_rule: Union[None, nn.Parameter, Tuple[nn.Module, str]] = None, init: str = "adapters",
                 device=None, dtype=None, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        for name, value in (("d", d), ("reduction", reduction), ("n", n), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        k = d // reduction
        if d % n:
            raise ValueError(f"d: expected a multiple of n = {n}, got {d}")
        if k < n or k % n:
            raise ValueError(f"reduction: the bottleneck d // reduction = {d} // {reduction} = {k} must be a "
                             f"positive multiple of n = {n}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        self.d, self.k, self.n, self.rank, self.reduction = d, k, n, rank, reduction
        factory = dict(device=device, dtype=dtype)

        def xavier(*shape):
            w = torch.empty(*shape, dtype=torch.float32)
            for i in range(shape[0]):  # per i, as the library's init_W: fans of the 2-D slice
                nn.init.xavier_normal_(w[i], generator=generator)
            return nn.Parameter(w.to(**factory))

        self.s_down = xavier(n, d // n, rank)
        self.t_down = xavier(n, rank, k // n)
        self.b_down = nn.Parameter(torch.zeros(k, **factory))
        self.s_up = xavier(n, k // n, rank)
        self.t_up = xavier(n, rank, d // n)
        self.b_up = nn.Parameter(torch.zeros(d, **factory))
        if init == "identity":
            with torch.no_grad():
                self.t_up.zero_()
        self.shared_rule = phm_rule is not None
        self._rule_holder: Optional[Tuple[nn.Module, str]] = None  # (parent, name) of a rule read at each forward
        if self.shared_rule:
            if isinstance(phm_rule, tuple):
                holder, name = phm_rule if len(phm_rule) == 2 else (None, None)
                if not isinstance(holder, nn.Module) or not isinstance(getattr(holder, str(name), None), nn.Parameter):
                    raise TypeError(f"phm_rule: expected (module, name) naming an nn.Parameter of the module, got "
                                    f"{phm_rule!r}")
                self._rule_holder = (holder, name)
                rule = getattr(holder, name)
            elif isinstance(phm_rule, nn.Parameter):
                self.phm_rule = rule = phm_rule
            else:
                raise TypeError(f"phm_rule: expected an nn.Parameter (shared by the adapters) or (module, name), got "
                                f"{type(phm_rule).__name__}")
            if tuple(rule.shape) != (n, n, n):
                raise ValueError(f"phm_rule: expected shape ({n}, {n}, {n}), got {tuple(rule.shape)}")
        else:
            self.phm_rule_down = new_phm_rule(n, OWN_RULE_STD, generator=generator, **factory)
            self.phm_rule_up = new_phm_rule(n, OWN_RULE_STD, generator=generator, **factory)

    @property
    def rules(self):
        """(rule of the down layer, rule of the up layer): one tensor twice when shared."""
        if self._rule_holder is not None:
            rule = getattr(*self._rule_holder)
            return rule, rule
        if self.shared_rule:
            return self.phm_rule, self.phm_rule
        return self.phm_rule_down, self.phm_rule_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rule_down, rule_up = self.rules
        # float32 master weights on a 16-bit model: the op computes in x's dtype, the gradients reach the masters.
        p = [t.to(x.dtype) for t in (rule_down, self.s_down, self.t_down, self.b_down, rule_up, self.s_up, self.t_up,
                                    self.b_up)]
        return phm_adapter(x, *p)

    @torch.no_grad()
    def load_adapters_state(self, state: Dict[str, torch.Tensor], phm_rule: Optional[torch.Tensor] = None) -> None:
        """Copy the weights of an `adapters` library Adapter (its state dict: ADAPTERS_NAMES) into this module;
        `phm_rule`: the library's shared rule, copied into the shared rule when this module has one."""
        for ours, theirs in ADAPTERS_NAMES.items():
            if ours.startswith("phm_rule") and self.shared_rule:
                continue
            if theirs not in state:
                raise ValueError(f"state: missing {theirs!r} (for {ours})")
            target = getattr(self, ours)
            if tuple(state[theirs].shape) != tuple(target.shape):
                raise ValueError(f"state: {theirs} has shape {tuple(state[theirs].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[theirs])
        if self.shared_rule:
            if phm_rule is None:
                raise ValueError("phm_rule: this adapter shares its rule; give the library's shared phm_rule")
            rule = self.rules[0]
            if tuple(phm_rule.shape) != tuple(rule.shape):
                raise ValueError(f"phm_rule: expected shape {tuple(rule.shape)}, got {tuple(phm_rule.shape)}")
            rule.copy_(phm_rule)

    def extra_repr(self) -> str:
        return (f"d={self.d}, k={self.k}, n={self.n}, rank={self.rank}, "
                f"phm_rule={'own' if not self.shared_rule else 'shared' if self._rule_holder is None else 'parent'}")
