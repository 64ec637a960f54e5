"""PaCAAdamW: torch.optim.AdamW over the deltas of PaCALinear modules, fused with their column sync.

    delta <- AdamW(delta, delta.grad)   (decoupled weight decay, as torch.optim.AdamW(foreach=False))
    W[:, I] <- orig + s delta           (in the same pass: ops.paca_adamw_sync)

After `step()` every module's weight already holds its new W_eff, so no `sync_()` call is needed. Under
FSDP2 (weight, delta, its gradient and states all sharded by rows) each process steps and writes the rows
it holds. A delta whose grad is None is skipped (its state and weight untouched). The state per delta is
torch AdamW's ("step" as a float32 CPU scalar tensor, "exp_avg", "exp_avg_sq"), so `state_dict()` /
`load_state_dict()` are the inherited ones and a state dict moves between this optimizer and
torch.optim.AdamW over the same deltas in the same order.

Param groups follow torch's format with modules in place of tensors, e.g. per-group learning rates:

    PaCAAdamW([{"params": [q_proj, k_proj], "lr": 1e-3}, {"params": [mlp_up]}], lr=3e-4, weight_decay=0.0)

each group's own lr / betas / eps / weight_decay (checked like the defaults) override the defaults; other keys
are kept in the group, as torch does.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple, Union

import torch

from mmkernels.nn.paca_linear import PaCALinear
from mmkernels import _checks
from mmkernels.ops.paca_adamw import check_adamw_hparams, paca_adamw_sync


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch.optim's CPU step counter."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _hparams(where: str, lr, betas, eps, weight_decay):
    """(lr, (beta1, beta2), eps, weight_decay) as plain floats in AdamW's ranges; `where` prefixes errors."""
    # Plain numbers only (no tensors: they would be stored in the param groups).
    try:
        lr, eps, weight_decay = (_checks.number(n, v) for n, v in (("lr", lr), ("eps", eps),
                                                                    ("weight_decay", weight_decay)))
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        betas = (_checks.number("betas[0]", betas[0]), _checks.number("betas[1]", betas[1]))
        lr, beta1, beta2, eps, weight_decay = check_adamw_hparams(lr, betas, eps, weight_decay)
    except (TypeError, ValueError) as exc:
        if not where:
            raise
        raise type(exc)(where + str(exc)) from None
    return lr, (beta1, beta2), eps, weight_decay


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the state and gradient of an FSDP2 delta share its rows), else t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _modules_of(where: str, modules: List[Any]) -> List[PaCALinear]:
    if not modules:
        raise ValueError(f"{where}: expected at least one PaCALinear, got none")
    for i, m in enumerate(modules):
        if not isinstance(m, PaCALinear):
            raise TypeError(f"{where}[{i}]: expected a PaCALinear, got {type(m).__name__}")
    return modules


def _group(where: str, group: Dict[str, Any]):
    """(error prefix, the group's modules, its other keys) of a param-group dict."""
    if "params" not in group:
        raise ValueError(f"{where}: a param group needs a 'params' entry (its PaCALinear modules)")
    mods = group["params"]
    mods = [mods] if isinstance(mods, PaCALinear) else list(mods)
    return f"{where}: ", _modules_of(f"{where}['params']", mods), {k: v for k, v in group.items() if k != "params"}


class PaCAAdamW(torch.optim.Optimizer):
    def __init__(self, modules: Union[PaCALinear, Iterable[PaCALinear], Iterable[Dict[str, Any]]], lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        """modules: PaCALinear modules (one group), or param-group dicts whose "params" are PaCALinear modules."""
        items = [modules] if isinstance(modules, (PaCALinear, dict)) else list(modules)
        if not items:
            raise ValueError("modules: expected at least one PaCALinear, got none")
        if all(isinstance(g, dict) for g in items):
            groups = [_group(f"modules[{i}]", g) for i, g in enumerate(items)]
        elif any(isinstance(g, dict) for g in items):
            raise TypeError("modules: expected PaCALinear modules or param-group dicts, got a mix of both")
        else:
            groups = [("", _modules_of("modules", items), {})]
        lr, betas, eps, weight_decay = _hparams("", lr, betas, eps, weight_decay)
        # The module that owns each delta: kept beside the param groups so state_dict() holds no modules.
        self._owner = {}
        for _, group_modules, _ in groups:
            for m in group_modules:
                if id(m.delta) in self._owner:
                    raise ValueError(f"modules: the PaCALinear {m.name!r} is listed twice")
                self._owner[id(m.delta)] = m
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        param_groups = []
        for where, group_modules, options in groups:
            group = {**defaults, **options}
            group["lr"], group["betas"], group["eps"], group["weight_decay"] = _hparams(
                where, group["lr"], group["betas"], group["eps"], group["weight_decay"])
            param_groups.append({**group, "params": [m.delta for m in group_modules]})
        super().__init__(param_groups, defaults)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if id(p) not in self._owner:
                raise ValueError("PaCAAdamW takes the delta of a PaCALinear given to its constructor, got another "
                                 "tensor; build a new optimizer to add modules")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                module = self._owner[id(p)]
                if p is not module.delta:  # the module's delta was replaced after the optimizer was built
                    raise RuntimeError(f"PaCALinear {module.name!r}: its delta is no longer the tensor this optimizer "
                                       "was built with")
                state = self.state[p]
                if len(state) == 0:
                    # torch.optim.Adam's lazy initialization (non-capturable, non-fused): step on the CPU.
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                weight, orig, delta = module.local_rows()
                grad, exp_avg, exp_avg_sq = (_local(t) for t in (p.grad, state["exp_avg"], state["exp_avg_sq"]))
                if delta.numel():  # under FSDP2 a process can hold no rows of a narrow layer (no empty launch)
                    paca_adamw_sync(weight, orig, module.idx, module.scaling, delta, grad, exp_avg, exp_avg_sq,
                                    state["step"].item(), group["lr"], group["betas"], group["eps"],
                                    group["weight_decay"])
        return loss
