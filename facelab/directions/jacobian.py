"""Image-specific directions: top singular vectors of the Jacobian of the (region-masked) ε w.r.t. h_t.

J_t = ∂f_t/∂h at h_t with f_t(h) = vec(M ⊙ ε_θ(x_t, t; h replaces h-space)). `top_singular` is facelab's
solver: a block Krylov (block Lanczos) iteration on JᵀJ in h-space with Rayleigh–Ritz from an SVD of J·V;
`method="subspace"` restricts the Ritz basis to the latest block (plain subspace iteration).
`method="golub_kahan"` (opt-in) is a block Golub–Kahan bidiagonalisation (blocks of k, optionally oversampled) with
Rayleigh–Ritz on the output-space basis, so that every product, the last VJPs included, enters the Ritz space; it
warm-starts from the previous step along a trajectory and stops on a subspace-change rule (`tol` ≈ 0.2): a quarter
to a fifth of the reference's passes with subspaces within a few degrees of the converged ones
(experiments/directions/jacobian_passes.md).
`power_iteration_reference` is the original's one-vector-at-a-time power iteration, kept for comparison.

Products with J use reverse-mode autograd only, on one retained graph: Jᵀu is a VJP and J·v is the
"double VJP" d/du[(Jᵀu)·v], which works with any diffusers UNet (attention runs on the math SDPA kernel,
the fused ones have no double backward). Network passes count one per JVP and one per VJP, per vector;
the one-time linearisation (a forward and a graph-building backward) is not counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from facelab.diffusion import hspace

log = logging.getLogger("facelab")
METHODS = ("krylov", "subspace", "golub_kahan")


class JacobianSVD(NamedTuple):
    """Top-k singular triplets of J, σ descending; v (h-space) and u (output space) are unit vectors.

    Sign convention: each v has its largest-magnitude entry positive (u flipped with it).
    """

    sigma: Tensor  # [k]
    v: Tensor  # [k, *h_shape]
    u: Tensor  # [k, out_dim]
    passes: int  # network passes: JVPs + VJPs, one per vector
    iters: int  # iterations (all vectors together for the reference)
    converged: bool = True  # whether the stopping criterion was met within max_iters


def _output_mask(mask: Tensor | None, x_t: Tensor) -> Tensor | None:
    """A region mask as a [1, 1 or C, H, W] multiplier for ε; resized by area (coverage) if its size differs."""
    if mask is None:
        return None
    m = torch.as_tensor(mask).to(device=x_t.device, dtype=x_t.dtype)
    m = m[None] if m.ndim == 2 else m
    if m.ndim != 3 or m.shape[0] not in (1, x_t.shape[1]):
        raise ValueError(f"mask of shape {tuple(m.shape)}; use [H, W], [1, H, W] or [{x_t.shape[1]}, H, W]")
    if m.shape[-2:] != x_t.shape[-2:]:
        m = F.interpolate(m[None], size=x_t.shape[-2:], mode="area")[0]
    return m[None]


def masked_eps_fn(denoiser: Callable, x_t: Tensor, t: int, mask: Tensor | None = None,
                  where: str = "after") -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """h_t of `denoiser` (a `Denoiser` or any `eps = model(x_t, t)` with `.unet`) at one sample x_t [1, C, H, W],
    and f with f(h) = vec(M ⊙ ε_θ(x_t, t; h at `where`)).

    f acts row-wise on a batch: h [B, *h_shape] → [B, C·H·W] (x_t repeated), so f(h_t)[0] is the vector and
    a block of vectors costs one batched pass. mask: binary region in x_t's space, [H, W], [1, H, W] or
    [C, H, W], or None (all ones); rows outside it are zero.
    """
    if x_t.ndim != 4 or x_t.shape[0] != 1:
        raise ValueError(f"x_t must be one sample [1, C, H, W], got {tuple(x_t.shape)}")
    with torch.no_grad(), hspace(denoiser, where, capture=True) as hs:
        denoiser(x_t, t)
    h_t = hs[0]
    m = _output_mask(mask, x_t)

    def f(h: Tensor) -> Tensor:
        x = x_t.expand(h.shape[0], *x_t.shape[1:])
        # The math attention kernel: differentiable twice (J·v is a double VJP).
        with hspace(denoiser, where, edit=lambda _: h.to(h_t.dtype)), sdpa_kernel(SDPBackend.MATH):
            eps = denoiser(x, t)
        return (eps if m is None else eps * m).flatten(1)

    return h_t, f


class _Linearization:
    """J = ∂f/∂h at h0 for `batch` copies of h0, with products on one retained graph.

    Vectors are float64 columns: `jvp` maps [D, batch] → [out, batch], `vjp` maps [out, batch] → [D, batch].
    """

    def __init__(self, f: Callable[[Tensor], Tensor], h0: Tensor, batch: int):
        if h0.shape[0] != 1:
            raise ValueError(f"h0 must be one sample [1, *h_shape], got {tuple(h0.shape)}")
        self.shape = (batch, *h0.shape[1:])
        with torch.enable_grad():
            self.h = h0.detach().expand(self.shape).clone().requires_grad_(True)
            self.y = f(self.h)
            if self.y.ndim != 2 or self.y.shape[0] != batch:
                raise ValueError(f"f must map [B, *h_shape] to [B, out_dim], got {tuple(self.y.shape)}")
            if not self.y.requires_grad:
                raise ValueError("f(h) does not depend on h (is the h-space edit applied?)")
            # g = Jᵀw is linear in the dummy w, so J·v = ∂(g·v)/∂w: a VJP through g's graph.
            self.w = torch.zeros_like(self.y, requires_grad=True)
            (self.g,) = torch.autograd.grad(self.y, self.h, self.w, create_graph=True)

    def jvp(self, v: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(self.g, self.w, v.T.reshape(self.shape).to(self.g.dtype), retain_graph=True)
        return out.T.double()

    def vjp(self, u: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(self.y, self.h, u.T.to(self.y.dtype), retain_graph=True)
        return out.flatten(1).T.double()


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """float64 standard normal, drawn on the generator's device (CPU by default) then moved to `device`."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def _next_block(basis: Tensor, b: Tensor, generator: torch.Generator | None) -> Tensor:
    """Orthonormalise b against the basis columns (twice, for stability); vanished columns become random."""
    for _ in range(2):
        b = b - basis @ (basis.T @ b)
    weak = b.norm(dim=0) <= 1e-10 * b.norm(dim=0).max().clamp_min(torch.finfo(b.dtype).tiny)
    if weak.any():  # an invariant subspace was found: continue with fresh directions
        b[:, weak] = _randn((b.shape[0], int(weak.sum())), generator, b.device)
        for _ in range(2):
            b = b - basis @ (basis.T @ b)
    return torch.linalg.qr(b).Q


def _extend_basis(basis: Tensor | None, b: Tensor, generator: torch.Generator | None) -> Tensor:
    """Orthonormal columns, as many as b has, spanning b's part orthogonal to `basis` and random directions where
    that part is rank-deficient (directions below 1e-10 of b's scale count as absent); orthogonal to `basis`."""
    def project(x: Tensor) -> Tensor:
        for _ in range(2 if basis is not None else 0):
            x = x - basis @ (basis.T @ x)
        return x

    width, scale = b.shape[1], b.norm(dim=0).max()
    left, s, _ = torch.linalg.svd(project(b), full_matrices=False)
    q = left[:, s > 1e-10 * scale]
    if q.shape[1] < width:
        fill = project(_randn((b.shape[0], width - q.shape[1]), generator, b.device))
        for _ in range(2):
            fill = fill - q @ (q.T @ fill)
        q = torch.cat([q, fill], 1)
    return torch.linalg.qr(project(q)).Q


def _canonical_signs(v: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each column pair (v_i, u_i) so that v_i's largest-magnitude entry is positive."""
    peak = v.gather(0, v.abs().argmax(0, keepdim=True))
    sign = torch.where(peak < 0, -1.0, 1.0).to(v.dtype)
    return v * sign, u * sign


def _result(sigma: Tensor, v: Tensor, u: Tensor, h0: Tensor, passes: int, iters: int,
            converged: bool) -> JacobianSVD:
    v, u = _canonical_signs(v, u)
    dtype = torch.promote_types(h0.dtype, torch.float32)
    k = v.shape[1]
    return JacobianSVD(sigma.to(dtype), v.T.reshape(k, *h0.shape[1:]).to(dtype), u.T.to(dtype), passes, iters,
                       converged)


def subspace_sin(a: Tensor, b: Tensor) -> Tensor:
    """Sine of the largest principal angle between the column spans of a and b [D, k] (orthonormalised here)."""
    a, b = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    return torch.linalg.matrix_norm(b - a @ (a.T @ b), ord=2).clamp(max=1.0)


def top_singular(f: Callable[[Tensor], Tensor], h0: Tensor, k: int = 3, tol: float = 1e-5, max_iters: int = 50,
                 generator: torch.Generator | None = None, method: str = "krylov", *, start: Tensor | None = None,
                 oversample: int = 0) -> JacobianSVD:
    """Top-k singular triplets of J = ∂f/∂h at h0 [1, *h_shape]; f maps [B, *h_shape] → [B, out] row-wise.

    Each iteration applies J to a block Q of k orthonormal h-space vectors (A = J·Q, k batched JVPs) and
    then Jᵀ (B = Jᵀ·A = JᵀJ·Q, k batched VJPs): 2k passes. Rayleigh–Ritz: the SVD of J·[Q_0 … Q_i]
    (`krylov`: every block so far, a block Krylov space of JᵀJ) or of J·Q_i alone (`subspace`) gives σ
    and rotates the basis into the Ritz vectors. The next block is QR(B), orthogonalised against the basis
    for `krylov`. Stops when every Ritz pair has a relative residual ‖JᵀJ·v_i − σ_i²·v_i‖/σ_1² < tol,
    which bounds the angle to the true v_i by tol·σ_1²/gap_i; the residual is free, B having been computed.
    The initial block is random orthonormal, from `generator`.

    `golub_kahan` (see `_golub_kahan`) instead uses blocks of k + `oversample` vectors, may start from `start`
    [r, *h_shape] (e.g. the directions of the previous step of a trajectory) and reads `tol` as the sine of the
    largest angle by which the top-k subspace of v moved in the last iteration.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; use one of {METHODS}")
    if k < 1 or max_iters < 1 or oversample < 0:
        raise ValueError(f"k={k}, max_iters={max_iters} must be positive and oversample={oversample} not negative")
    if method == "golub_kahan":
        return _golub_kahan(f, h0, k, tol, max_iters, generator, start, oversample)
    lin = _Linearization(f, h0, k)
    dim = h0[0].numel()
    q = torch.linalg.qr(_randn((dim, k), generator, h0.device)).Q
    qs: list[Tensor] = []
    js: list[Tensor] = []
    ts: list[Tensor] = []
    passes = 0
    converged = False
    for it in range(1, max_iters + 1):  # noqa: B007 (the iteration count is reported after the loop)
        a = lin.jvp(q)  # J·Q
        b = lin.vjp(a)  # JᵀJ·Q
        passes += 2 * k
        if method == "subspace":  # the Ritz basis is the latest block only
            qs, js, ts = [], [], []
        qs.append(q)
        js.append(a)
        ts.append(b)
        basis, jb, jtjb = torch.cat(qs, 1), torch.cat(js, 1), torch.cat(ts, 1)
        # Rayleigh–Ritz: J·basis = P·S·Yᵀ, so σ = S, v = basis·Y, u = P (top k).
        p, s, yh = torch.linalg.svd(jb, full_matrices=False)
        y = yh[:k].T
        sigma, v, u = s[:k], basis @ y, p[:, :k]
        residual = (jtjb @ y - v * sigma**2).norm(dim=0) / (sigma[0] ** 2).clamp_min(torch.finfo(s.dtype).tiny)
        converged = bool(residual.max() < tol)
        if converged or basis.shape[1] + k > dim:  # converged, or the Krylov basis fills h-space
            break
        q = _next_block(basis, b, generator) if method == "krylov" else torch.linalg.qr(b).Q
    if not converged:
        log.warning("Jacobian SVD: residual %.2e > tol %.0e after %d iterations", float(residual.max()), tol, it)
    return _result(sigma, v, u, h0, passes, it, converged)


def _golub_kahan(f: Callable[[Tensor], Tensor], h0: Tensor, k: int, tol: float, max_iters: int,
                 generator: torch.Generator | None, start: Tensor | None, oversample: int) -> JacobianSVD:
    """Block Golub–Kahan bidiagonalisation with Rayleigh–Ritz on the output side.

    Blocks of b = k + oversample vectors. Iteration i: A = J·V_i (b JVPs), U_i = A orthonormalised against
    U_0 … U_{i-1}, G_i = Jᵀ·U_i (b VJPs): 2b passes. With P = [U_0 … U_i] (orthonormal), the SVD
    Jᵀ·P = V·S·Wᵀ is the exact Rayleigh–Ritz projection of J onto span(P): σ = S, v = V, u = P·W (top k), so
    Jᵀu = σ·v holds exactly and v lies in the block Krylov space of JᵀJ one degree above the right basis.
    The next right block is G_i orthonormalised against V_0 … V_i. V_0 is `start` (its first b directions),
    completed with random directions from `generator`. Stops when the top-k v-subspace moved by less than
    `tol` (sine of the largest principal angle) since the previous iteration, or since `start` in the first.
    """
    dim = h0[0].numel()
    b = min(k + oversample, dim)
    lin = _Linearization(f, h0, b)
    out_dim = lin.y.shape[1]
    if b > out_dim:  # a tiny output: blocks no wider than it
        b = out_dim
        lin = _Linearization(f, h0, b)
    block = _randn((dim, b), generator, h0.device)
    previous = None
    if start is not None:
        start = start.reshape(len(start), -1).T.to(block)
        if start.shape[0] != dim:
            raise ValueError(f"start of {start.shape[0]} values per direction; h has {dim}")
        block[:, :min(b, start.shape[1])] = start[:, :b]
        previous = start[:, :k]
    v_block = _extend_basis(None, block, generator)
    us: list[Tensor] = []
    gs: list[Tensor] = []
    vs: list[Tensor] = []
    passes, converged = 0, False
    for it in range(1, max_iters + 1):  # noqa: B007 (the iteration count is reported after the loop)
        a = lin.jvp(v_block)
        u_block = _extend_basis(torch.cat(us, 1) if us else None, a, generator)
        g = lin.vjp(u_block)
        passes += 2 * b
        us.append(u_block)
        gs.append(g)
        vs.append(v_block)
        right, s, wh = torch.linalg.svd(torch.cat(gs, 1), full_matrices=False)
        sigma, v, u = s[:k], right[:, :k], torch.cat(us, 1) @ wh[:k].T
        moved = 1.0 if previous is None or previous.shape[1] < k else float(subspace_sin(previous, v))
        previous = v
        converged = moved < tol
        if converged or (it + 1) * b > min(dim, out_dim):  # converged, or the next blocks would not fit
            break
        v_block = _extend_basis(torch.cat(vs, 1), g, generator)
    if not converged:
        log.warning("Jacobian SVD: subspace moved %.2e > tol %.0e after %d iterations", moved, tol, it)
    return _result(sigma, v, u, h0, passes, it, converged)


def power_iteration_reference(f: Callable[[Tensor], Tensor], h0: Tensor, k: int = 3, tol: float = 1e-5,
                              max_iters: int = 50, generator: torch.Generator | None = None,
                              patience: int = 10) -> JacobianSVD:
    """The original solver: power iteration on J·Jᵀ in output space, one vector at a time with deflation.

    Per vector: a fresh random unit u; repeat a = Jᵀu (VJP), b = J·a (JVP), deflate b against the u's
    already found, λ = ‖b‖, u = b/λ; stop once |λ − λ_prev| < tol held more than `patience` times in a row
    (or after max_iters). σ = √λ and v = a/σ. Each iteration is 2 passes with batch 1.
    """
    if k < 1 or max_iters < 1:
        raise ValueError(f"k={k} and max_iters={max_iters} must be positive")
    lin = _Linearization(f, h0, 1)
    out_dim = lin.y.shape[1]
    us: list[Tensor] = []
    vs: list[Tensor] = []
    sigmas: list[Tensor] = []
    passes = iters = 0
    converged = True
    for _ in range(k):
        u = _randn((out_dim, 1), generator, h0.device)
        u = u / u.norm()
        lam_prev, streak = None, 0
        for _ in range(max_iters):
            a = lin.vjp(u)  # Jᵀu
            b = lin.jvp(a)  # JJᵀu
            passes, iters = passes + 2, iters + 1
            if us:  # deflate: remove the span of the output vectors already found
                found = torch.cat(us, 1)
                b = b - found @ torch.linalg.solve(found.T @ found, found.T @ b)
            lam = b.norm()
            u = b / lam
            streak = streak + 1 if lam_prev is not None and abs(lam - lam_prev) < tol else 0
            lam_prev = lam
            if streak > patience:
                break
        converged &= streak > patience
        sigma = lam.sqrt()
        us.append(u)
        vs.append(a / sigma)
        sigmas.append(sigma)
    return _result(torch.stack(sigmas), torch.cat(vs, 1), torch.cat(us, 1), h0, passes, iters, converged)


def trajectory_jacobian(denoiser: Callable, x_ts: Sequence[Tensor] | Tensor, timesteps: Sequence[int],
                        mask: Tensor | None = None, k: int = 3, where: str = "after", tol: float = 1e-5,
                        max_iters: int = 50, generator: torch.Generator | None = None, method: str = "krylov",
                        progress: bool = True) -> tuple[Tensor, Tensor, int]:
    """`top_singular` at every grid time of one recorded trajectory (the sample's own x_t, fixed noise).

    x_ts: T states, each [1, C, H, W] or [C, H, W] (a list or a [T, 1, C, H, W] / [T, C, H, W] tensor),
    the network inputs at `timesteps`. One generator seeds all T solves in turn. With `golub_kahan` each solve
    starts from the previous step's directions (a warm start).
    Returns σ [k, T], v [k, T, *h_shape] and the total number of network passes.
    """
    if len(x_ts) != len(timesteps):
        raise ValueError(f"{len(x_ts)} states for {len(timesteps)} timesteps")
    sigmas, vs, passes = [], [], 0
    bar = tqdm(list(zip(x_ts, timesteps)), desc="Jacobian SVD", disable=not progress, leave=False)
    for x_t, t in bar:
        h_t, f = masked_eps_fn(denoiser, x_t if x_t.ndim == 4 else x_t[None], int(t), mask, where)
        warm = vs[-1] if vs and method == "golub_kahan" else None
        res = top_singular(f, h_t, k, tol, max_iters, generator, method, start=warm)
        sigmas.append(res.sigma)
        vs.append(res.v)
        passes += res.passes
        bar.set_postfix(t=int(t), passes=passes)
    return torch.stack(sigmas, 1), torch.stack(vs, 1), passes
