"""The compact-gradient store: the child entries' gradients of the sparse parameters, and nothing more.

A CHILD-TUNING step needs, for every tensor ``W`` with child entries ``idx`` (sorted unique flat
indices, ``k = len(idx)``), only ``grad(W).flatten()[idx]``. :class:`CompactGradStore` owns
those ``k``-sized fp32 vectors for one set of parameters, and the machinery that fills them:

* **the index sets** — one per parameter, on the parameter's device;
* **the gather hooks** — a post-accumulate-grad hook per parameter gathers the dense gradient
  autograd just produced at ``idx`` into the compact buffer (adding onto it for micro-batch
  accumulation) and sets ``param.grad = None`` at once;
* **direct writers** — an op that computes the child entries itself (the SDDMM weight gradient
  of :mod:`adtuning.sparse_grad`) asks :meth:`CompactGradStore.target` for the buffer and
  whether to add onto it;
* **bound storage** — :meth:`CompactGradStore.bind` puts every buffer at a fixed view of one
  caller-owned flat fp32 tensor (the data-parallel all-reduce buffer of
  :class:`adtuning.distributed.GradientReducer`); :meth:`CompactGradStore.release` undoes it;
* **step bookkeeping** — which parameters received a gradient this step (:meth:`grad` is
  ``None`` for the others), zero-fill of the missing ones after a reduction
  (:meth:`fill_missing`), and :meth:`zero`.

The memory contract (tested): for ``n`` parameters with ``k`` child entries in all, the store
holds ``4 * k`` bytes of gradient and the index vectors, never a dense gradient past the hook
that gathers it, never a dense mask. A dense gradient exists only between autograd's
accumulation into ``param.grad`` and the hook right after it, one tensor at a time.

Users: :class:`adtuning.optim.SparseAdamW` builds one for its sparse groups
(``optimizer.grad_store``) and steps on its buffers; :mod:`adtuning.sparse_grad` writes into
them; :class:`adtuning.distributed.GradientReducer` binds them to its flat buffer.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.hooks import RemovableHandle

from adtuning.backend_contract import GatherOp
from adtuning.reference.gather import gather_ref


class CompactGradStore:
    """Compact fp32 gradients of the child entries of a set of parameters.

    Args:
        indices: ``(parameter, child indices)`` pairs in a fixed order (the order of
            :meth:`parameters` and of the bound storage layout). Each parameter must be
            contiguous; its indices are sorted unique int32/int64 flat indices (moved to the
            parameter's device here).
        gather: the backend's gather op (default: the reference gather).
        hooks: register the gather-at-indices post-accumulate-grad hooks (default). Without
            them only :meth:`target` and :meth:`accumulate` write gradients.

    Memory contract: one ``k``-sized fp32 buffer per parameter that received a gradient this
    step (or one flat ``sum k`` buffer, when bound), the index vectors, nothing dense; a dense
    ``param.grad`` is gathered and set to ``None`` as soon as autograd has accumulated it.

    Raises:
        ValueError: a parameter given twice or a non-contiguous parameter.
    """

    def __init__(self, indices: Iterable[tuple[torch.Tensor, torch.Tensor]], gather: GatherOp | None = None,
                 *, hooks: bool = True) -> None:
        self._gather: GatherOp = gather_ref if gather is None else gather
        self._indices: dict[torch.Tensor, torch.Tensor] = {}
        for param, idx in indices:
            if param in self._indices:
                raise ValueError("CompactGradStore: a parameter is given twice")
            if not param.is_contiguous():
                raise ValueError(f"CompactGradStore: parameters must be contiguous, got one of shape {tuple(param.shape)}")
            self._indices[param] = idx.to(param.device)
        self._grads: dict[torch.Tensor, torch.Tensor | None] = dict.fromkeys(self._indices)
        # With bound storage, each parameter's compact gradient lives at a fixed view of it.
        self._views: dict[torch.Tensor, torch.Tensor] = {}
        self._hooks: list[RemovableHandle] = []
        if hooks:
            for param in self._indices:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._gather_hook))  # type: ignore[no-untyped-call]

    # ---- what it holds ------------------------------------------------------------------

    def parameters(self) -> list[torch.Tensor]:
        """The parameters, in the order given (the layout order of :meth:`bind`)."""
        return list(self._indices)

    def __contains__(self, param: object) -> bool:
        return isinstance(param, torch.Tensor) and param in self._indices

    def __len__(self) -> int:
        return len(self._indices)

    def indices(self, param: torch.Tensor) -> torch.Tensor:
        """The child indices of ``param`` (on its device).

        Raises:
            KeyError: ``param`` is not in the store.
        """
        return self._indices[param]

    def numel(self) -> int:
        """Child entries of all parameters: the length of the storage :meth:`bind` takes."""
        return sum(idx.numel() for idx in self._indices.values())

    def grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """The compact fp32 gradient of ``param`` accumulated this step (``None`` if none yet).

        Raises:
            KeyError: ``param`` is not in the store.
        """
        return self._grads[param]

    def grads(self) -> list[torch.Tensor]:
        """The compact gradients present this step, in :meth:`parameters` order."""
        return [g for g in self._grads.values() if g is not None]

    def grad_bytes(self) -> int:
        """Bytes of the compact gradients present this step."""
        return sum(g.numel() * g.element_size() for g in self.grads())

    def index_bytes(self) -> int:
        """Bytes of the index vectors."""
        return sum(idx.numel() * idx.element_size() for idx in self._indices.values())

    # ---- writing gradients --------------------------------------------------------------

    def _new_buffer(self, param: torch.Tensor) -> torch.Tensor:
        view = self._views.get(param)
        if view is not None:
            return view
        return torch.empty(self._indices[param].numel(), dtype=torch.float32, device=param.device)

    def accumulate(self, param: torch.Tensor, dense_grad: torch.Tensor) -> torch.Tensor:
        """Gather ``dense_grad`` (of ``param``'s shape) at the child indices into the compact
        gradient of ``param`` (adding onto it if it has one this step); returns that buffer.

        Raises:
            KeyError: ``param`` is not in the store.
        """
        idx = self._indices[param]
        buffer = self._grads[param]
        if buffer is not None:
            self._gather(dense_grad, idx, out=buffer, accumulate=True)
            return buffer
        view = self._views.get(param)
        if view is None:
            buffer = self._gather(dense_grad, idx)
        else:
            buffer = self._gather(dense_grad, idx, out=view, accumulate=False)
        self._grads[param] = buffer
        return buffer

    def _gather_hook(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        self.accumulate(param, grad)
        param.grad = None  # the dense gradient is dead weight from here on

    def target(self, param: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The compact fp32 gradient buffer of ``param``, for an op that writes the child
        entries of its gradient straight into it (the sparse Linear weight gradient of
        :mod:`adtuning.sparse_grad`), and whether that op must add onto it.

        The first write of a step gets a fresh, uninitialised buffer (its bound view, when
        storage is bound) and ``False``; later writes (micro-batches, a layer called twice, a
        buffer kept by ``zero(set_to_none=False)``) get the same buffer and ``True``.

        Raises:
            KeyError: ``param`` is not in the store.
        """
        buffer = self._grads[param]
        if buffer is not None:
            return buffer, True
        buffer = self._new_buffer(param)
        self._grads[param] = buffer
        return buffer, False

    def fill_missing(self) -> None:
        """Give every parameter without a compact gradient this step a zero one (in its bound
        view when storage is bound): after a data-parallel reduction every rank holds the same
        gradients, including for parameters another rank had no gradient for."""
        for param, buffer in self._grads.items():
            if buffer is None:
                self._grads[param] = self._new_buffer(param).zero_()

    def zero(self, set_to_none: bool = True) -> None:
        """End a step: forget the compact gradients (``set_to_none``), or keep the buffers and
        zero them (later writes then add onto them)."""
        for param, buffer in self._grads.items():
            if buffer is not None:
                if set_to_none:
                    self._grads[param] = None
                else:
                    buffer.zero_()

    # ---- caller-owned storage -----------------------------------------------------------

    def bind(self, storage: torch.Tensor) -> None:
        """Keep the compact gradients in ``storage`` from now on: one flat fp32 buffer of
        :meth:`numel` entries on the parameters' device, holding the compact gradient of every
        parameter (in :meth:`parameters` order) at a fixed offset. A collective can then reduce
        all child gradients in place, in one call.

        The semantics are unchanged: a parameter without a gradient this step still reports
        ``None`` from :meth:`grad` (its view is merely not written); ``zero(set_to_none=True)``
        forgets which views hold a gradient, ``False`` zeroes them. Gradients already
        accumulated are moved into the storage.

        Raises:
            ValueError: ``storage`` has the wrong size, dtype, device or layout.
        """
        params = self.parameters()
        total = self.numel()
        if storage.dim() != 1 or storage.numel() != total or storage.dtype != torch.float32 or not storage.is_contiguous():
            raise ValueError(f"CompactGradStore.bind: need a contiguous 1-D float32 tensor of {total} "
                             f"entries, got {tuple(storage.shape)} {storage.dtype}")
        if params and storage.device != params[0].device:
            raise ValueError(f"CompactGradStore.bind: storage is on {storage.device}, "
                             f"the parameters on {params[0].device}")
        views: dict[torch.Tensor, torch.Tensor] = {}
        offset = 0
        for param in params:
            n = self._indices[param].numel()
            views[param] = storage[offset:offset + n]
            offset += n
        for param, view in views.items():
            current = self._grads[param]
            if current is not None and current is not view:
                view.copy_(current)
                self._grads[param] = view
        self._views = views

    def release(self) -> None:
        """Stop using the storage of :meth:`bind` (gradients held there are copied out, so
        nothing refers to the caller's buffer afterwards)."""
        for param, view in self._views.items():
            if self._grads[param] is view:
                self._grads[param] = view.clone()
        self._views = {}

    @property
    def bound(self) -> bool:
        """Whether the gradients live in caller-owned storage (:meth:`bind`)."""
        return bool(self._views)

    # ---- teardown -----------------------------------------------------------------------

    def remove_hooks(self) -> None:
        """Detach the gather hooks (the parameters go back to ordinary dense gradients)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
