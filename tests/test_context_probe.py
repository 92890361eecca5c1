"""scripts/context_probe.py's SiLU-outside predictor (`--silu`): the inversion and the fit it ranks contexts with."""
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script


@pytest.fixture(scope="module")
def probe():
    return load_script("scripts/context_probe.py")


def test_inverse_silu_inverts_the_increasing_branch(probe):
    z = torch.linspace(probe.SILU_KNEE, 6.0, 2001, dtype=torch.float64)
    assert torch.allclose(F.silu(probe.inverse_silu(F.silu(z))), F.silu(z), atol=1e-9)
    away = z[z > -1.0]  # near the minimum the inverse is ill-conditioned; away from it, z itself comes back
    assert torch.allclose(probe.inverse_silu(F.silu(away)), away, atol=1e-6)
    low = torch.tensor([-3.0, -10.0], dtype=torch.float64)  # the other branch: the same output on this one
    assert torch.allclose(F.silu(probe.inverse_silu(F.silu(low))), F.silu(low), atol=1e-9)
    assert (probe.inverse_silu(torch.tensor([-1.0])) >= probe.SILU_KNEE).all()  # below SiLU's minimum: clamped


def test_a_map_before_a_silu_fits_what_a_linear_map_cannot(probe):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(4000, 6, generator=gen)
    z = feats @ torch.randn(6, 4, generator=gen) * 0.4  # (N, 4); about 9% on SiLU's decreasing branch
    x = F.silu(z).float()
    items = torch.randint(1, 50, (4000,), generator=gen)
    linear = probe.residual_energy(x, feats, items, 2000)
    before = probe.silu_residual_energy(x, feats, items, 2000)
    refined = probe.silu_residual_energy(x, feats, items, 2000, gauss_newton=2)
    assert linear > 0.1  # the SiLU's curvature is what a linear map leaves
    assert before < linear / 2  # the inverted targets fit, but for the points inverted onto the other branch
    assert refined < 1e-4  # which the Gauss-Newton steps fit too
    noisy = x + 0.3 * torch.randn(x.shape, generator=gen)
    assert probe.silu_residual_energy(noisy, feats, items, 2000) > 0.05  # noise is left, whatever the fit
