"""Jacobian directions: the block Krylov solver against a dense SVD of the exact Jacobian on a tiny UNet."""

import pytest
import torch
from diffusers import UNet2DModel

from conftest import TINY_UNET
from facelab.diffusion import Denoiser, Schedule
from facelab.directions.jacobian import (
    masked_eps_fn,
    power_iteration_reference,
    subspace_sin,
    top_singular,
    trajectory_jacobian,
)

K, T = 3, 500


def no_hooks(unet):
    return all(not m._forward_hooks for m in unet.modules())


def v_error(v: torch.Tensor, dense_v: torch.Tensor) -> torch.Tensor:
    """Per-vector distance of unit vectors [k, ...] to the dense ones [k, D], up to sign."""
    v = v.reshape(len(v), -1).double()
    return torch.minimum((v - dense_v).norm(dim=1), (v + dense_v).norm(dim=1))


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    schedule = Schedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})
    return Denoiser(UNet2DModel(**TINY_UNET).eval(), schedule)


@pytest.fixture(scope="module")
def x_t():
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def dense_jacobian(f, h0) -> torch.Tensor:
    """The exact Jacobian [out, D] of the vector map h ↦ f(h)[0]."""
    jac = torch.autograd.functional.jacobian(lambda h: f(h)[0], h0)
    return jac.reshape(jac.shape[0], -1).double()


@pytest.fixture(scope="module")
def dense(denoiser, x_t):
    """(h_t, f, J, its SVD (U, S, Vh)) at t = T, unmasked."""
    h_t, f = masked_eps_fn(denoiser, x_t, T)
    jac = dense_jacobian(f, h_t)
    return h_t, f, jac, torch.linalg.svd(jac, full_matrices=False)


def test_top_singular_matches_dense_svd(denoiser, dense):
    h_t, f, jac, (u_d, s_d, vh_d) = dense
    assert h_t.shape == (1, 16, 8, 8) and jac.shape == (3 * 16 * 16, 16 * 8 * 8)
    res = top_singular(f, h_t, k=K, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.sigma.shape == (K,) and res.v.shape == (K, 16, 8, 8) and res.u.shape == (K, 768)
    assert ((res.sigma.double() - s_d[:K]).abs() / s_d[:K]).max() < 1e-3
    assert v_error(res.v, vh_d[:K]).max() < 1e-3
    assert v_error(res.u, u_d[:, :K].T).max() < 1e-3
    # The triplets are consistent (J·v = σ·u) and follow the sign convention.
    flat = res.v.reshape(K, -1).double()
    assert torch.allclose(flat @ jac.T, res.sigma.double()[:, None] * res.u.double(), atol=1e-4)
    assert (flat.gather(1, flat.abs().argmax(1, keepdim=True)) > 0).all()
    assert res.passes == 2 * K * res.iters
    assert no_hooks(denoiser.unet)


def test_region_mask_zeroes_rows_outside(denoiser, x_t, dense):
    _, _, jac, _ = dense
    region = torch.zeros(16, 16)
    region[4:10, 3:12] = 1
    h_t, f = masked_eps_fn(denoiser, x_t, T, region)
    masked = dense_jacobian(f, h_t)
    inside = region.bool().expand(3, 16, 16).flatten()
    assert (masked[~inside] == 0).all() and masked[inside].abs().amax(1).min() > 0
    assert torch.allclose(masked[inside], jac[inside], atol=1e-6)
    # [H, W], [1, H, W] and [C, H, W] masks are the same mask.
    for shaped in (region[None], region.expand(3, 16, 16)):
        assert torch.equal(masked_eps_fn(denoiser, x_t, T, shaped)[1](h_t), f(h_t))
    # The masked directions only explain ε inside the region.
    res = top_singular(f, h_t, k=2, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.u[:, ~inside].abs().max() < 1e-12
    assert ((res.sigma.double() - torch.linalg.svdvals(masked)[:2]).abs()).max() < 1e-3 * res.sigma[0]


def test_block_solver_needs_fewer_passes_than_reference(denoiser, dense):
    h_t, f, _, (_, s_d, vh_d) = dense
    block = top_singular(f, h_t, k=K, tol=1e-5, max_iters=50, generator=torch.Generator().manual_seed(0))
    reference = power_iteration_reference(f, h_t, k=K, tol=1e-5, max_iters=50,
                                          generator=torch.Generator().manual_seed(0))
    print(f"network passes at tol 1e-5: block Krylov {block.passes}, reference power iteration {reference.passes}")
    assert block.converged and block.passes < reference.passes < 2 * K * 50 + 1
    # The reference finds the same spectrum; its vectors are only roughly converged.
    assert ((reference.sigma.double() - s_d[:K]).abs() / s_d[:K]).max() < 1e-3
    assert v_error(reference.v, vh_d[:K]).max() < 0.1
    assert no_hooks(denoiser.unet)


def test_reproducible_and_trajectory(denoiser, x_t, dense):
    h_t, f, _, (_, s_d, vh_d) = dense
    runs = [top_singular(f, h_t, k=K, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:3], runs[1][:3])) and runs[0][3:] == runs[1][3:]
    # Another random start converges to the same, sign-normalised, vectors.
    other = top_singular(f, h_t, k=K, generator=torch.Generator().manual_seed(1))
    assert (other.v - runs[0].v).abs().max() < 1e-3
    # Along a trajectory: the t = T column is the dense solution.
    x_ts = torch.stack([torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)), x_t])
    sigma, v, passes = trajectory_jacobian(denoiser, x_ts, [900, T], k=K, progress=False,
                                           generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (K, 2) and v.shape == (K, 2, 16, 8, 8) and passes >= 4 * K
    assert ((sigma[:, 1].double() - s_d[:K]).abs() / s_d[:K]).max() < 1e-3
    assert v_error(v[:, 1], vh_d[:K]).max() < 1e-3
    assert no_hooks(denoiser.unet)


@pytest.mark.parametrize("method", ["krylov", "subspace"])
def test_solver_on_explicit_linear_map(method):
    """A known spectrum with a rank-deficient tail: exercises the Krylov restart and plain subspace iteration."""
    gen = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(30, 6, generator=gen, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(40, 6, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2], dtype=torch.float64)
    matrix = left @ torch.diag(spectrum) @ right.T  # rank 6: the Krylov space closes after two blocks

    def f(h):
        return h.flatten(1) @ matrix.T

    res = top_singular(f, torch.zeros(1, 4, 10, dtype=torch.float64), k=K, tol=1e-10, max_iters=100,
                       generator=torch.Generator().manual_seed(0), method=method)
    assert res.converged and res.v.shape == (K, 4, 10) and res.v.dtype == torch.float64
    assert torch.allclose(res.sigma, spectrum[:K], rtol=1e-8)
    assert v_error(res.v, right[:, :K].T).max() < 1e-6
    with pytest.raises(ValueError, match="method"):
        top_singular(f, torch.zeros(1, 40), method="lanczos")


def linear_map(rows: int, cols: int, spectrum: torch.Tensor, seed: int = 0):
    """f(h) = M·vec(h) with M = L·diag(spectrum)·Rᵀ: singular values and vectors known in closed form."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, len(spectrum), generator=gen, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(cols, len(spectrum), generator=gen, dtype=torch.float64)).Q
    matrix = left @ torch.diag(spectrum.double()) @ right.T
    return (lambda h: h.flatten(1) @ matrix.T), left, right


def test_golub_kahan_finds_the_known_singular_triplets():
    spectrum = 10.0 * 0.8 ** torch.arange(40)  # slowly decaying: a hard case for power iteration
    f, left, right = linear_map(120, 90, spectrum)
    h0 = torch.zeros(1, 9, 10, dtype=torch.float64)
    res = top_singular(f, h0, k=K, tol=1e-9, max_iters=40, generator=torch.Generator().manual_seed(0),
                       method="golub_kahan", oversample=2)
    assert res.converged and res.v.shape == (K, 9, 10) and res.u.shape == (K, 120)
    assert torch.allclose(res.sigma, spectrum[:K].double(), rtol=1e-9)
    assert v_error(res.v, right[:, :K].T).max() < 1e-6 and v_error(res.u, left[:, :K].T).max() < 1e-6
    assert res.passes == 2 * (K + 2) * res.iters
    # Jᵀu = σ·v holds exactly for the Ritz triplets (Rayleigh–Ritz on the output side).
    matrix = left @ torch.diag(spectrum.double()) @ right.T
    assert torch.allclose(res.u.double() @ matrix, res.sigma[:, None] * res.v.reshape(K, -1), atol=1e-10)
    # A looser tolerance stops earlier, with an angle to the true subspace of the order of the tolerance.
    loose = top_singular(f, h0, k=K, tol=1e-2, generator=torch.Generator().manual_seed(0), method="golub_kahan")
    assert loose.passes < res.passes
    assert float(subspace_sin(loose.v.reshape(K, -1).T, right[:, :K])) < 0.05
    # The sequential power iteration needs over 4× the passes for a less accurate subspace.
    reference = power_iteration_reference(f, h0, k=K, generator=torch.Generator().manual_seed(0))
    mid = top_singular(f, h0, k=K, tol=1e-3, generator=torch.Generator().manual_seed(0), method="golub_kahan")
    error = {name: float(subspace_sin(r.v.reshape(K, -1).T, right[:, :K])) for name, r in
             (("reference", reference), ("golub_kahan", mid))}
    assert error["golub_kahan"] < error["reference"] < 1e-4 and reference.passes > 4 * mid.passes


def test_golub_kahan_warm_start_and_small_outputs():
    spectrum = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    f, left, right = linear_map(30, 40, spectrum, seed=1)
    h0 = torch.zeros(1, 40, dtype=torch.float64)
    # Started at the true directions, one iteration (2b passes) confirms them.
    exact = right[:, :K].T.reshape(K, 40)
    res = top_singular(f, h0, k=K, tol=1e-8, method="golub_kahan", start=exact, oversample=1,
                       generator=torch.Generator().manual_seed(0))
    assert res.converged and res.iters == 1 and res.passes == 2 * (K + 1)
    assert torch.allclose(res.sigma, spectrum[:K].double(), rtol=1e-10)
    # A rank-6 map: the bidiagonalisation exhausts its range and stops with the exact answer.
    res = top_singular(f, h0, k=K, tol=1e-12, method="golub_kahan", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(res.sigma, spectrum[:K].double(), rtol=1e-8)
    assert v_error(res.v, right[:, :K].T).max() < 1e-6
    with pytest.raises(ValueError, match="start"):
        top_singular(f, h0, k=K, method="golub_kahan", start=torch.zeros(K, 7))


def test_golub_kahan_trajectory_matches_dense_svd(denoiser, x_t, dense):
    h_t, f, _, (_, s_d, vh_d) = dense
    x_ts = torch.stack([torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)), x_t])
    sigma, v, passes = trajectory_jacobian(denoiser, x_ts, [900, T], k=K, progress=False, method="golub_kahan",
                                           tol=1e-6, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (K, 2) and v.shape == (K, 2, 16, 8, 8)
    assert ((sigma[:, 1].double() - s_d[:K]).abs() / s_d[:K]).max() < 1e-4
    assert v_error(v[:, 1], vh_d[:K]).max() < 1e-3
    assert no_hooks(denoiser.unet)
