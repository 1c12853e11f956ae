"""``graph=True``: the whole solve captured in a CUDA graph, cached per ``f`` (weakly) and
per problem, with guards on the tensors ``f`` reads (see the package docstring)."""

from __future__ import annotations

import collections
import functools
import inspect
import warnings
import weakref
from typing import Any, Callable

import torch

from deqkern.solver.config import Config, Step
from deqkern.solver.guards import Guard, tensor_guards
from deqkern.solver.loop import fixed_point_loop, result_info
from deqkern.solver.report import Info

__all__ = ["clear_graph_cache", "tensor_guards", "CapturedSolve", "capture", "graph_solve"]

#: The loop arguments a captured graph depends on (part of its cache key).
CACHE_KEYS = ("max_iter", "tol", "method", "in_place", "return_iterate", "trace")
#: Captured problems kept per ``f`` (least recently used dropped first).
GRAPHS_PER_F = 4

_GRAPHS: "weakref.WeakKeyDictionary[Any, collections.OrderedDict]" = weakref.WeakKeyDictionary()


def clear_graph_cache() -> None:
    """Drop every cached ``graph=True`` capture (and its memory pool)."""
    _GRAPHS.clear()


class CapturedSolve:
    """One captured ``max_iter`` loop. Inputs: ``static_in`` (and ``static_extra``).
    Outputs: one byte buffer holding the final iterate and every info tensor, so a
    replay costs three launches (copy in, replay, clone out) plus views of the clone:
    the iterate's and the check vector's at once, each info field's when it is first
    read (:class:`~deqkern.solver.report.Info`; three view ops a field, about fifteen
    fields, which a caller reading one key does not pay for)."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", static_in: torch.Tensor, packed: torch.Tensor,
                 layout: list, guards: list, static_extra: tuple = ()):
        self.graph, self.static_in, self.packed, self.guards = graph, static_in, packed, guards
        self.static_extra = static_extra
        specs = {name: (offset, nbytes, dtype, shape) for name, offset, nbytes, dtype, shape in layout}
        self.h_spec, self.check_spec = specs.pop("h"), specs.pop("_check")
        self.info_specs = list(specs.items())

    def run(self, h0: torch.Tensor, extra: tuple = ()) -> tuple[torch.Tensor, torch.Tensor, Info]:
        """``(h, check_vector, info)`` of one replay from ``h0`` (and ``extra``)."""
        self.static_in.copy_(h0)
        for static, value in zip(self.static_extra, extra):
            static.copy_(value)
        self.graph.replay()
        out = self.packed.clone()  # the caller's own copy: a later replay must not overwrite it
        info = Info()
        for name, spec in self.info_specs:
            info.defer_value(name, functools.partial(_field, out, *spec))
        return _field(out, *self.h_spec), _field(out, *self.check_spec), info


def _field(out: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """One field of a replay's packed outputs, as a view of ``out``."""
    flat = out.narrow(0, offset, nbytes).view(dtype)
    return flat if len(shape) == 1 else flat.view(shape)


def pack(fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """Copy ``fields`` into one uint8 buffer (widest dtypes first, so every field is
    aligned; each dtype's fields together, one view group each) and return it with its
    layout."""
    order = sorted(fields, key=lambda name: (-fields[name].element_size(), str(fields[name].dtype)))
    layout, offset = [], 0
    for name in order:
        t = fields[name]
        nbytes = t.numel() * t.element_size()
        layout.append((name, offset, nbytes, t.dtype, tuple(t.shape)))
        offset += nbytes
    packed = torch.empty(offset, dtype=torch.uint8, device=next(iter(fields.values())).device)
    for name, start, nbytes, _, _ in layout:
        packed.narrow(0, start, nbytes).view(fields[name].dtype).view(fields[name].shape).copy_(fields[name])
    return packed, layout


def capture(build: Callable[[torch.Tensor, tuple], Step], h0: torch.Tensor, extra: tuple, loop_kwargs: dict,
             tol: float, stop_mode: str, guards: list) -> CapturedSolve:
    """Capture ``fixed_point_loop(build(static_in, static_extra), static_in)`` and its info
    (``guards``: a :class:`~deqkern.solver.guards.Guard` per root ``f`` reads from).
    ``extra``: further per-call inputs (the adjoint's ``h*``), copied into static buffers
    too; ``build`` makes the step from the static tensors (once for the warm-up, once
    inside the capture)."""
    static_in = torch.empty_like(h0, memory_format=torch.contiguous_format)
    static_in.copy_(h0)
    static_extra = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in extra)
    side = torch.cuda.Stream(device=h0.device)
    side.wait_stream(torch.cuda.current_stream(h0.device))
    with torch.cuda.stream(side), torch.no_grad():
        # Warm-up outside the capture: compiles kernels, creates library handles and
        # validates what the step returns.
        warm = fixed_point_loop(build(static_in, static_extra), static_in,
                                **{**loop_kwargs, "max_iter": 2, "check_every": None})
        result_info(warm, tol, stop_mode)
        del warm
    torch.cuda.current_stream(h0.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad(), torch.cuda.graph(graph):
            result = fixed_point_loop(build(static_in, static_extra), static_in, **{**loop_kwargs, "check_every": None})
            fields = result_info(result, tol, stop_mode)
            fields["h"] = result.h
            fields["_check"] = result.check_vector
            packed, layout = pack(fields)
            del result, fields
    except RuntimeError as err:
        raise RuntimeError(
            f"deqkern.solve(graph=True): capturing the solve in a CUDA graph failed ({err}). The step must be "
            f"capturable: no host synchronization (.item(), printing tensors, data-dependent shapes) and no "
            f"CPU tensors. Use graph=False for this f."
        ) from err
    return CapturedSolve(graph, static_in, packed, layout, guards, static_extra)


def graph_solve(owner_fn: Callable, tag: str, build: Callable[[torch.Tensor, tuple], Step], h0: torch.Tensor,
                 cfg: Config, loop_kwargs: dict, extra: tuple = (), guarded: tuple = ()
                 ) -> tuple[torch.Tensor, torch.Tensor, Info]:
    """Replay (capturing first if needed) the cached graph for ``owner_fn`` and this
    problem; returns :meth:`CapturedSolve.run`'s ``(h, check_vector, info)``.
    ``guarded``: further callables whose tensors must not move (the adjoint factory)."""
    owner, method = (owner_fn.__self__, owner_fn.__func__) if inspect.ismethod(owner_fn) else (owner_fn, None)
    try:
        per_owner = _GRAPHS.get(owner)
        if per_owner is None:
            per_owner = _GRAPHS[owner] = collections.OrderedDict()
    except TypeError as err:
        raise TypeError(
            f"graph=True caches the captured solve per f and needs f (or the object it is bound to) to be "
            f"weak-referenceable; got {type(owner).__name__}"
        ) from err
    key = (tag, method, h0.shape, h0.dtype, h0.device, loop_kwargs["stop_mode"],
           *[loop_kwargs.get(name) for name in CACHE_KEYS])
    roots = (owner_fn, *guarded)
    entry = per_owner.get(key)
    if entry is not None and not _guards_hold(entry, roots):
        warnings.warn(
            "deqkern.solve(graph=True): tensors that f reads moved since the graph was captured; recapturing. "
            "Keep them at fixed addresses (update in place, copy_ per-call inputs into persistent buffers) "
            "to avoid a capture per call.",
            stacklevel=4,
        )
        del per_owner[key]
        entry = None
    if entry is None:
        entry = capture(build, h0, extra, loop_kwargs, loop_kwargs["tol"], loop_kwargs["stop_mode"],
                        [Guard(root) for root in roots])
        per_owner[key] = entry
        while len(per_owner) > GRAPHS_PER_F:
            per_owner.popitem(last=False)
    per_owner.move_to_end(key)
    return entry.run(h0, extra)


def _guards_hold(entry: CapturedSolve, roots: tuple) -> bool:
    """True when the tensors each root reaches are where they were at capture: the
    guard's recorded links re-read (cheap), or, where one changed, a new walk compared
    with the captured guards (the guard is then renewed)."""
    for i, (guard, root) in enumerate(zip(entry.guards, roots)):
        if guard.holds(root):
            continue
        renewed = Guard(root)
        if renewed.value != guard.value:
            return False
        entry.guards[i] = renewed
    return True
