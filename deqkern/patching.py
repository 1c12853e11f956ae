"""Swap ``torch.nn.RMSNorm`` layers of an existing model for :class:`FusedRMSNorm`.

``patch(model)`` replaces, in place, every submodule whose type is exactly
``nn.RMSNorm`` by a ``FusedRMSNorm`` that holds the *same* ``weight`` Parameter object:
optimizers built before the patch keep updating it, ``state_dict`` keys and values are
unchanged, and outputs match to rounding. ``unpatch(model)`` puts the original module
objects back. A module registered under several names is replaced by one shared
replacement. Hooks registered on the original modules are not carried over.
"""

from __future__ import annotations

import weakref

from torch import nn

from deqkern.nn.norm import FusedRMSNorm

__all__ = ["patch", "unpatch"]

# replacement -> the nn.RMSNorm it stands in for (weak: dies with the replacement).
_ORIGINALS: "weakref.WeakKeyDictionary[FusedRMSNorm, nn.RMSNorm]" = weakref.WeakKeyDictionary()


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _fused_twin(norm: nn.RMSNorm) -> FusedRMSNorm:
    """A FusedRMSNorm with ``norm``'s configuration and its very weight Parameter."""
    twin = FusedRMSNorm(norm.normalized_shape, norm.eps, norm.elementwise_affine, device="meta")
    twin.weight = norm.weight
    twin.train(norm.training)
    return twin


def patch(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every ``nn.RMSNorm`` submodule of ``model`` (in place) by a
    :class:`FusedRMSNorm` sharing its ``weight``.

    Returns the replaced originals by qualified name (``{"blocks.0.norm": RMSNorm(...)}``);
    empty if there were none. Subclasses of ``nn.RMSNorm`` (including FusedRMSNorm
    itself) are left alone, so patching twice is harmless. ``model`` itself cannot be
    replaced in place: pass its parent, or use ``FusedRMSNorm`` directly.
    """
    _check_model(model)
    if type(model) is nn.RMSNorm:
        raise ValueError("patch replaces submodules in place and model is itself an nn.RMSNorm; "
                         "patch its parent module or construct a deqkern.nn.FusedRMSNorm")
    replaced: dict[str, nn.Module] = {}
    twins: dict[int, FusedRMSNorm] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if type(module) is not nn.RMSNorm:
            continue
        twin = twins.get(id(module))
        if twin is None:
            twin = twins[id(module)] = _fused_twin(module)
            _ORIGINALS[twin] = module
        _set_submodule(model, name, twin)
        replaced[name] = module
    return replaced


def unpatch(model: nn.Module) -> dict[str, nn.Module]:
    """Undo :func:`patch`: put the original ``nn.RMSNorm`` objects back (with the
    replacement's current ``weight``, in case it was reassigned meanwhile).

    Returns the removed replacements by qualified name. FusedRMSNorm modules that
    :func:`patch` did not create (built directly, or deep copies) are left alone.
    """
    _check_model(model)
    removed: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        original = _ORIGINALS.get(module) if isinstance(module, FusedRMSNorm) else None
        if original is None or not name:
            continue
        original.weight = module.weight
        original.train(module.training)
        _set_submodule(model, name, original)
        removed[name] = module
    return removed
