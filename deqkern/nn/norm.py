"""``FusedRMSNorm``: ``torch.nn.RMSNorm`` on the fused kernel, a drop-in replacement.

It *is* an ``nn.RMSNorm`` (a subclass that only overrides ``forward``), so the
constructor, the ``weight`` parameter, ``state_dict`` keys, ``reset_parameters``,
``extra_repr`` and ``isinstance`` checks are torch's own: an ``nn.RMSNorm`` checkpoint
loads unchanged, and :func:`deqkern.patch` can swap one in for the other in a trained
model.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from deqkern.functional import rms_norm

__all__ = ["FusedRMSNorm"]


class FusedRMSNorm(nn.RMSNorm):
    """``y = weight * x / sqrt(mean(x**2) + eps)`` over the trailing ``normalized_shape``
    dimensions, computed by :func:`deqkern.functional.rms_norm` (one fused kernel
    forward, one backward; float32 math whatever the storage dtype).

    At small sizes it is torch's own op: under ``DEQKERN_BACKEND=auto``, inputs of fewer
    than :data:`deqkern.functional.TORCH_RMS_NORM_BELOW` elements, and 16-bit inputs of
    any size (whose weight, if any, has the input's dtype), run ``F.rms_norm``, the op ``nn.RMSNorm`` runs. There the call
    is bound by host time, and torch's C++ op with its C++ autograd node costs less of it
    than a kernel launched from Python; the outputs are then exactly ``nn.RMSNorm``'s.
    ``DEQKERN_BACKEND=triton`` forces the fused kernel at every size.

    Args (as ``torch.nn.RMSNorm``):
        normalized_shape: ``d``, or a tuple/list of the trailing dimensions. Several
            dimensions are normalized together, as torch does, by viewing them as one
            row of their product (the kernels take rows up to ``deqkern._backend.MAX_FUSED_D``
            wide; wider rows run the eager path).
        eps: > 0, or None for the float32 epsilon (float64's for float64 inputs), the
            value ``nn.RMSNorm`` actually uses for float16/bfloat16/float32 inputs.
        elementwise_affine: learn ``weight`` (shape ``normalized_shape``, ones at init).
        device, dtype: of ``weight``.

    Input ``(..., *normalized_shape)``; output the same shape and x's dtype (also under
    ``torch.autocast``, as ``nn.RMSNorm``).
    """

    def __init__(
        self,
        normalized_shape: Union[int, list[int], tuple[int, ...], torch.Size],
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
            raise ValueError(f"normalized_shape must be an int >= 1 or a non-empty tuple of them; got {normalized_shape!r}")
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                                or not math.isfinite(eps) or eps <= 0):
            raise ValueError(f"eps must be a finite float > 0 or None; got {eps!r}")
        if not isinstance(elementwise_affine, bool):
            raise TypeError(f"elementwise_affine must be a bool; got {type(elementwise_affine).__name__}")
        super().__init__(shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.normalized_shape
        k = len(shape)
        if k == 1:  # the common case, without the reshapes (each a host-side op)
            if x.dim() < 1 or x.shape[-1] != shape[0]:
                raise ValueError(f"input must end with normalized_shape {shape}; got shape {tuple(x.shape)}")
            return rms_norm(x, self.weight, self.eps)
        if x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
            raise ValueError(f"input must end with normalized_shape {shape}; got shape {tuple(x.shape)}")
        weight = None if self.weight is None else self.weight.reshape(-1)
        return rms_norm(x.flatten(-k), weight, self.eps).view(x.shape)
