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


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, where: str,
                           order: torch.Tensor | None = None) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``(H + λI)⁻¹ = UᵀU``), with ``λ = damp · mean(diag H)``,
    ``H``'s rows and columns taken in ``order`` (the order a sweep visits the inputs; default as they are).

    Inputs that were always zero (``H_jj = 0``) get ``H_jj = 1``: nothing
    couples them to other inputs, so their weights are rounded or pruned on
    their own.

    ``U`` comes from one Cholesky factorisation and one triangular solve, both
    in place: with ``J`` the reversal permutation, ``J H J = L Lᵀ`` gives
    ``H = (J L J)(J L J)ᵀ`` with ``J L J`` upper triangular, so
    ``U = (J L J)⁻¹ = J L⁻¹ J``. That is the papers'
    ``cholesky(cholesky_inverse(cholesky(H)), upper=True)`` at less than half
    the time and half the memory (about 3 ``H``-sized temporaries instead of 7:
    400 MB for a 5632-input layer).
    """
    columns = hessian.shape[0]
    backwards = torch.arange(columns - 1, -1, -1, device=hessian.device) if order is None else order.flip(0)
    h = hessian.float()[backwards[:, None], backwards[None, :]]  # J H J: a fresh copy, factorised in place
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal += damp * diagonal.mean()
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if info.item() != 0:
        raise ConfigError(f"one-shot: the input Hessian of {where} is not positive definite after damping "
                          f"{damp}; raise damp (e.g. damp=0.1) or calibrate on more tokens")
    inverse = torch.eye(columns, dtype=h.dtype, device=h.device)
    torch.linalg.solve_triangular(h, inverse, upper=False, out=inverse)  # L⁻¹ (reads only L's lower triangle)
    del h
    return inverse.flip(0, 1)


def obs_columns(
    weight: torch.Tensor, factor: torch.Tensor, start: int, stop: int, target: Callable[[int, torch.Tensor], torch.Tensor]
) -> None:
    """Replace columns ``start:stop`` of ``weight`` (float32, in place) one by one with ``target(i, column)``
    (the pruned or rounded column, ``i`` counted from ``start``), moving the columns right of each onto the
    least-squares best values given those already replaced."""
    block = weight[:, start:stop].clone()
    inverse = factor[start:stop, start:stop].clone()  # contiguous rows, whatever the factor's layout
    errors = torch.empty_like(block)
    for i in range(stop - start):
        q = target(i, block)
        error = (block[:, i] - q).div_(inverse[i, i])
        block[:, i + 1:].addr_(error, inverse[i, i + 1:], alpha=-1)  # in place: no block-sized temporaries
        block[:, i] = q
        errors[:, i] = error
    weight[:, start:stop] = block
    weight[:, stop:].addmm_(errors, factor[start:stop, stop:], alpha=-1)
