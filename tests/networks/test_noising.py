"""RAD masking statistics and the FSD time distributions (docs/reference.md §1.4, 1.6)."""
import math

import pytest
import torch

from models.noising import dimension_shift, fsd_noise, num_kept, random_keep_ids, sample_fsd_t, sample_mask_ratio

pytestmark = pytest.mark.quick


def test_mask_ratio_statistics():
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([sample_mask_ratio(-0.1, 0.4, generator=g) for _ in range(40_000)])
    assert abs((r == 0).float().mean().item() - 0.2) < 0.01  # P(no mask) = 0.2
    assert abs(r.mean().item() - 0.16) < 0.005  # E[r] = 0.16
    assert r.max() < 0.4


def test_kept_count_is_ceil():
    assert num_kept(256, 0.0) == 256
    assert num_kept(256, 0.3) == math.ceil(256 * 0.7) == 180
    assert num_kept(256, 0.001) == 256
    assert num_kept(256, 0.39) == math.ceil(256 * 0.61)


def test_keep_ids_are_distinct_per_sample_and_random():
    ids = random_keep_ids(64, 256, 180, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (64, 180)
    assert all(len(set(row.tolist())) == 180 for row in ids)
    assert not torch.equal(ids[0], ids[1])
    # Uniform over positions: every token kept with probability 180/256.
    freq = torch.bincount(random_keep_ids(4000, 256, 180).flatten(), minlength=256).float() / 4000
    assert (freq - 180 / 256).abs().max() < 0.04


def test_shifted_t_distribution():
    s = dimension_shift(256, 128)
    assert abs(s - 2.83) < 0.005
    t = sample_fsd_t(200_000, "shift", 256, 128, generator=torch.Generator().manual_seed(0))
    assert abs(t.mean().item() - 0.667) < 0.003
    # CDF of t = s u / (1 + (s-1) u): P(t <= x) = x / (s - (s-1) x).
    for x in (0.25, 0.5, 0.75):
        assert abs((t <= x).float().mean().item() - x / (s - (s - 1) * x)) < 0.004


def test_other_t_schedules():
    g = torch.Generator().manual_seed(0)
    u = sample_fsd_t(100_000, "uniform", 256, 128, generator=g)
    assert abs(u.mean().item() - 0.5) < 0.005
    ln = sample_fsd_t(100_000, "lognorm", 256, 128, generator=g)
    assert abs(ln.median().item() - 0.5) < 0.01 and 0 < ln.min() and ln.max() < 1


def test_fsd_noise_endpoints_and_gamma():
    z = torch.randn(4, 16, 8)
    assert torch.equal(fsd_noise(z, torch.zeros(4), 1.0), z)
    torch.manual_seed(0)
    pure = fsd_noise(z, torch.ones(4), 3.0)
    assert abs(pure.std().item() - 3.0) < 0.3  # t = 1 is gamma-scaled noise only
    assert abs((pure - 0).mean().item()) < 0.3
