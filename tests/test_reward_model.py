"""Reward-model losses against independent float64 numpy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads as _check_grads

import rlhf_jax.losses as L
from rlhf_jax.losses import reward_model as rm
from rlhf_jax.losses import reward_model_dist as rmd
from rlhf_jax.losses import reward_model_latent as rml

RNG = np.random.default_rng(0)
B = 6


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


def _np_logsig(x):
  return -np.logaddexp(0.0, -x)


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def test_registered():
  names = set(L.names("reward_model"))
  assert {"bt", "bt_margin", "reward_centering", "bt_regression", "plackett_luce", "hl_gauss",
          "two_hot", "regret_preference", "gpm", "vpl", "maxmin_em"} <= names


def test_bt_and_margin_reference():
  cw, cl = RNG.normal(size=B), RNG.normal(size=B)
  m = RNG.uniform(0, 1, size=B)
  got, ex = jax.jit(rm.bt)(*_f32(cw, cl))
  _close(got, -_np_logsig(cw - cl))
  _close(ex.accuracy, (cw > cl).astype(float))
  got, _ = jax.jit(rm.bt, static_argnames="center_coef")(*_f32(cw, cl), center_coef=0.01)
  _close(got, -_np_logsig(cw - cl) + 0.01 * (cw + cl) ** 2)
  a = 0.1
  got, _ = jax.jit(lambda x, y, mm: rm.bt_margin(x, y, margin=mm, label_smoothing=a))(
      *_f32(cw, cl, m))
  ref = -((1 - a) * _np_logsig(cw - cl - m) + a * _np_logsig(-(cw - cl - m)))
  _close(got, ref)
  # m = 0, α = 0 is BT.
  _close(rm.bt_margin(*_f32(cw, cl), margin=0.0)[0], rm.bt(*_f32(cw, cl))[0])


def test_preference_strength_reference():
  cw, cl = RNG.normal(size=(10, 3)), RNG.normal(size=(10, 3))
  mu, sd = jax.jit(rm.preference_strength)(*_f32(cw, cl))
  _close(mu, (cw - cl).mean(1))
  _close(sd, (cw - cl).std(1))
  flip = rm.low_strength_mask(mu, fraction=0.2)
  assert set(np.flatnonzero(np.asarray(flip))) == set(np.argsort((cw - cl).mean(1))[:2])


def test_bt_regression_reference():
  cw, cl, tw, tl = (RNG.normal(size=B) for _ in range(4))
  got, ex = rm.bt_regression(*_f32(cw, cl), chosen_targets=jnp.float32(tw) + 0 * cw[0],
                             rejected_targets=jnp.asarray(tl, jnp.float32), bt_coef=0.7,
                             regression_coef=0.3)
  ref = 0.7 * -_np_logsig(cw - cl) + 0.3 * 0.5 * ((cw - tw) ** 2 + (cl - tl) ** 2)
  _close(got, ref)
  got0, _ = rm.bt_regression(*_f32(cw, cl), chosen_targets=jnp.asarray(tw, jnp.float32),
                             rejected_targets=jnp.asarray(tl, jnp.float32), regression_coef=0.0)
  _close(got0, -_np_logsig(cw - cl))


def _np_pl(r, mask):
  out = []
  for row, m in zip(r, mask):
    v = row[m]
    out.append(sum(-(v[k] - np.log(np.sum(np.exp(v[k:])))) for k in range(len(v))))
  return np.array(out)


def test_plackett_luce_reference_and_bt_case():
  r = RNG.normal(size=(B, 4))
  mask = np.ones((B, 4), bool)
  mask[1, 3] = mask[2, 2:] = False
  got, _ = jax.jit(rm.plackett_luce)(jnp.asarray(r, jnp.float32), mask=jnp.asarray(mask))
  _close(got, _np_pl(r, mask))
  two = jnp.asarray(r[:, :2], jnp.float32)
  _close(rm.plackett_luce(two)[0], rm.bt(two[:, 0], two[:, 1])[0])
  # Padding invariance: values under the mask do not matter.
  r2 = r.copy()
  r2[~mask] = 1e3
  _close(rm.plackett_luce(jnp.asarray(r2, jnp.float32), mask=jnp.asarray(mask))[0],
         _np_pl(r, mask))


def test_regret_preference_reference():
  aw, al = RNG.normal(size=(B, 5)), RNG.normal(size=(B, 5))
  mw = RNG.uniform(size=(B, 5)) > 0.3
  p = RNG.uniform(size=B)
  got, _ = jax.jit(lambda a, b, m, q: rm.regret_preference(a, b, chosen_mask=m, labels=q))(
      *_f32(aw, al), jnp.asarray(mw), jnp.asarray(p, jnp.float32))
  d = (aw * mw).sum(1) - al.sum(1)
  _close(got, -(p * _np_logsig(d) + (1 - p) * _np_logsig(-d)))


def _np_gpm(v1, v2, lam, beta, p):
  k = v1.shape[1] // 2
  rmat = np.zeros((2 * k, 2 * k))
  for l in range(k):
    rmat[2 * l, 2 * l + 1], rmat[2 * l + 1, 2 * l] = -lam[l], lam[l]
  s = np.einsum("bi,ij,bj->b", v2, rmat, v1)  # ⟨R v1, v2⟩ written as v2ᵀ R v1
  return -(p * _np_logsig(s / beta) + (1 - p) * _np_logsig(-s / beta)), s


def test_gpm_reference_skew_and_bt_case():
  v1, v2 = RNG.normal(size=(B, 6)), RNG.normal(size=(B, 6))
  lam = RNG.uniform(0.1, 2, size=3)
  got, _ = jax.jit(lambda a, b, l: rml.gpm(a, b, eigenvalues=l, beta=0.1, labels=0.9))(
      *_f32(v1, v2, lam))
  ref, s = _np_gpm(v1, v2, lam, 0.1, 0.9)
  _close(got, ref, 1e-4)
  _close(rml.gpm_score(*_f32(v1, v2), eigenvalues=jnp.asarray(lam, jnp.float32)), s)
  s12 = rml.gpm_score(*_f32(v1, v2))
  _close(s12, -np.asarray(rml.gpm_score(*_f32(v2, v1))))
  _close(rml.gpm_probability(*_f32(v1, v1)), 0.5 * np.ones(B))
  # 2-dim embeddings (r, 1) with β = 1 reproduce BT.
  cw, cl = RNG.normal(size=B), RNG.normal(size=B)
  e = lambda r: jnp.stack([jnp.asarray(r, jnp.float32), jnp.ones(B)], 1)
  _close(rml.gpm(e(cw), e(cl), beta=1.0)[0], rm.bt(*_f32(cw, cl))[0])
  with pytest.raises(ValueError, match="even"):
    rml.gpm_score(jnp.ones((2, 3)), jnp.ones((2, 3)))


def _cyclic_pairs(n=5):
  """Regular tournament: i ≻ i+1, i ≻ i+2 (mod n)."""
  w = np.array([i for i in range(n) for d in (1, 2)])
  l = np.array([(i + d) % n for i in range(n) for d in (1, 2)])
  return jnp.asarray(w), jnp.asarray(l)


def _fit(loss_fn, params, steps=400, lr=0.5):
  @jax.jit
  def run(p):
    def step(p, _):
      return jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(loss_fn)(p)), None
    return jax.lax.scan(step, p, None, length=steps)[0]
  return run(params)


def _acc(probs, tie=1e-2):
  return float(jnp.mean(jnp.where(jnp.abs(probs - 0.5) < tie, 0.5, (probs > 0.5) * 1.0)))


def test_gpm_solves_cyclic_preferences_bt_cannot():
  w, l = _cyclic_pairs()
  key = jax.random.PRNGKey(0)
  r = _fit(lambda r: jnp.mean(rm.bt(r[w], r[l])[0]), 0.1 * jax.random.normal(key, (5,)))
  bt_acc = _acc(jax.nn.sigmoid(r[w] - r[l]))
  v = _fit(lambda v: jnp.mean(rml.gpm(v[w], v[l], beta=0.1)[0]),
           0.5 * jax.random.normal(key, (5, 4)), lr=0.05)
  gpm_acc = _acc(rml.gpm_probability(v[w], v[l], beta=0.1))
  assert abs(bt_acc - 0.5) < 1e-6, bt_acc
  assert gpm_acc >= 0.99, gpm_acc


def test_vpl_reference():
  cw, cl = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
  mask = RNG.uniform(size=(3, 4)) > 0.3
  mu, lv = RNG.normal(size=(3, 2)), RNG.normal(size=(3, 2)) * 0.3
  got, ex = jax.jit(lambda *a: rml.vpl(a[0], a[1], mean=a[2], log_var=a[3], mask=a[4],
                                       kl_coef=0.05))(*_f32(cw, cl, mu, lv), jnp.asarray(mask))
  kl = 0.5 * np.sum(mu ** 2 + np.exp(lv) - lv - 1, axis=1)
  nll = -np.sum(_np_logsig(cw - cl) * mask, axis=1)
  _close(got, nll + 0.05 * kl)
  _close(ex.kl, kl)


def test_maxmin_em_reference():
  cw, cl = RNG.normal(size=(8, 2)), RNG.normal(size=(8, 2))
  users = np.array([0, 0, 1, 1, 2, 2, 2, 1])
  resp = rml.maxmin_e_step(*_f32(cw, cl), jnp.asarray(users), num_users=3)
  ll = np.zeros((3, 2))
  for b, u in enumerate(users):
    ll[u] += _np_logsig(cw[b] - cl[b])
  _close(resp, np.eye(2)[ll.argmax(1)])
  soft = rml.maxmin_e_step(*_f32(cw, cl), jnp.asarray(users), num_users=3, hard=False)
  _close(soft, np.exp(ll) / np.exp(ll).sum(1, keepdims=True), 1e-4)
  wts = np.asarray(soft)[users]
  got, _ = jax.jit(lambda a, b, c: rml.maxmin_em(a, b, weights=c))(*_f32(cw, cl, wts))
  _close(got, np.sum(wts * -_np_logsig(cw - cl), axis=1))


def _np_phi(x):
  return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_hl_gauss_reference_and_inverse():
  y = np.array([-0.9, -0.2, 0.0, 0.33, 0.7, 2.0])
  nb, lo, hi = 10, -1.0, 1.0
  edges = np.linspace(lo, hi, nb + 1)
  sig = 0.75 * (hi - lo) / nb
  yc = np.clip(y, lo, hi)[:, None]
  cdf = _np_phi((edges[None] - yc) / sig)
  ref_t = (cdf[:, 1:] - cdf[:, :-1]) / (cdf[:, -1:] - cdf[:, :1])
  logits = RNG.normal(size=(6, nb))
  got, ex = jax.jit(lambda a, b: rmd.hl_gauss(a, b, v_min=lo, v_max=hi))(*_f32(logits, y))
  _close(ex.targets, ref_t)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  _close(got, -(ref_t * logp).sum(1))
  centers = 0.5 * (edges[1:] + edges[:-1])
  _close(ex.predictions, (np.exp(logp) * centers).sum(1))
  # Inverse transform of the target distribution recovers interior targets.
  rec = (ref_t * centers).sum(1)
  assert np.abs(rec[1:4] - y[1:4]).max() < 0.02


def test_two_hot_reference_and_inverse():
  y = np.array([-1.0, -0.37, 0.0, 0.5, 0.99, 3.0])
  nb, lo, hi = 5, -1.0, 1.0
  z = np.linspace(lo, hi, nb)
  ref = np.zeros((6, nb))
  for i, v in enumerate(np.clip(y, lo, hi)):
    j = min(int(np.floor((v - lo) / 0.5)), nb - 2)
    ref[i, j], ref[i, j + 1] = (z[j + 1] - v) / 0.5, (v - z[j]) / 0.5
  logits = RNG.normal(size=(6, nb))
  got, ex = rmd.two_hot(*_f32(logits, y), v_min=lo, v_max=hi)
  _close(ex.targets, ref)
  _close((np.asarray(ex.targets) * z).sum(1), np.clip(y, lo, hi))
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  _close(got, -(ref * logp).sum(1))
  x = jnp.asarray([-300.0, -2.5, 0.0, 1.0, 1e4])
  _close(rmd.inverse_symmetric_sqrt(rmd.symmetric_sqrt(x)), np.asarray(x), 1e-3)
  h = np.sign(x) * (np.sqrt(np.abs(x) + 1) - 1) + 1e-3 * np.asarray(x)
  _close(rmd.symmetric_sqrt(x), h)


def test_gradients():
  with jax.enable_x64(True):
    f64 = lambda *s: jnp.asarray(RNG.normal(size=s), jnp.float64)
    a, b = f64(4), f64(4)
    kw = dict(order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
    check_grads = lambda f, args, **k: _check_grads(jax.jit(f), args, **k)
    check_grads(lambda x, y: rm.bt(x, y, center_coef=0.1)[0].sum(), (a, b), **kw)
    check_grads(lambda x, y: rm.bt_margin(x, y, margin=0.3, label_smoothing=0.1)[0].sum(),
                (a, b), **kw)
    check_grads(lambda x, y: rm.bt_regression(x, y, chosen_targets=a, rejected_targets=b)[0]
                .sum(), (a, b), **kw)
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
    check_grads(lambda x: rm.plackett_luce(x, mask=mask)[0].sum(), (f64(4, 3),), **kw)
    check_grads(lambda x, y: rm.regret_preference(x, y)[0].sum(), (f64(4, 3), f64(4, 3)), **kw)
    check_grads(lambda x, y, l: rml.gpm(x, y, eigenvalues=jnp.abs(l), beta=0.5)[0].sum(),
                (f64(4, 4), f64(4, 4), f64(2)), **kw)
    check_grads(lambda x, y, m, v: rml.vpl(x, y, mean=m, log_var=v)[0].sum(),
                (f64(2, 3), f64(2, 3), f64(2, 2), f64(2, 2)), **kw)
    check_grads(lambda x, y: rml.maxmin_em(x, y, weights=jnp.full((4, 2), 0.5))[0].sum(),
                (f64(4, 2), f64(4, 2)), **kw)
    yv = jnp.array([0.1, -0.4, 0.3, 0.9])
    check_grads(lambda x: rmd.hl_gauss(x, yv, v_min=-1., v_max=1.)[0].sum(), (f64(4, 6),), **kw)
    check_grads(lambda x: rmd.two_hot(x, yv, v_min=-1., v_max=1.)[0].sum(), (f64(4, 6),), **kw)


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="rejected_rewards"):
    rm.bt(jnp.ones(3), jnp.ones(4))
  with pytest.raises(ValueError, match="label_smoothing"):
    rm.bt_margin(jnp.ones(3), jnp.ones(3), label_smoothing=0.7)
  with pytest.raises(ValueError, match="margin"):
    rm.bt_margin(jnp.ones(3), jnp.ones(3), margin=jnp.ones(4))
  with pytest.raises(ValueError, match="mask"):
    rm.plackett_luce(jnp.ones((2, 3)), mask=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="v_max"):
    rmd.hl_gauss(jnp.ones((2, 3)), jnp.ones(2), v_min=1.0, v_max=0.0)
  with pytest.raises(ValueError, match="user_ids"):
    rml.maxmin_e_step(jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.ones(2), num_users=2)


def test_reward_centering_reference_grads_and_bt_sum():
  cw, cl = RNG.normal(size=B), RNG.normal(size=B)
  got, ex = jax.jit(lambda a, b: rm.reward_centering(a, b, coef=0.03))(*_f32(cw, cl))
  _close(got, 0.03 * (cw + cl) ** 2)
  _close(ex.margins, cw - cl)
  # BT + centring regulariser = bt(center_coef=η)
  _close(rm.bt(*_f32(cw, cl))[0] + rm.reward_centering(*_f32(cw, cl), coef=0.03)[0],
         rm.bt(*_f32(cw, cl), center_coef=0.03)[0])
  with jax.enable_x64(True):
    _check_grads(lambda a, b: rm.reward_centering(a, b, coef=0.03)[0].sum(),
                 (jnp.asarray(cw), jnp.asarray(cl)), order=1, modes=("rev",))
  with pytest.raises(ValueError, match="coef"):
    rm.reward_centering(*_f32(cw, cl), coef=-1.0)


def test_masked_losses_padding_invariance_and_reductions():
  aw, al = RNG.normal(size=(B, 5)), RNG.normal(size=(B, 5))
  mw, ml = RNG.uniform(size=(B, 5)) > 0.3, RNG.uniform(size=(B, 5)) > 0.3
  f = jax.jit(lambda a, b: rm.regret_preference(a, b, chosen_mask=jnp.asarray(mw),
                                                rejected_mask=jnp.asarray(ml))[0])
  d = (aw * mw).sum(1) - (al * ml).sum(1)
  _close(f(*_f32(np.where(mw, aw, 1e4), np.where(ml, al, -1e4))), -_np_logsig(d))
  # hard labels, one step per segment: BT on the per-step values
  _close(rm.regret_preference(*_f32(aw[:, :1], al[:, :1]))[0], -_np_logsig(aw[:, 0] - al[:, 0]))
  cw, cl = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  mu, lv = RNG.normal(size=(3, 2)), RNG.normal(size=(3, 2)) * 0.3
  v = jax.jit(lambda a, b: rml.vpl(a, b, mean=jnp.asarray(mu, jnp.float32),
                                   log_var=jnp.asarray(lv, jnp.float32),
                                   mask=jnp.asarray(mask), kl_coef=0.0)[0])
  _close(v(*_f32(np.where(mask, cw, 1e4), np.where(mask, cl, -1e4))),
         -np.sum(_np_logsig(cw - cl) * mask, axis=1))
  # no mask == all-ones mask; kl_coef = 0 and one pair is BT
  _close(rml.vpl(*_f32(cw, cl), mean=jnp.zeros((3, 2)), log_var=jnp.zeros((3, 2)))[0],
         -np.sum(_np_logsig(cw - cl), axis=1), 1e-4)
  _close(rml.vpl(*_f32(cw[:, :1], cl[:, :1]), mean=jnp.ones((3, 2)), log_var=jnp.ones((3, 2)),
                 kl_coef=0.0)[0], -_np_logsig(cw[:, 0] - cl[:, 0]))


def test_gaussian_kl_reparameterize_reference_and_grads():
  mu, lv = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3)) * 0.5
  _close(jax.jit(rml.gaussian_kl)(*_f32(mu, lv)),
         0.5 * np.sum(mu ** 2 + np.exp(lv) - lv - 1, axis=1))
  _close(rml.gaussian_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3))), np.zeros(2))  # q = prior
  key = jax.random.PRNGKey(3)
  eps = np.asarray(jax.random.normal(key, (4, 3), jnp.float32), np.float64)
  z = jax.jit(rml.reparameterize)(key, *_f32(mu, lv))
  _close(z, mu + np.exp(0.5 * lv) * eps)
  _close(rml.reparameterize(key, jnp.asarray(mu, jnp.float32), jnp.full((4, 3), -200.0)), mu)
  # moments over many draws: z ~ N(μ, σ²)
  big = rml.reparameterize(key, jnp.full((20000, 1), 1.5), jnp.full((20000, 1), np.log(4.0)))
  assert abs(float(big.mean()) - 1.5) < 0.05 and abs(float(big.std()) - 2.0) < 0.05
  with jax.enable_x64(True):
    kw = dict(order=1, modes=("rev",))
    _check_grads(lambda m, v: rml.gaussian_kl(m, v).sum(), (jnp.asarray(mu), jnp.asarray(lv)), **kw)
    _check_grads(lambda m, v: jnp.sum(rml.reparameterize(key, m, v) ** 2),
                 (jnp.asarray(mu), jnp.asarray(lv)), **kw)


def test_distributional_helpers_reference_jit_and_grads():
  lo, hi, nb = -2.0, 3.0, 6
  np.testing.assert_allclose(rmd.two_hot_support(v_min=lo, v_max=hi, num_bins=nb),
                             np.linspace(lo, hi, nb), rtol=1e-6)
  e = np.linspace(lo, hi, nb + 1)
  _close(rmd.hl_gauss_centers(v_min=lo, v_max=hi, num_bins=nb), (e[1:] + e[:-1]) / 2)
  logits, sup = RNG.normal(size=(3, nb)), RNG.normal(size=nb)
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  _close(jax.jit(rmd.bins_to_scalar)(*_f32(logits, sup)), p @ sup)
  y = np.array([-5.0, -2.0, 0.3, 1.7, 3.0])
  t = rmd.hl_gauss_targets(jnp.asarray(y, jnp.float32), v_min=lo, v_max=hi, num_bins=nb)
  _close(np.asarray(t).sum(1), np.ones(5))
  got, ex = jax.jit(lambda a, b: rmd.two_hot(a, b, v_min=lo, v_max=hi))(
      *_f32(RNG.normal(size=(5, nb)), y))
  _close((np.asarray(ex.targets) * np.linspace(lo, hi, nb)).sum(1), np.clip(y, lo, hi))
  # a target on an atom is one-hot: the loss is that atom's −log softmax
  lg = RNG.normal(size=(1, nb))
  _close(rmd.two_hot(*_f32(lg, [0.0]), v_min=lo, v_max=hi)[0],
         -(lg[0, 2] - np.log(np.exp(lg).sum())))
  x = np.array([-40.0, -3.0, -0.5, 0.7, 9.0])
  with jax.enable_x64(True):
    _check_grads(lambda v: jnp.sum(rmd.symmetric_sqrt(v)), (jnp.asarray(x),), order=1,
                 modes=("rev",))
    _check_grads(lambda v: jnp.sum(rmd.inverse_symmetric_sqrt(v)), (jnp.asarray(x),), order=1,
                 modes=("rev",))
    _check_grads(lambda l, s: jnp.sum(rmd.bins_to_scalar(l, s)),
                 (jnp.asarray(logits), jnp.asarray(sup)), order=1, modes=("rev",))


def test_maxmin_prior_jit_and_strength_grads():
  cw, cl = RNG.normal(size=(8, 2)), RNG.normal(size=(8, 2))
  users = np.array([0, 0, 1, 1, 2, 2, 2, 1])
  prior = np.log(np.array([0.2, 0.8]))
  ll = np.zeros((3, 2))
  for b, u in enumerate(users):
    ll[u] += _np_logsig(cw[b] - cl[b])
  soft = jax.jit(lambda a, b, u, p: rml.maxmin_e_step(a, b, u, num_users=3, hard=False,
                                                       log_prior=p))(
      *_f32(cw, cl), jnp.asarray(users), jnp.asarray(prior, jnp.float32))
  post = np.exp(ll + prior) / np.exp(ll + prior).sum(1, keepdims=True)
  _close(soft, post, 1e-4)
  # one-hot weights: the M-step loss is that group's BT loss
  _close(rml.maxmin_em(*_f32(cw, cl), weights=jnp.asarray(np.eye(2)[[0] * 8], jnp.float32))[0],
         -_np_logsig(cw[:, 0] - cl[:, 0]))
  flip = jax.jit(lambda s: rm.low_strength_mask(s, fraction=0.25))(jnp.asarray([3., 1, 2, 0]))
  assert flip.tolist() == [False, False, False, True]
  _close(jax.jit(lambda a, b: rm.bt_regression(a, b, chosen_targets=a, rejected_targets=b)[0])(
      *_f32(cw[:, 0], cl[:, 0])), -_np_logsig(cw[:, 0] - cl[:, 0]))
  with jax.enable_x64(True):
    _check_grads(lambda a, b: jnp.sum(jnp.stack(rm.preference_strength(a, b))),
                 (jnp.asarray(cw), jnp.asarray(cl)), order=1, modes=("rev",))
