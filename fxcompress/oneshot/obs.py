"""The Optimal Brain Surgeon step that SparseGPT and GPTQ share (Frantar & Alistarh 2023; Frantar et al. 2022).

Removing (or rounding) weight ``i`` of a row changes the layer's output on
the calibration inputs by the least when the remaining weights ``i+1..`` move
by ``-(w_i - q_i) / U_ii * U_i,i+1..``, where ``U`` is the upper Cholesky factor
of ``H⁻¹`` (``H = XᵀX``). Taking columns left to right, every row shares that
one factorisation; :func:`obs_columns` applies it to one block of columns,
accumulating the block's updates for the columns right of it in one matrix
product (the papers' "lazy batch" updates).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fxcompress.errors import ConfigError

__all__ = ["inverse_hessian_factor", "obs_columns"]


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, where: str) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + λI)⁻¹``, with ``λ = damp · mean(diag H)``.

    Inputs that were always zero (``H_jj = 0``) get ``H_jj = 1``: nothing
    couples them to other inputs, so their weights are rounded or pruned on
    their own.
    """
    h = hessian.float().clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal += damp * diagonal.mean()
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        lower, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0:
        raise ConfigError(f"one-shot: the input Hessian of {where} is not positive definite after damping "
                          f"{damp}; raise damp (e.g. damp=0.1) or calibrate on more tokens")
    return lower


def obs_columns(
    weight: torch.Tensor, factor: torch.Tensor, start: int, stop: int, target: Callable[[int, torch.Tensor], torch.Tensor]
) -> None:
    """Replace columns ``start:stop`` of ``weight`` (float32, in place) one by one with ``target(i, column)``
    (the pruned or rounded column, ``i`` counted from ``start``), moving the columns right of each onto the
    least-squares best values given those already replaced."""
    block = weight[:, start:stop].clone()
    inverse = factor[start:stop, start:stop]
    errors = torch.zeros_like(block)
    for i in range(stop - start):
        column = block[:, i]
        q = target(i, block)
        error = (column - q) / inverse[i, i]
        block[:, i:] -= error[:, None] * inverse[i, i:][None, :]
        block[:, i] = q
        errors[:, i] = error
    weight[:, start:stop] = block
    weight[:, stop:] -= errors @ factor[start:stop, stop:]
