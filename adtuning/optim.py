"""SparseAdamW: AdamW whose state exists only for the entries of a child network.

Two kinds of parameter group share one optimizer:

* **sparse groups** — ``{"named_params": ..., "child": ChildNetwork, <hyper-parameters>}``.
  For every tensor with child entries the optimizer keeps ``exp_avg`` and ``exp_avg_sq``
  (fp32, length k_t) and, for bf16/fp16 weights, an fp32 master copy of the child entries.
  Their gradients live in a :class:`~adtuning.compact_grad.CompactGradStore`
  (``optimizer.grad_store``): a post-accumulate-grad hook gathers ``grad[indices]`` into a
  compact fp32 buffer and frees the dense gradient at once; micro-batch accumulation adds into
  the compact buffer. Tensors of the group without child entries get ``requires_grad=False``.
* **dense groups** — ordinary ``{"params": [...]}`` (heads, the layer-weighted sum), updated
  exactly like ``torch.optim.AdamW``.

The contract (tested): the child entries evolve exactly like ``torch.optim.AdamW`` applied to
the vector of those entries alone; every other entry stays bit-identical.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR

from adtuning.backends import get_backend, resolve_backend_name
from adtuning.child import ChildNetwork
from adtuning.compact_grad import CompactGradStore
from adtuning.reference.adamw import adamw_update_

_HYPER = ("lr", "betas", "eps", "weight_decay")


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over child entries (sparse groups) and whole tensors (dense groups).

    Args:
        params: an iterable of parameter groups. A sparse group is a dict with
            ``"named_params"`` (mapping or iterable of ``(name, parameter)``) and ``"child"``
            (a :class:`~adtuning.child.ChildNetwork` whose names refer to those names); a dense
            group is a dict with ``"params"`` or a plain iterable of tensors. Groups may set
            ``lr``, ``betas``, ``eps``, ``weight_decay``.
        lr, betas, eps, weight_decay: defaults, as in ``torch.optim.AdamW``.
        backend: ``"reference"``, ``"native"``, ``"triton"`` or ``"fused"`` (resolved for the
            device of the first sparse parameter). Applies to the gradient gather and the
            sparse update; dense groups always use the PyTorch update.

    Attributes:
        grad_store: the :class:`~adtuning.compact_grad.CompactGradStore` of the sparse
            parameters' compact gradients (its gather hooks use this backend); the sparse
            weight-gradient path and the data-parallel reducer write and bind its buffers.
        backend_name, backend: the resolved backend.

    Example::

        child = ChildNetwork.from_scores(fisher, p=0.01)
        opt = SparseAdamW(
            [{"named_params": model.upstream.named_parameters(), "child": child},
             {"params": model.head_parameters(), "lr": 1e-3}],
            lr=1e-4, weight_decay=0.0, backend="fused")
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        backend: str = "reference",
    ) -> None:
        if lr < 0:
            raise ValueError(f"SparseAdamW: invalid lr {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"SparseAdamW: invalid betas {betas}")
        if eps < 0:
            raise ValueError(f"SparseAdamW: invalid eps {eps}")
        if weight_decay < 0:
            raise ValueError(f"SparseAdamW: invalid weight_decay {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        child_indices: list[tuple[torch.Tensor, torch.Tensor]] = []
        groups = [_prepare_group(g, child_indices) for g in _as_groups(params)]
        super().__init__(groups, defaults)

        sparse_params = self.sparse_parameters()
        device = sparse_params[0].device if sparse_params else torch.device("cpu")
        self.backend_name = resolve_backend_name(backend, device)
        self.backend = get_backend(self.backend_name, device)
        self.grad_store = CompactGradStore(child_indices, gather=self.backend.gather)

    # ---- gradients ----------------------------------------------------------------------

    def sparse_parameters(self) -> list[torch.Tensor]:
        """The parameters of the sparse groups that have child entries (in group order; the
        order of :attr:`grad_store`)."""
        return [p for g in self.param_groups if g["sparse"] for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the compact gradients of sparse groups (:meth:`CompactGradStore.zero`) and the
        gradients of dense groups."""
        self.grad_store.zero(set_to_none)
        super().zero_grad(set_to_none=set_to_none)

    def _all_grads(self) -> list[torch.Tensor]:
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                g = self.grad_store.grad(p) if group["sparse"] else p.grad
                if g is not None:
                    grads.append(g)
        return grads

    @torch.no_grad()
    def grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        """The global norm of all child-entry (compact) and dense-group gradients, as a tensor
        (0 when there are none); NaN or inf when any gradient holds NaN or inf."""
        grads = self._all_grads()
        if not grads:
            return torch.tensor(0.0)
        norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
        total: torch.Tensor = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), norm_type)
        return total

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, total_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Global-norm clipping over compact (child) and dense gradients, like ``clip_grad_norm_``.

        The norm is that of the vector of all child-entry gradients and all dense-group
        gradients; non-child entries never have gradients and do not count. ``total_norm``:
        that norm when the caller has just computed it (:meth:`grad_norm`). Returns the total
        norm before clipping.
        """
        grads = self._all_grads()
        if not grads:
            return torch.tensor(0.0)
        total = self.grad_norm(norm_type) if total_norm is None else total_norm
        clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(clip_coef.to(g.device, g.dtype))
        return total

    # ---- update -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step over every parameter that has a (compact or dense) gradient.

        The tensors of a sparse group go to the backend's ``sparse_adamw_multi_`` together (one
        call per device), which is bit for bit its ``sparse_adamw_`` on each tensor in turn.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            if group["sparse"]:
                self._sparse_group_step(group, hyper)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SparseAdamW: dense groups do not take torch sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                adamw_update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=float(state["step"].item()), **hyper)
        return loss

    def _sparse_group_step(self, group: dict[str, Any], hyper: dict[str, float]) -> None:
        """One AdamW step on the child entries of a sparse group's tensors that have a gradient:
        one ``sparse_adamw_multi_`` call per device, each tensor at its own step count."""
        batches: dict[torch.device, _SparseBatch] = {}
        for p in group["params"]:
            grad = self.grad_store.grad(p)
            if grad is None:
                continue
            state = self._sparse_state(p)
            state["step"] += 1
            batch = batches.setdefault(p.device, _SparseBatch())
            batch.params.append(p.data)
            batch.grads.append(grad)
            batch.indices.append(self.grad_store.indices(p))
            batch.exp_avgs.append(state["exp_avg"])
            batch.exp_avg_sqs.append(state["exp_avg_sq"])
            batch.masters.append(state.get("master"))
            batch.steps.append(float(state["step"].item()))
        for batch in batches.values():
            self.backend.sparse_adamw_multi_(
                batch.params, batch.grads, batch.indices, batch.exp_avgs, batch.exp_avg_sqs, batch.masters, batch.steps,
                **hyper,
            )

    def _sparse_state(self, p: torch.Tensor) -> dict[str, Any]:
        state: dict[str, Any] = self.state[p]
        if not state:
            k = self.grad_store.indices(p).numel()
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros(k, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(k, dtype=torch.float32, device=p.device)
            if p.dtype != torch.float32:
                state["master"] = p.detach().reshape(-1).index_select(0, self.grad_store.indices(p).long()).float()
        return state

    # ---- persistence --------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any], *, adopt: bool = False) -> None:
        """Load a :meth:`state_dict`, keeping compact fp32 state in fp32 (unlike the base class,
        which would cast it to the parameter dtype) and checking it fits this optimizer.

        Args:
            state_dict: from :meth:`state_dict`.
            adopt: use the given state tensors themselves instead of copies (no transient second
                copy of the moments); the caller must not use them afterwards.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"SparseAdamW.load_state_dict: {len(saved_groups)} parameter groups saved, optimizer has {len(self.param_groups)}"
            )
        id_map: dict[int, torch.Tensor] = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]) or saved.get("sparse", False) != group["sparse"]:
                raise ValueError(f"SparseAdamW.load_state_dict: group {i} does not match (size or sparse/dense kind)")
            if group["sparse"] and list(saved.get("child_names", [])) != list(group["child_names"]):
                raise ValueError(f"SparseAdamW.load_state_dict: group {i} was saved for other child tensors")
            id_map.update(zip(saved["params"], group["params"]))
        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for key, values in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"SparseAdamW.load_state_dict: state for unknown parameter id {key}")
            p = id_map[key]
            restored: dict[str, Any] = {}
            for name, value in values.items():
                if name == "step":
                    restored[name] = value.detach().clone().to(torch.float32).cpu()
                elif isinstance(value, torch.Tensor):
                    value = value.detach().to(p.device)
                    restored[name] = value if adopt else value.clone()
                else:
                    restored[name] = value
            if p in self.grad_store and restored["exp_avg"].numel() != self.grad_store.indices(p).numel():
                raise ValueError(
                    f"SparseAdamW.load_state_dict: saved state has {restored['exp_avg'].numel()} entries "
                    f"but the child of this tensor has {self.grad_store.indices(p).numel()}"
                )
            new_state[p] = restored
        self.state = new_state
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key not in ("params", "sparse", "child_names"):
                    group[key] = tuple(value) if key == "betas" else value

    # ---- accounting ---------------------------------------------------------------------

    def memory_report(self) -> dict[str, int]:
        """Bytes held by the optimizer: state (moments, masters, steps), compact gradient
        buffers, index vectors, and the number of trained entries (sparse and dense)."""
        state_bytes = sum(
            t.numel() * t.element_size() for s in self.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )
        dense_grad_bytes = sum(
            p.grad.numel() * p.grad.element_size() for g in self.param_groups if not g["sparse"] for p in g["params"] if p.grad is not None
        )
        return {
            "state_bytes": state_bytes,
            "compact_grad_bytes": self.grad_store.grad_bytes(),
            "dense_grad_bytes": dense_grad_bytes,
            "index_bytes": self.grad_store.index_bytes(),
            "sparse_entries": self.grad_store.numel(),
            "dense_entries": sum(p.numel() for g in self.param_groups if not g["sparse"] for p in g["params"]),
        }

    def remove_hooks(self) -> None:
        """Detach the gradient-gather hooks (the parameters go back to ordinary gradients)."""
        self.grad_store.remove_hooks()


@dataclass
class _SparseBatch:
    """The arguments of one ``sparse_adamw_multi_`` call: the tensors of a group on one device."""

    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    indices: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    masters: list[torch.Tensor | None] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)


def _prepare_group(group: dict[str, Any], child_indices: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """A param group as the optimizer keeps it (``params``, ``sparse``, ``child_names``); the
    child indices of a sparse group's parameters are appended to ``child_indices``."""
    if "child" not in group:
        if "named_params" in group:
            raise ValueError("SparseAdamW: a group with 'named_params' needs a 'child' ChildNetwork")
        params = list(group["params"])
        out = {k: v for k, v in group.items() if k != "params"}
        out.update(params=params, sparse=False, child_names=[])
        return out
    child = group["child"]
    if not isinstance(child, ChildNetwork):
        raise TypeError(f"SparseAdamW: 'child' must be a ChildNetwork, got {type(child).__name__}")
    named = dict(group["named_params"])
    child.check_against(named, where="the group's named_params")
    params, names = [], []
    for name, param in named.items():
        idx = child.indices.get(name)
        if idx is None:
            # No child entries: autograd need not compute this weight gradient at all.
            param.requires_grad_(False)
            continue
        if not param.is_contiguous():
            raise ValueError(f"SparseAdamW: parameter {name!r} must be contiguous")
        if not param.requires_grad:
            param.requires_grad_(True)
        child_indices.append((param, idx))
        params.append(param)
        names.append(name)
    out = {k: v for k, v in group.items() if k not in ("named_params", "child", "params")}
    out.update(params=params, sparse=True, child_names=names)
    return out


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    given = list(params)
    if not given:
        raise ValueError("SparseAdamW: no parameters given")
    if all(isinstance(p, torch.Tensor) for p in given):
        return [{"params": given}]
    groups = []
    for g in given:
        if not isinstance(g, Mapping):
            raise TypeError("SparseAdamW: mix of tensors and groups; pass a list of group dicts")
        groups.append(dict(g))
    return groups


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The paper's schedule as an LR multiplier: linear warm-up from 0 to 1 over
    ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return multiplier


def get_linear_schedule_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, last_epoch: int = -1) -> LambdaLR:
    """``LambdaLR`` with :func:`linear_warmup_decay` (the schedule of a ``total_steps`` run)."""
    return LambdaLR(optimizer, linear_warmup_decay(warmup_steps, total_steps), last_epoch=last_epoch)
