"""Rigid-body frames for the structure module (AlphaFold 2 suppl. 1.8).

A frame ``T = (R, t)`` is a rotation ``R`` of shape ``[*, 3, 3]`` and a
translation ``t`` of shape ``[*, 3]``; it maps local coordinates ``x`` to global
ones, ``T ∘ x = R x + t``. Everything here is a plain function over tensors so a
tracer sees ordinary matmuls and adds, and leading dims broadcast as in torch.

>>> r = quat_to_rot(torch.tensor([1.0, 0.0, 0.0, 1.0]))   # 90 degrees about z
>>> apply(r, torch.zeros(3), torch.tensor([1.0, 0.0, 0.0])).round(decimals=6)
tensor([0., 1., 0.])
"""
from __future__ import annotations

import torch

Frame = tuple[torch.Tensor, torch.Tensor]


def identity(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device=None) -> Frame:
    """The identity frame for every position of ``shape``: ``(I [*shape,3,3], 0 [*shape,3])``."""
    rot = torch.eye(3, dtype=dtype, device=device).expand(*shape, 3, 3).clone()
    trans = torch.zeros(*shape, 3, dtype=dtype, device=device)
    return rot, trans


def quat_to_rot(q: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Rotation matrix of a quaternion ``q = (a, b, c, d)`` ``[*, 4]`` (Alg. 23 lines 2-3).

    With ``normalize`` the quaternion need not have unit norm: AlphaFold 2 predicts
    ``(1, b, c, d)`` and divides by its norm, which is what makes any predicted
    ``(b, c, d)`` a valid rotation.
    """
    if q.shape[-1] != 4:
        raise ValueError(f"quat_to_rot expects quaternions [*, 4], got shape {tuple(q.shape)}")
    if normalize:
        q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    a, b, c, d = q.unbind(-1)
    rows = [
        a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c),
        2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b),
        2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d,
    ]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def rot_vec(rot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``R x`` for rotations ``[*, 3, 3]`` and vectors ``[*, 3]`` (leading dims broadcast)."""
    return torch.matmul(rot, x.unsqueeze(-1)).squeeze(-1)


def apply(rot: torch.Tensor, trans: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``T ∘ x = R x + t``: local points ``x [*, 3]`` into the global frame."""
    return rot_vec(rot, x) + trans


def invert(rot: torch.Tensor, trans: torch.Tensor) -> Frame:
    """``T⁻¹ = (Rᵀ, −Rᵀ t)``."""
    rot_t = rot.transpose(-1, -2)
    return rot_t, -rot_vec(rot_t, trans)


def invert_apply(rot: torch.Tensor, trans: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``T⁻¹ ∘ x = Rᵀ (x − t)``: global points ``x [*, 3]`` into the local frame."""
    return rot_vec(rot.transpose(-1, -2), x - trans)


def compose(rot1: torch.Tensor, trans1: torch.Tensor, rot2: torch.Tensor, trans2: torch.Tensor) -> Frame:
    """``T1 ∘ T2 = (R1 R2, R1 t2 + t1)``: first apply ``T2``, then ``T1``."""
    return torch.matmul(rot1, rot2), rot_vec(rot1, trans2) + trans1


def scale_translation(rot: torch.Tensor, trans: torch.Tensor, factor: float) -> Frame:
    """The frame with its translation multiplied by ``factor`` (nm-scale -> Å, Alg. 20)."""
    return rot, trans * factor


def rigid_from_3_points(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, eps: float = 1e-8) -> Frame:
    """Frame from three points by Gram-Schmidt (Alg. 21), e.g. ``(N, CA, C)``.

    The origin is ``x2``; the x axis points to ``x3``; ``x1`` lies in the xy plane
    (positive y). Inputs ``[*, 3]``; returns ``(R [*, 3, 3], t [*, 3])``.
    """
    if not (x1.shape[-1] == x2.shape[-1] == x3.shape[-1] == 3):
        raise ValueError("rigid_from_3_points expects three point tensors of shape [*, 3]")
    v1 = x3 - x2
    v2 = x1 - x2
    e1 = v1 / torch.sqrt((v1 * v1).sum(-1, keepdim=True) + eps)
    u2 = v2 - e1 * (e1 * v2).sum(-1, keepdim=True)
    e2 = u2 / torch.sqrt((u2 * u2).sum(-1, keepdim=True) + eps)
    e3 = torch.cross(e1, e2, dim=-1)
    rot = torch.stack([e1, e2, e3], dim=-1)  # columns are the basis vectors
    return rot, x2
