"""Modules to put in models: the frozen-context DEQ layer, its context providers, and
the drop-in fused RMSNorm."""

from deqkern.nn.context import ContextProvider, MambaMemory, SlotAttentionContext
from deqkern.nn.deq import FrozenContextDEQ, cell_adjoint
from deqkern.nn.norm import FusedRMSNorm

__all__ = ["FrozenContextDEQ", "cell_adjoint", "ContextProvider", "MambaMemory", "SlotAttentionContext", "FusedRMSNorm"]
