"""SparseAdamW: AdamW whose state exists only for the entries of a child network.

Two kinds of parameter group share one optimizer:

* **sparse groups** — ``{"named_params": ..., "child": ChildNetwork, <hyper-parameters>}``.
  For every tensor with child entries the optimizer keeps ``exp_avg`` and ``exp_avg_sq``
  (fp32, length k_t) and, for bf16/fp16 weights, an fp32 master copy of the child entries.
  A post-accumulate-grad hook gathers ``grad[indices]`` into a compact fp32 buffer and frees
  the dense gradient at once; micro-batch accumulation adds into the compact buffer. Tensors
  of the group without child entries get ``requires_grad=False``.
* **dense groups** — ordinary ``{"params": [...]}`` (heads, the layer-weighted sum), updated
  exactly like ``torch.optim.AdamW``.

The contract (tested): the child entries evolve exactly like ``torch.optim.AdamW`` applied to
the vector of those entries alone; every other entry stays bit-identical.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR

from adtuning.backends import get_backend, resolve_backend_name
from adtuning.child import ChildNetwork
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
        self._indices: dict[torch.Tensor, torch.Tensor] = {}
        self._compact_grads: dict[torch.Tensor, torch.Tensor | None] = {}
        # With bound storage (bind_compact_grad_storage), each sparse parameter's compact
        # gradient lives at a fixed view of one caller-owned flat buffer.
        self._grad_views: dict[torch.Tensor, torch.Tensor] = {}
        self._hooks = []
        groups = [self._prepare_group(g) for g in _as_groups(params)]
        super().__init__(groups, defaults)

        sparse_params = [p for g in self.param_groups if g["sparse"] for p in g["params"]]
        device = sparse_params[0].device if sparse_params else torch.device("cpu")
        self.backend_name = resolve_backend_name(backend, device)
        self.backend = get_backend(self.backend_name, device)
        for p in sparse_params:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._gather_hook))

    # ---- construction -----------------------------------------------------------------

    def _prepare_group(self, group: dict) -> dict:
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
            self._indices[param] = idx.to(param.device)
            self._compact_grads[param] = None
            params.append(param)
            names.append(name)
        out = {k: v for k, v in group.items() if k not in ("named_params", "child", "params")}
        out.update(params=params, sparse=True, child_names=names)
        return out

    # ---- gradients ----------------------------------------------------------------------

    def _gather_hook(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        buffer = self._compact_grads.get(param)
        idx = self._indices[param]
        if buffer is None:
            view = self._grad_views.get(param)
            if view is None:
                self._compact_grads[param] = self.backend.gather(grad, idx)
            else:
                self._compact_grads[param] = self.backend.gather(grad, idx, out=view, accumulate=False)
        else:
            self.backend.gather(grad, idx, out=buffer, accumulate=True)
        param.grad = None  # the dense gradient is dead weight from here on

    def compact_grad_target(self, param: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The compact fp32 gradient buffer of a sparse parameter, for an op that writes the
        child entries of its gradient straight into it (the sparse Linear weight gradient of
        :mod:`adtuning.sparse_grad`), and whether that op must add onto it.

        The first write of a step gets a fresh, uninitialised buffer and ``False``; later
        writes (micro-batches, a layer called twice, a buffer kept by
        ``zero_grad(set_to_none=False)``) get the same buffer and ``True``.

        Raises:
            KeyError: ``param`` is not a sparse parameter of this optimizer.
        """
        buffer = self._compact_grads[param]
        if buffer is not None:
            return buffer, True
        buffer = self._grad_views.get(param)
        if buffer is None:
            buffer = torch.empty(self._indices[param].numel(), dtype=torch.float32, device=param.device)
        self._compact_grads[param] = buffer
        return buffer, False

    def compact_grad_numel(self) -> int:
        """Total child entries of the sparse parameters (the length of their compact gradients)."""
        return sum(self._indices[p].numel() for p in self.sparse_parameters())

    def bind_compact_grad_storage(self, storage: torch.Tensor) -> None:
        """Keep the compact gradients in ``storage`` from now on: one flat fp32 buffer of
        :meth:`compact_grad_numel` entries on the parameters' device, holding the compact
        gradient of every sparse parameter (in :meth:`sparse_parameters` order) at a fixed
        offset. A collective can then reduce all child gradients in place, in one call.

        The semantics are unchanged: a parameter without a gradient this step still reports
        ``None`` from :meth:`compact_grad` (its view is merely not written);
        ``zero_grad(set_to_none=True)`` forgets which views hold a gradient, ``False`` zeroes
        them. Gradients already accumulated are moved into the storage.

        Raises:
            ValueError: ``storage`` has the wrong size, dtype, device or layout.
        """
        params = self.sparse_parameters()
        total = self.compact_grad_numel()
        if storage.dim() != 1 or storage.numel() != total or storage.dtype != torch.float32 or not storage.is_contiguous():
            raise ValueError(f"SparseAdamW.bind_compact_grad_storage: need a contiguous 1-D float32 tensor of {total} "
                             f"entries, got {tuple(storage.shape)} {storage.dtype}")
        if params and storage.device != params[0].device:
            raise ValueError(f"SparseAdamW.bind_compact_grad_storage: storage is on {storage.device}, "
                             f"the parameters on {params[0].device}")
        views, offset = {}, 0
        for p in params:
            n = self._indices[p].numel()
            views[p] = storage[offset:offset + n]
            offset += n
        for p, view in views.items():
            current = self._compact_grads.get(p)
            if current is not None and current is not view:
                view.copy_(current)
                self._compact_grads[p] = view
        self._grad_views = views

    def release_compact_grad_storage(self) -> None:
        """Stop using the storage of :meth:`bind_compact_grad_storage` (gradients held there are
        copied out, so nothing refers to the caller's buffer afterwards)."""
        for p, view in self._grad_views.items():
            if self._compact_grads.get(p) is view:
                self._compact_grads[p] = view.clone()
        self._grad_views = {}

    def fill_missing_compact_grads(self) -> None:
        """Give every sparse parameter without a compact gradient this step a zero one (in its
        bound view when storage is bound): after a data-parallel reduction every rank holds
        the same gradients, including for parameters another rank had no gradient for."""
        for p in self.sparse_parameters():
            if self._compact_grads[p] is None:
                view = self._grad_views.get(p)
                if view is None:
                    view = torch.empty(self._indices[p].numel(), dtype=torch.float32, device=p.device)
                self._compact_grads[p] = view.zero_()

    def sparse_parameters(self) -> list[torch.Tensor]:
        """The parameters of the sparse groups that have child entries (in group order)."""
        return [p for g in self.param_groups if g["sparse"] for p in g["params"]]

    def compact_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """The accumulated compact fp32 gradient of a sparse parameter (``None`` if none yet)."""
        return self._compact_grads[param]

    def indices(self, param: torch.Tensor) -> torch.Tensor:
        """The child indices of a sparse parameter (on its device)."""
        return self._indices[param]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear compact buffers of sparse groups and gradients of dense groups."""
        for param, buffer in self._compact_grads.items():
            if buffer is not None:
                if set_to_none:
                    self._compact_grads[param] = None
                else:
                    buffer.zero_()
        super().zero_grad(set_to_none=set_to_none)

    def _all_grads(self) -> list[torch.Tensor]:
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                g = self._compact_grads.get(p) if group["sparse"] else p.grad
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
        return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), norm_type)

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
    def step(self, closure=None):
        """One AdamW step over every parameter that has a (compact or dense) gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            for p in group["params"]:
                if group["sparse"]:
                    grad = self._compact_grads.get(p)
                    if grad is None:
                        continue
                    state = self._sparse_state(p)
                    state["step"] += 1
                    self.backend.sparse_adamw_(
                        p.data, grad, self._indices[p], state["exp_avg"], state["exp_avg_sq"], state.get("master"),
                        step=float(state["step"].item()), **hyper,
                    )
                else:
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

    def _sparse_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            k = self._indices[p].numel()
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros(k, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(k, dtype=torch.float32, device=p.device)
            if p.dtype != torch.float32:
                state["master"] = p.detach().reshape(-1).index_select(0, self._indices[p].long()).float()
        return state

    # ---- persistence --------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict, *, adopt: bool = False) -> None:
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
        id_map = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]) or saved.get("sparse", False) != group["sparse"]:
                raise ValueError(f"SparseAdamW.load_state_dict: group {i} does not match (size or sparse/dense kind)")
            if group["sparse"] and list(saved.get("child_names", [])) != list(group["child_names"]):
                raise ValueError(f"SparseAdamW.load_state_dict: group {i} was saved for other child tensors")
            id_map.update(zip(saved["params"], group["params"]))
        new_state: dict = defaultdict(dict)
        for key, values in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"SparseAdamW.load_state_dict: state for unknown parameter id {key}")
            p = id_map[key]
            restored = {}
            for name, value in values.items():
                if name == "step":
                    restored[name] = value.detach().clone().to(torch.float32).cpu()
                elif isinstance(value, torch.Tensor):
                    value = value.detach().to(p.device)
                    restored[name] = value if adopt else value.clone()
                else:
                    restored[name] = value
            if p in self._indices and restored["exp_avg"].numel() != self._indices[p].numel():
                raise ValueError(
                    f"SparseAdamW.load_state_dict: saved state has {restored['exp_avg'].numel()} entries "
                    f"but the child of this tensor has {self._indices[p].numel()}"
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
        grad_bytes = sum(g.numel() * g.element_size() for g in self._compact_grads.values() if g is not None)
        dense_grad_bytes = sum(
            p.grad.numel() * p.grad.element_size() for g in self.param_groups if not g["sparse"] for p in g["params"] if p.grad is not None
        )
        return {
            "state_bytes": state_bytes,
            "compact_grad_bytes": grad_bytes,
            "dense_grad_bytes": dense_grad_bytes,
            "index_bytes": sum(i.numel() * i.element_size() for i in self._indices.values()),
            "sparse_entries": sum(i.numel() for i in self._indices.values()),
            "dense_entries": sum(p.numel() for g in self.param_groups if not g["sparse"] for p in g["params"]),
        }

    def remove_hooks(self) -> None:
        """Detach the gradient-gather hooks (the parameters go back to ordinary gradients)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _as_groups(params: Iterable[Any]) -> list[dict]:
    params = list(params)
    if not params:
        raise ValueError("SparseAdamW: no parameters given")
    if all(isinstance(p, torch.Tensor) for p in params):
        return [{"params": params}]
    groups = []
    for g in params:
        if not isinstance(g, Mapping):
            raise TypeError("SparseAdamW: mix of tensors and groups; pass a list of group dicts")
        groups.append(dict(g))
    return groups


def linear_warmup_decay(warmup_steps: int, total_steps: int):
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
