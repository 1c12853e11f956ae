"""Guards of a captured solve: the tensors ``f`` reads must not move between replays.

:func:`tensor_guards` walks what ``f`` reaches (closure cells, globals it names, default
arguments, ``functools.partial`` arguments, the parameters, buffers and tensor
attributes of an ``nn.Module`` that ``f`` is, is bound to or refers to, and the same for
functions it refers to, three levels deep) and returns each tensor's address, shape,
stride and dtype. A walk costs tens of microseconds for a model-sized ``f``, per call of
a ``graph=True`` solve, where the replay itself costs a few: :class:`Guard` records
while walking every mutable link the walk followed -- dict and list contents, closure
cells, assignable function attributes -- and the tensors it found, and later only
re-reads those (:meth:`Guard.holds`). When a link changed, a new walk decides: the same
tensors (say an unrelated attribute was reassigned) keep the graph, others recapture it.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Callable, Optional

import torch

__all__ = ["tensor_guards", "Guard"]

# What Guard.holds re-reads, per recorded link.
_DICT, _LIST, _CELL, _KEY, _ATTR, _TENSOR = range(6)
_MISSING = object()


def tensor_guards(fn: Callable) -> tuple:
    """Address, shape, stride and dtype of the tensors reachable from ``fn`` (see the
    module docstring for what is covered). Host metadata only."""
    return _walk(fn, None)


class Guard:
    """The guards of one root object (``f``, or an adjoint factory) with the links to
    re-read: ``holds(root)`` is True when a new :func:`tensor_guards` walk from ``root``
    would certainly give :attr:`value`.

    No strong reference to the root (the graph cache is weak on it): a link's expected
    objects are held weakly where Python allows -- one dying marks the guard stale,
    which also rules out a new object reusing its ``id`` -- and strongly otherwise
    (containers, numbers, strings; tensors, whose metadata is re-read).
    """

    def __init__(self, root: Callable):
        self.stale = False
        self.root = [self._anchor(part) for part in _identity(root)]
        links: list = []
        self.value = _walk(root, links, self._anchor)
        # Checked in bulk (one comprehension each): dict contents, tensor metadata.
        self.dicts = [link[1] for link in links if link[0] == _DICT]
        self.dict_sizes = [len(d) for d in self.dicts]
        self.dict_ids = [i for link in links if link[0] == _DICT for i in link[2]]
        self.tensors = [link[1] for link in links if link[0] == _TENSOR]
        self.metas = [link[2:] for link in links if link[0] == _TENSOR]
        self.links = [link for link in links if link[0] not in (_DICT, _TENSOR)]
        self.keep = links  # the anchors

    def _anchor(self, obj: object) -> object:
        try:
            return weakref.ref(obj, self._died)
        except TypeError:
            return obj

    def _died(self, _ref: weakref.ref) -> None:
        self.stale = True

    def holds(self, root: Callable) -> bool:
        if self.stale or [id(part) for part in _identity(root)] != [id(_deref(a)) for a in self.root]:
            return False
        dicts = self.dicts
        if ([len(d) for d in dicts] != self.dict_sizes or [id(v) for d in dicts for v in d.values()] != self.dict_ids
                or [(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in self.tensors] != self.metas):
            return False
        for link in self.links:
            kind, obj = link[0], link[1]
            if kind == _LIST:
                if [id(v) for v in obj] != link[2]:
                    return False
            elif kind == _CELL:
                try:
                    if id(obj.cell_contents) != link[2]:
                        return False
                except ValueError:  # emptied
                    return False
            elif kind == _KEY:
                if id(obj.get(link[2], _MISSING)) != link[3]:
                    return False
            else:  # _ATTR on a function, held weakly
                fn = obj()
                if fn is None or id(getattr(fn, link[2], _MISSING)) != link[3]:
                    return False
        return True


def _deref(anchor: object) -> object:
    return anchor() if isinstance(anchor, weakref.ref) else anchor


def _identity(root: object) -> tuple:
    """What must be the same object for recorded links to apply (a bound method is a
    new object at every attribute access: its instance and function)."""
    return (root.__self__, root.__func__) if inspect.ismethod(root) else (root,)


def _walk(fn: Callable, links: Optional[list], anchor: Optional[Callable] = None) -> tuple:
    """The walk of :func:`tensor_guards`; with ``links``, also records every mutable
    link it follows as ``(kind, object re-read, ..., expected ids, anchors)``."""
    found: list = []
    seen: set = set()

    def ids_of(values) -> tuple:
        values = list(values)
        return [id(v) for v in values], [anchor(v) for v in values]

    def watch(kind: int, obj: object, *key: object) -> None:
        if links is None:
            return
        if kind == _DICT:
            links.append((_DICT, obj, *ids_of(obj.values())))
        elif kind == _LIST:
            links.append((_LIST, obj, *ids_of(obj)))
        elif kind == _CELL:
            try:
                contents = obj.cell_contents
            except ValueError:
                contents = _MISSING
            links.append((_CELL, obj, id(contents), anchor(contents)))
        elif kind == _KEY:
            value = obj.get(key[0], _MISSING)
            links.append((_KEY, obj, key[0], id(value), anchor(value)))
        else:
            value = getattr(obj, key[0], _MISSING)
            links.append((_ATTR, weakref.ref(obj), key[0], id(value), anchor(value)))

    def visit(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            meta = (obj.data_ptr(), obj.shape, obj.stride(), obj.dtype)
            found.append(meta)
            if links is not None:
                links.append((_TENSOR, obj, *meta))
        elif isinstance(obj, torch.nn.Module):
            # obj.parameters() then obj.buffers(), in their order, read from the modules'
            # own dicts (the generators cost several times more).
            modules = _submodules(obj, watch)
            for attribute in ("_parameters", "_buffers"):
                for module in modules:
                    tensors = getattr(module, attribute)
                    watch(_DICT, tensors)
                    for t in tensors.values():
                        if t is not None:
                            visit(t, depth + 1)
            watch(_DICT, vars(obj))
            for value in vars(obj).values():
                if isinstance(value, torch.Tensor):
                    visit(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            if isinstance(obj, list):
                watch(_LIST, obj)
            for value in obj:
                visit(value, depth + 1)
        elif isinstance(obj, dict):
            watch(_DICT, obj)
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, functools.partial):
            visit(obj.func, depth + 1)
            visit(obj.args, depth + 1)
            visit(obj.keywords, depth + 1)
        elif inspect.ismethod(obj):
            visit(obj.__self__, depth + 1)
            visit(obj.__func__, depth + 1)
        elif inspect.isfunction(obj):
            for name in ("__code__", "__defaults__", "__kwdefaults__"):
                watch(_ATTR, obj, name)
            for cell in obj.__closure__ or ():
                watch(_CELL, cell)
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # empty cell
                    pass
            for name in obj.__code__.co_names:
                watch(_KEY, obj.__globals__, name)
                if name in obj.__globals__:
                    visit(obj.__globals__[name], depth + 1)
            visit(obj.__defaults__ or (), depth + 1)
            visit(obj.__kwdefaults__ or {}, depth + 1)

    visit(fn, 0)
    return tuple(found)


def _submodules(module: torch.nn.Module, watch: Callable) -> list:
    """``module`` and its submodules in ``named_modules`` order, each once (watching
    each ``_modules`` dict)."""
    found, seen, stack = [], set(), [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        found.append(m)
        watch(_DICT, m._modules)
        stack.extend(child for child in reversed(m._modules.values()) if child is not None)
    return found
