"""Reward heads (ArmoRM, GPM, ensembles, VPL) and ensemble combination."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import reward_model_latent as rml
from rlhf_jax.models import reward_heads as rh
from rlhf_jax.rewards import ensemble

RNG = np.random.default_rng(1)
H = jnp.asarray(RNG.normal(size=(4, 8)), jnp.float32)
KEY = jax.random.PRNGKey(0)


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


def test_ensemble_combinations_reference():
  r = RNG.normal(size=(5, 3))
  rj = jnp.asarray(r, jnp.float32)
  np.testing.assert_allclose(jax.jit(ensemble.mean)(rj), r.mean(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(ensemble.wco)(rj), r.min(1), rtol=1e-5, atol=1e-6)
  uwo = jax.jit(ensemble.uwo, static_argnames=("coef", "unbiased"))
  np.testing.assert_allclose(uwo(rj, coef=0.5), r.mean(1) - 0.5 * r.var(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(uwo(rj, coef=0.5, unbiased=True),
                             r.mean(1) - 0.5 * r.var(1, ddof=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(uwo(rj, coef=0.0), ensemble.mean(rj), rtol=1e-6)
  with pytest.raises(ValueError, match="rewards"):
    ensemble.wco(jnp.ones(3))


def test_armorm_head():
  head = rh.ArmoRMHead(num_objectives=3, gate_hidden=(5,))
  params = jax.jit(head.init)(KEY, H)
  score, r, g = jax.jit(head.apply)(params, H)
  assert score.shape == (4,) and r.shape == g.shape == (4, 3)
  np.testing.assert_allclose(g.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(score, params["params"]["scale"] * (g * r).sum(1), rtol=1e-5)
  # Verbosity decorrelation r'_i = r_i − λ_i r_v.
  vh = rh.ArmoRMHead(num_objectives=3, gate_hidden=(5,), verbosity_index=2,
                     verbosity_coefs=(0.5, 0.2, 0.0))
  _, r2, _ = jax.jit(vh.apply)(params, H)
  np.testing.assert_allclose(r2, r - jnp.array([[0.5, 0.2, 0.0]]) * r[:, 2:3], rtol=1e-5,
                             atol=1e-6)


def test_ridge_regression_recovers_linear_map():
  x = RNG.normal(size=(50, 4))
  w = RNG.normal(size=(4, 2))
  y = x @ w + 0.3
  kw, b = rh.ridge_regression(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), l2=1e-6)
  np.testing.assert_allclose(kw, w, atol=1e-3)
  np.testing.assert_allclose(b, [0.3, 0.3], atol=1e-3)


def test_gpm_head_and_ensemble_head():
  head = rh.GPMHead(num_blocks=2)
  params = jax.jit(head.init)(KEY, H)
  v, lam = jax.jit(head.apply)(params, H)
  assert v.shape == (4, 4) and lam.shape == (4, 2)
  np.testing.assert_allclose(jnp.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(lam.sum(1), 2.0, rtol=1e-5)
  ens = rh.EnsembleHead(num_members=3, hidden=(6,))
  p = jax.jit(ens.init)(KEY, H)
  out = jax.jit(ens.apply)(p, H)
  assert out.shape == (4, 3)
  assert float(jnp.std(out, axis=1).mean()) > 0  # members are initialised independently


def test_vpl_modules():
  enc = rh.VPLEncoder(latent_dim=2, hidden=8)
  c = jnp.asarray(RNG.normal(size=(3, 5, 8)), jnp.float32)
  r = jnp.asarray(RNG.normal(size=(3, 5, 8)), jnp.float32)
  mask = jnp.array([[1, 1, 1, 0, 0]] * 3, bool)
  p = jax.jit(enc.init)(KEY, c, r, mask)
  apply = jax.jit(enc.apply)
  mu, lv = apply(p, c, r, mask)
  assert mu.shape == lv.shape == (3, 2)
  # Masked context pairs do not change the posterior.
  mu2, _ = apply(p, c.at[:, 3:].set(9.0), r, mask)
  np.testing.assert_allclose(mu, mu2, rtol=1e-5, atol=1e-6)
  z = rml.reparameterize(KEY, mu, lv)
  head = rh.VPLRewardHead(hidden=(8,))
  hp = jax.jit(head.init)(KEY, H[:3], z)
  assert jax.jit(head.apply)(hp, H[:3], z).shape == (3,)
  with pytest.raises(ValueError, match="z must be"):
    head.apply(hp, H[:3], z[:2])


def test_ensemble_gradients_and_single_member():
  from jax.test_util import check_grads
  r = RNG.normal(size=(5, 3))
  with jax.enable_x64(True):
    for f in (ensemble.mean, ensemble.wco, lambda x: ensemble.uwo(x, coef=0.3),
              lambda x: ensemble.uwo(x, coef=0.3, unbiased=True)):
      check_grads(lambda x: jnp.sum(f(x) * jnp.arange(1.0, 6.0)), (jnp.asarray(r),), order=1,
                  modes=("rev",))
  # K = 1: every combination is the member itself (population variance 0)
  one = jnp.asarray(r[:, :1], jnp.float32)
  for f in (ensemble.mean, ensemble.wco, lambda x: ensemble.uwo(x, coef=0.5)):
    np.testing.assert_allclose(f(one), r[:, 0], rtol=1e-6)


def _armorm_reference(p, h, hx, *, temperature, verbosity_index=None, coefs=None):
  """ArmoRM stage 2 in float64 numpy from the paper's equations: r = W h + b per objective,
  r′ = r − λ ⊙ r_v, g = softmax(MLP(h_x)/τ) (ReLU between layers), R = β gᵀ r′."""
  f = lambda x: np.asarray(x, np.float64)  # noqa: E731
  h, hx = f(h), f(hx)
  r = h @ f(p["regression"]["kernel"]) + f(p["regression"]["bias"])
  if verbosity_index is not None:
    r = r - np.asarray(coefs)[None, :] * r[:, verbosity_index:verbosity_index + 1]
  z = hx
  layers = sorted(p["gate"], key=lambda k: int(k.split("_")[1]))
  for i, name in enumerate(layers):
    z = z @ f(p["gate"][name]["kernel"]) + f(p["gate"][name]["bias"])
    if i < len(layers) - 1:
      z = np.maximum(z, 0.0)
  z = z / temperature
  g = np.exp(z - z.max(1, keepdims=True))
  g /= g.sum(1, keepdims=True)
  return float(p["scale"]) * (g * r).sum(1), r, g


def test_armorm_stage2_gating_mixing_and_bt_loss_reference():
  """Gated scores with a separate prompt feature h_x, verbosity decorrelation and a learned
  scale, and the stage-2 BT loss on chosen/rejected pairs sharing a prompt, vs float64."""
  from rlhf_jax.losses import reward_model as rm_losses
  coefs = (0.4, 0.0, 0.25)
  head = rh.ArmoRMHead(num_objectives=3, gate_hidden=(6, 5), temperature=2.5, scale_init=1.7,
                       verbosity_index=1, verbosity_coefs=coefs)
  hc = jnp.asarray(RNG.normal(size=(4, 8)), jnp.float32)
  hr = jnp.asarray(RNG.normal(size=(4, 8)), jnp.float32)
  hx = jnp.asarray(RNG.normal(size=(4, 8)), jnp.float32)
  params = jax.jit(head.init)(KEY, hc, hx)["params"]
  assert len(params["gate"]) == 3 and float(params["scale"]) == pytest.approx(1.7)
  kw = dict(temperature=2.5, verbosity_index=1, coefs=coefs)
  score, r, g = jax.jit(head.apply)({"params": params}, hc, hx)
  want_s, want_r, want_g = _armorm_reference(params, hc, hx, **kw)
  np.testing.assert_allclose(score, want_s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(r, want_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
  # The gate reads only the prompt feature: the same prompt gives the same gates.
  _, _, g_rej = head.apply({"params": params}, hr, hx)
  np.testing.assert_allclose(g_rej, g, rtol=1e-6)

  def stage2_loss(p):
    sc, _, _ = head.apply({"params": p}, hc, hx)
    sr, _, _ = head.apply({"params": p}, hr, hx)
    losses, _ = rm_losses.bt(sc, sr)
    return jnp.mean(losses)

  rc = _armorm_reference(params, hc, hx, **kw)[0]
  rr = _armorm_reference(params, hr, hx, **kw)[0]
  want = np.mean(np.log1p(np.exp(-(rc - rr))))
  np.testing.assert_allclose(float(jax.jit(stage2_loss)(params)), want, rtol=1e-5)
  # d loss / d β = −mean((1 − σ(Δ)) Δ / β) with Δ = R_c − R_r (Δ is linear in β).
  grads = jax.jit(jax.grad(stage2_loss))(params)
  delta = rc - rr
  dscale = -np.mean((1.0 - 1.0 / (1.0 + np.exp(-delta))) * delta / float(params["scale"]))
  np.testing.assert_allclose(float(grads["scale"]), dscale, rtol=1e-4)
  assert float(jnp.abs(grads["gate"]["dense_0"]["kernel"]).sum()) > 0
  from jax.test_util import check_grads
  check_grads(jax.jit(lambda k: stage2_loss({**params, "gate": {**params["gate"], "dense_0": {
      **params["gate"]["dense_0"], "kernel": k}}})), (params["gate"]["dense_0"]["kernel"],),
      order=1, modes=("rev",), atol=2e-2, rtol=2e-2)
