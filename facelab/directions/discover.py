"""The maths of direction discovery on recorded h (PCA, supervised mean differences, conditional projection).

All functions take h as [N, T, *h] (N samples, T grid steps, newest/largest t first) and return directions in the
`Directions` layout: unit `basis` [K, T, *h] and natural `scale` [K, T].
"""
from __future__ import annotations

import torch
from torch import Tensor


def _unit(v: Tensor) -> tuple[Tensor, Tensor]:
    """Split [..., D] into unit vectors and norms (zero vectors stay zero)."""
    norm = v.norm(dim=-1, keepdim=True)
    return v / norm.clamp_min(1e-12), norm.squeeze(-1)


def _signs(v: Tensor) -> Tensor:
    return torch.where(v < 0, -1.0, 1.0).to(v.dtype)


def pca_per_t(hs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step PCA by the Gram matrix in float64 (exact for N ≪ D).

    Returns basis [k, T, *h] (unit PCs; sign: positive first coordinate at the largest t, then every step aligned
    with it), std [k, T] (singular value/√(N−1): the std along the PC) and the explained-variance ratio [k, T].
    """
    n, steps, *shape = hs.shape
    if n < 2:
        raise ValueError("PCA needs at least 2 samples")
    k = min(k, n - 1)
    x = hs.reshape(n, steps, -1).double()
    basis, std, ratio = [], [], []
    for i in range(steps):
        xc = x[:, i] - x[:, i].mean(0)
        gram = xc @ xc.T
        evals, evecs = torch.linalg.eigh(gram)                       # ascending
        evals, evecs = evals.flip(0)[:k].clamp_min(1e-30), evecs.flip(1)[:, :k]
        pcs = (evecs.T @ xc) / evals.sqrt()[:, None]                # unit rows U = S^-1/2 Vᵀ X
        basis.append(pcs)
        std.append((evals / (n - 1)).sqrt())
        ratio.append(evals / gram.trace().clamp_min(1e-30))
    basis = torch.stack(basis, 1)                                    # [k, T, D]
    basis = basis * _signs(basis[:, :1, :1])                       # first coordinate > 0 at the largest t
    basis = basis * _signs((basis * basis[:, :1]).sum(-1, keepdim=True))  # every step aligned with it
    return basis.float().reshape(k, steps, *shape), torch.stack(std, 1).float(), torch.stack(ratio, 1).float()


def pca_joint(hs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """One PCA over all steps concatenated (T·D features): PC k's slice at step t has its own length, so it is
    returned as unit basis [k, T, *h] with scale [k, T] = std_k·‖slice‖, plus the explained ratio [k]."""
    n, steps, *shape = hs.shape
    basis, std, ratio = pca_per_t(hs.reshape(n, 1, -1), k)
    slices, norms = _unit(basis[:, 0].reshape(basis.shape[0], steps, -1))
    return slices.reshape(-1, steps, *shape), std[:, :1] * norms, ratio[:, 0]


def supervised(hs: Tensor, scores: Tensor, num_examples: int, groups: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """mean h of the `num_examples` highest-scoring samples minus that of the lowest, per step: [T, *h].

    groups: a boolean per sample (e.g. predicted male); each extreme then takes half from either group, so the
    direction does not pick up the group (the reference's balance_gender). Returns (difference, pos ids, neg ids)."""
    if groups is None:
        if 2 * num_examples > len(scores):
            raise ValueError(f"num_examples={num_examples} needs at least {2 * num_examples} indexed samples, "
                             f"have {len(scores)}")
        order = scores.argsort(descending=True)
        pos, neg = order[:num_examples], order[-num_examples:]
    else:
        half = num_examples // 2
        parts = []
        for member in (groups, ~groups):
            ids = member.nonzero().squeeze(1)
            if 2 * half > len(ids):
                raise ValueError(f"num_examples={num_examples}: a balanced index needs {2 * half} samples per "
                                 f"group, one group has {len(ids)}")
            order = ids[scores[ids].argsort(descending=True)]
            parts.append((order[:half], order[-half:]))
        pos, neg = torch.cat([p for p, _ in parts]), torch.cat([n for _, n in parts])
    return hs[pos].float().mean(0) - hs[neg].float().mean(0), pos, neg


def project_out(primal: Tensor, conditions: Tensor) -> Tensor:
    """p − Nᵀ(NNᵀ)⁻¹N·p over all steps jointly: the exact projection of the primal direction [T, *h] onto the
    orthogonal complement of the span of the condition directions [C, T, *h]."""
    p = primal.reshape(-1).double()
    n = conditions.reshape(conditions.shape[0], -1).double()
    coef = torch.linalg.lstsq(n @ n.T, (n @ p)[:, None]).solution
    return (p - (n.T @ coef).squeeze(1)).to(primal.dtype).reshape(primal.shape)


def as_directions(vectors: Tensor) -> tuple[Tensor, Tensor]:
    """[K, T, *h] raw direction vectors -> (unit basis [K, T, *h], scale [K, T] = their norms)."""
    k, steps, *shape = vectors.shape
    basis, norms = _unit(vectors.reshape(k, steps, -1))
    return basis.reshape(vectors.shape), norms


def index_difference(index: dict[str, Tensor], attribute: str, num_examples: int, balance_gender: bool = False
                     ) -> Tensor:
    """`supervised` on an index of scored trajectories (directions.index): [T, *h] for `attribute`; balance_gender
    takes each extreme half from either gender predicted by the index classifier's Male head."""
    groups = index["score.Male"] > 0.5 if balance_gender and attribute != "Male" else None
    return supervised(index["hs"], index[f"score.{attribute}"], num_examples, groups)[0]


def supervised_directions(index: dict[str, Tensor], attribute: str, conditions: list[str] = (), num_examples: int = 100,
                          balance_gender: bool = False) -> tuple[Tensor, float | None]:
    """Raw direction vectors [K, T, *h] from a scored index: the attribute's mean difference (K = 1), or with
    `conditions` that difference with theirs projected out and the primal one after it (K = 2); and the norm fraction
    the projection kept (None without conditions)."""
    primal = index_difference(index, attribute, num_examples, balance_gender)
    if not conditions:
        return primal[None], None
    projected = project_out(primal, torch.stack([index_difference(index, c, num_examples, balance_gender)
                                                 for c in conditions]))
    return torch.stack([projected, primal]), float(projected.norm() / primal.norm())
