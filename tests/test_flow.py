"""Flow matching conventions, samplers, guidance and latent statistics (svgt2i.py), checked against analytic
flows and hand-derived values."""

import math

import pytest
import torch

from plumbing.runs import StatsAccumulator
from plumbing.loading import load_latent_stats
from svgt2i import (Guidance, dpm_sigmas, dpm_solver_sample, euler_sample, euler_times, guided_velocity, interpolate, sample_training_t, time_shift, training_shift, velocity_target)

# -----------------------------------------------------------------------------------------------------------
# An analytic flow: data ~ N(mu, s^2) per coordinate, noise ~ N(0, 1). Along x_t = t x1 + (1 - t) x0 the
# marginal is N(t mu, var_t) with var_t = t^2 s^2 + (1 - t)^2, the exact velocity field is
#   v(x, t) = mu + (t s^2 - (1 - t)) / var_t * (x - t mu),
# and its ODE maps noise z to data exactly: x_1 = mu + s z.
MU, S = 1.5, 0.5


def gaussian_velocity(x, t):
    var = t * t * S * S + (1 - t) ** 2
    return MU + (t * S * S - (1 - t)) / var * (x - t * MU)


def exact_endpoint(z):
    return MU + S * z


def test_conventions():
    noise, data = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(interpolate(noise, data, 0.0), noise)
    assert torch.equal(interpolate(noise, data, 1.0), data)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = interpolate(noise, data, t)
    assert torch.allclose(xt[1], 0.25 * data[1] + 0.75 * noise[1])
    # the velocity target is the time derivative of the path
    eps = 1e-3
    d = (interpolate(noise, data, 0.5 + eps) - interpolate(noise, data, 0.5 - eps)) / (2 * eps)
    assert torch.allclose(d, velocity_target(noise, data), atol=1e-4)


def test_time_shift_values():
    assert time_shift(0.5, 1.0) == 0.5
    assert time_shift(0.0, 3.0) == 0.0 and time_shift(1.0, 3.0) == 1.0
    assert time_shift(0.5, 3.0) == pytest.approx(0.25)          # 0.5 / (0.5 + 3 - 1.5)
    # shift > 1 moves time towards noise: in sigma = 1 - t it is sigma' = s sigma / (1 + (s - 1) sigma)
    for t in (0.1, 0.4, 0.9):
        sig = 1 - t
        assert 1 - time_shift(t, 4.0) == pytest.approx(4 * sig / (1 + 3 * sig))


@pytest.mark.parametrize("resolution, shift", [(256, 1.649), (512, 1.878), (1024, 3.158)])
def test_training_shift(resolution, shift):
    assert training_shift((resolution // 16) ** 2) == pytest.approx(shift, abs=1e-3)


def test_training_t_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_training_t(200_000, 256, generator=g)
    assert 0 < t.min() and t.max() < 1
    # median of logit-normal(0, 1) is 0.5; the shift maps it to time_shift(0.5, S)
    assert t.median().item() == pytest.approx(time_shift(0.5, training_shift(256)), abs=0.01)


def test_euler_grid_matches_official():
    # reference: the official ODE path with 50 points and shift 6: t = 0, 0.00346, 0.00704, ..., 0.797, 0.889, 1.0
    ts = euler_times(49, 6.0)
    assert ts[0] == 0 and ts[-1] == 1
    for i, v in [(1, 0.00346), (2, 0.00704), (47, 0.797), (48, 0.889)]:
        assert ts[i].item() == pytest.approx(v, abs=6e-4)


def test_dpm_grid_matches_official():
    sig = dpm_sigmas(50, 10.0)
    for i, v in [(0, 0.99990), (1, 0.99786), (10, 0.97549), (25, 0.90893), (45, 0.52604), (49, 0.16935)]:
        assert sig[i].item() == pytest.approx(v, abs=1e-5)
    assert sig[50].item() == 0.0


@pytest.mark.parametrize("sampler", [euler_sample, dpm_solver_sample])
def test_model_evaluations_and_times(sampler):
    seen = []

    def v(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    sampler(v, torch.zeros(2), 7, shift=3.0)
    assert len(seen) == 7                                      # N steps = N model evaluations
    assert all(0 <= a < b < 1 for a, b in zip(seen, seen[1:]))  # increasing, never at t = 1


@pytest.mark.parametrize("sampler", [euler_sample, dpm_solver_sample])
def test_constant_velocity_is_integrated_exactly(sampler):
    c = torch.tensor([0.3, -2.0])
    x = sampler(lambda x, t: c.expand_as(x), torch.zeros(5, 2), 9, shift=5.0)
    # Euler covers t in [0, 1]; DPM starts at sigma = shift(0.999), i.e. t ~ 1e-4, and ends at t = 1
    span = 1.0 if sampler is euler_sample else dpm_sigmas(9, 5.0)[0].item()
    assert torch.allclose(x, (span * c).expand_as(x), atol=1e-6)


def test_euler_converges_first_order_on_gaussian_flow():
    z = torch.randn(4096, dtype=torch.float64)
    errs = [(euler_sample(gaussian_velocity, z, n, shift=1.0) - exact_endpoint(z)).abs().max().item()
            for n in (50, 100, 200)]
    assert errs[2] < 0.02
    assert 1.7 < errs[0] / errs[1] < 2.3 and 1.7 < errs[1] / errs[2] < 2.3


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm_solver_beats_euler_on_gaussian_flow(shift):
    # The official grid's last steps are coarse in lambda and the final step returns the data prediction at
    # sigma_{N-1}, so convergence is not monotone at small N; at N = 80 it is well ahead of Euler.
    z = torch.randn(4096, dtype=torch.float64)
    err = lambda sampler, n: (sampler(gaussian_velocity, z, n, shift=shift) - exact_endpoint(z)).abs().max().item()
    e20, e80 = err(dpm_solver_sample, 20), err(dpm_solver_sample, 80)
    assert e80 < 0.02 and e80 < 0.5 * e20
    assert e80 < 0.3 * err(euler_sample, 80)


def test_dpm_first_step_is_euler_and_second_is_multistep():
    # hand-derived: with v(x, t) = a * x, step 1 from sigma_0 to sigma_1 is x + (sigma_0 - sigma_1) v, and
    # step 2 is the DPM-Solver++(2M) update written out in lambda = log((1 - sigma) / sigma)
    a = 0.7
    v = lambda x, t: a * x
    x0 = torch.tensor([1.0], dtype=torch.float64)
    sig = dpm_sigmas(3, 2.0).tolist()
    lam = [math.log((1 - s) / s) for s in sig[:3]]
    x1 = x0 + (sig[0] - sig[1]) * a * x0
    m0, m1 = x0 + sig[0] * a * x0, x1 + sig[1] * a * x1
    h, h0 = lam[2] - lam[1], lam[1] - lam[0]
    phi = math.expm1(-h)
    x2 = sig[2] / sig[1] * x1 - (1 - sig[2]) * phi * m1 - 0.5 * (1 - sig[2]) * phi * (m1 - m0) * h / h0
    x3 = x2 + sig[2] * a * x2                                 # final step: the data prediction
    assert torch.allclose(dpm_solver_sample(v, x0, 3, shift=2.0), x3, atol=1e-12)


# -----------------------------------------------------------------------------------------------------------
# Guidance

class FakeDiT(torch.nn.Module):
    """Velocity = x * (1 + mean caption feature); records the batch sizes it was called with. Speaks NextDiT's
    protocol: context(cap_feats, cap_mask, sizes) once, then forward(x, t, context=...) per step."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def context(self, cap_feats, cap_mask, sizes):
        assert len(sizes) == cap_feats.shape[0] == cap_mask.shape[0]
        return cap_feats

    def forward(self, x, t, cap_feats=None, cap_mask=None, context=None):
        self.calls.append(x.shape[0])
        assert t.shape == (x.shape[0],)
        cap_feats = context if context is not None else cap_feats
        return x * (1 + cap_feats.mean(dim=(1, 2))).view(-1, 1, 1, 1)


def _caps(B):
    cond = torch.full((B, 3, 2), 1.0)
    uncond = torch.zeros(B, 3, 2)
    return torch.cat([cond, uncond]), torch.ones(2 * B, 3, dtype=torch.bool)


def test_cfg_formula_single_batched_forward():
    model, (feats, mask) = FakeDiT(), _caps(2)
    x = torch.randn(2, 4, 3, 3)
    g = guided_velocity(model, feats, mask, Guidance(scale=3.0, renorm=0.0))(x, 0.3)
    cond, uncond = 2 * x, x
    assert torch.allclose(g, uncond + 3.0 * (cond - uncond))
    assert model.calls == [4]                                  # cond and uncond in one forward


def test_cfg_renorm_clips_to_cond_norm():
    model, (feats, mask) = FakeDiT(), _caps(2)
    x = torch.randn(2, 4, 3, 3)
    g = guided_velocity(model, feats, mask, Guidance(scale=3.0, renorm=1.0))(x, 0.3)
    # guided = 4x is longer than cond = 2x, so it is scaled back to ||cond|| per sample
    assert torch.allclose(g, 2 * x, atol=1e-6)
    g = guided_velocity(model, feats, mask, Guidance(scale=3.0, renorm=3.0))(x, 0.3)
    assert torch.allclose(g, 4 * x, atol=1e-6)                # 4x is within 3 * ||2x||: untouched


def test_cfg_truncation_and_off():
    model, (feats, mask) = FakeDiT(), _caps(2)
    x = torch.randn(2, 4, 3, 3)
    v = guided_velocity(model, feats, mask, Guidance(scale=3.0, renorm=0.0, trunc=0.5))
    assert torch.allclose(v(x, 0.7), 2 * x) and model.calls[-1] == 2     # past trunc: cond only
    assert torch.allclose(v(x, 0.2), 4 * x) and model.calls[-1] == 4
    v = guided_velocity(model, feats[:2], mask[:2], Guidance(scale=1.0))
    assert torch.allclose(v(x, 0.2), 2 * x) and model.calls[-1] == 2     # scale 1: no uncond forward


# -----------------------------------------------------------------------------------------------------------
# Latent statistics

def test_stats_round_trip_and_official_format(tmp_path):
    mean, std = torch.randn(12, 384), torch.rand(12, 384) + 0.1
    path = tmp_path / "stats.pt"
    torch.save({"mean": mean, "std": std}, path)
    stats = load_latent_stats(str(path))
    assert torch.equal(stats.mean, mean[-1]) and torch.equal(stats.std, std[-1])
    f = torch.randn(2, 384, 3, 5) * 2
    z = stats.normalize(f)
    assert torch.allclose(z[0, 7], (f[0, 7] - mean[-1, 7]) / (std[-1, 7] + 1e-8))
    assert torch.allclose(stats.denormalize(z), f, atol=1e-5)
    # denormalize has no epsilon: exactly z * std + mean
    assert torch.equal(stats.denormalize(torch.ones(1, 384, 1, 1)).flatten(), (std[-1] + mean[-1]))


def test_stats_392_extension(tmp_path):
    mean, std = torch.randn(12, 384), torch.rand(12, 384) + 0.1
    torch.save({"mean": mean, "std": std}, tmp_path / "s.pt")
    stats = load_latent_stats(str(tmp_path / "s.pt"), channels=392)
    assert stats.channels == 392
    assert torch.allclose(stats.mean[384:], mean[-1].mean().expand(8))
    assert torch.allclose(stats.std[384:], std[-1].mean().expand(8))
    with pytest.raises(ValueError, match="channels"):
        stats.normalize(torch.zeros(1, 384, 2, 2))


def test_stats_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_latent_stats(str(tmp_path / "missing.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="'mean' and 'std'"):
        load_latent_stats(str(tmp_path / "w.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_latent_stats(str(tmp_path / "junk.pt"))


def test_stats_accumulator_matches_torch(tmp_path):
    feats = [torch.randn(3, 6, 4, 5) * torch.arange(1, 7).view(1, 6, 1, 1) + 2 for _ in range(4)]
    acc = StatsAccumulator()
    for f in feats:
        acc.update(f)
    state = acc.state()
    flat = torch.cat([f.transpose(0, 1).flatten(1) for f in feats], dim=1)
    assert state["mean"].shape == (1, 6)
    assert torch.allclose(state["mean"][0], flat.mean(1), atol=1e-5)
    assert torch.allclose(state["std"][0], flat.std(1), atol=1e-5)
    torch.save(state, tmp_path / "s.pt")
    stats = load_latent_stats(str(tmp_path / "s.pt"), channels=6)
    z = stats.normalize(torch.cat(feats))
    assert z.mean().abs() < 1e-5 and (z.transpose(0, 1).flatten(1).std(1) - 1).abs().max() < 1e-3
