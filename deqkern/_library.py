"""``EagerBypassOp``: a ``torch.library.custom_op`` that only traced code goes through.

A custom op is what ``torch.compile`` needs (one opaque node with a fake kernel and a
registered autograd formula: no graph break), but calling one from eager Python costs
the dispatcher's round trip -- tens of microseconds per call, more than a small fused
kernel's whole run (quack measured ~60 us; ``python -m bench --suite host`` measures it
here). So each deqkern op is an :class:`EagerBypassOp`: under ``torch.compile`` (and on
tensor subclasses: FakeTensor, FunctionalTensor, ...) it calls the registered op; in
eager mode it calls the same body directly, through a plain ``torch.autograd.Function``
built from the same ``setup_context`` / ``backward`` when autograd must record the call.
Same code, same numbers, one definition.

The eager paths pass a *plan* to the body: what the host computes once per call
signature (validated metadata, launch configurations), made by ``prepare(*args)`` or
handed in by the caller that already looked it up. The registered op's body, which only
gets the schema's arguments, calls ``prepare`` itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.nn import Parameter

__all__ = ["EagerBypassOp"]

_PLAIN = (torch.Tensor, Parameter)
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_functorch_active = torch._C._are_functorch_transforms_active


class EagerBypassOp:
    """``EagerBypassOp(name, schema, run, prepare)``: ``run(*args, plan)`` is the op's
    body; ``prepare(*args) -> plan`` the per-signature host work it needs. Register the
    fake kernel and the autograd formula as on a custom op (``register_fake``,
    ``register_autograd``); call it as ``op(*args)`` or ``op(*args, plan=plan)``.

    Dispatch per call: traced (``torch.compiler.is_compiling()``, the first argument is
    not a plain tensor, or a functorch transform is active) -> the custom op ``self.op``; autograd must record (grad mode
    on and a tensor argument requires grad) -> the ``autograd.Function`` (the custom op
    if no autograd formula is registered, which then raises as custom ops do);
    otherwise -> ``run`` directly.
    """

    def __init__(self, name: str, schema: str, run: Callable[..., Any], prepare: Callable[..., Any]):
        self.name, self.run, self.prepare = name, run, prepare
        self.op = torch.library.custom_op(name, lambda *args: run(*args, prepare(*args)), mutates_args=(),
                                          schema=schema)
        arguments = schema.split("->")[0].strip()[1:-1].split(",")
        self.tensor_args = tuple(i for i, arg in enumerate(arguments) if arg.split()[0] == "Tensor")
        self.function: Any = None

    def register_fake(self, fake: Callable) -> Callable:
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """As ``torch.library.register_autograd``; also builds the eager
        ``autograd.Function`` from the same two functions. It is an old-style Function
        (``forward(ctx, ...)``): defining ``setup_context`` on it would make every
        ``apply`` bind its arguments with ``inspect.signature`` (microseconds a call)."""
        self.op.register_autograd(backward, setup_context=setup_context)
        run = self.run

        def forward(ctx, *args_and_plan):
            args, plan = args_and_plan[:-1], args_and_plan[-1]
            output = run(*args, plan)
            ctx.plan = plan
            setup_context(ctx, args, output)
            return output

        def function_backward(ctx, *grads):
            return (*backward(ctx, *grads), None)

        function = type(self.name.replace("::", "_"), (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(function_backward)})
        # Function.apply's Python wrapper only adds functorch support (vmap/grad
        # transforms, which this old-style Function refuses anyway; __call__ sends those
        # calls to the custom op): call the C++ apply under it.
        self.function = super(torch.autograd.Function, function).apply

    def __call__(self, *args: Any, plan: Any = None) -> Any:
        # A plan comes from a caller that looked it up outside torch.compile, this call.
        if (plan is None and _is_compiling()) or type(args[0]) not in _PLAIN or _functorch_active():
            return self.op(*args)
        if _grad_enabled():
            for i in self.tensor_args:
                if args[i].requires_grad:
                    if self.function is None:
                        return self.op(*args)
                    return self.function(*args, self.prepare(*args) if plan is None else plan)
        return self.run(*args, self.prepare(*args) if plan is None else plan)
