"""Policy-gradient surrogates vs float64 numpy references, special cases and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax import losses
from rlhf_jax.losses import policy_gradient as pg

RNG = np.random.default_rng(2)
B, T = 4, 5
LP = -np.abs(RNG.normal(size=(B, T)))
OLD = LP + 0.4 * RNG.normal(size=(B, T))
ADV = RNG.normal(size=B)
ADV_T = RNG.normal(size=(B, T))
MASK = (np.arange(T)[None] < np.array([5, 3, 1, 4])[:, None]).astype(np.float64)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def j(x):
  return jnp.asarray(x, jnp.float32)


def bc(a):
  return a[:, None] if a.ndim == 1 else a


def ref_ppo(lp, old, a, m, el, eh, c=None):
  a = bc(a)
  rho = np.exp(lp - old)
  loss = -np.minimum(rho * a, np.clip(rho, 1 - el, 1 + eh) * a)
  if c is not None:
    loss = np.where(a < 0, np.minimum(loss, -c * a), loss)
  return loss * m


def ref_gspo(lp, old, a, m, el, eh):
  s = np.exp(((lp - old) * m).sum(1) / m.sum(1))[:, None]
  a = bc(a)
  return -np.minimum(s * a, np.clip(s, 1 - el, 1 + eh) * a) * m


@pytest.mark.parametrize("adv", [ADV, ADV_T], ids=["seq_adv", "token_adv"])
def test_ppo_clip_reference(adv):
  for el, eh, c in [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0)]:
    loss, ex = losses.get("ppo_clip")(j(LP), j(OLD), j(adv), j(MASK), epsilon_low=el,
                                      epsilon_high=eh, dual_clip=c)
    close(loss, ref_ppo(LP, OLD, adv, MASK, el, eh, c))
    close(ex.ratio, np.exp(LP - OLD))
  _, ex = losses.get("ppo_clip")(j(LP), j(OLD), j(adv), j(MASK))
  rho, a = np.exp(LP - OLD), bc(adv)
  ref_clip = (-np.clip(rho, 0.8, 1.2) * a > -rho * a) & (MASK > 0)
  assert np.array_equal(np.asarray(ex.clipped), ref_clip)


def test_ppo_infinite_epsilon_is_unclipped_surrogate():
  loss, _ = losses.get("ppo_clip")(j(LP), j(OLD), j(ADV_T), j(MASK), epsilon_low=1e9,
                                   epsilon_high=1e9)
  close(loss, -np.exp(LP - OLD) * ADV_T * MASK)


def test_dual_clip_bounds_negative_advantages():
  old = np.zeros((1, 3))
  lp = np.log(np.array([[10.0, 0.5, 10.0]]))
  a = np.array([[-1.0, -1.0, 1.0]])
  loss, ex = pg.ppo_clip(j(lp), j(old), j(a), jnp.ones((1, 3)), dual_clip=3.0)
  close(loss, [[3.0, 0.8, -1.2]])
  assert np.asarray(ex.clipped).tolist() == [[True, True, True]]
  with pytest.raises(ValueError, match="dual_clip"):
    pg.ppo_clip(j(lp), j(old), j(a), jnp.ones((1, 3)), dual_clip=0.5)


def test_gspo_reference_one_token_equals_ppo_and_sequence_gradient():
  loss, _ = losses.get("gspo")(j(LP), j(OLD), j(ADV), j(MASK), epsilon_low=0.1,
                               epsilon_high=0.15)
  close(loss, ref_gspo(LP, OLD, ADV, MASK, 0.1, 0.15))
  one = j(LP[:, :1]), j(OLD[:, :1]), j(ADV), jnp.ones((B, 1))
  close(pg.gspo(*one, epsilon_low=0.2, epsilon_high=0.2)[0],
        pg.ppo_clip(*one, epsilon_low=0.2, epsilon_high=0.2)[0])
  with jax.enable_x64(True):
    lp, old, a, m = (jnp.asarray(x) for x in (LP, OLD, ADV, MASK))

    def token_form(x):
      l, _ = pg.gspo(x, old, a, m, epsilon_low=0.1, epsilon_high=0.15)
      return jnp.mean(jnp.sum(l, 1) / jnp.sum(m, 1))

    def sequence_form(x):
      s = jnp.exp(jnp.sum((x - old) * m, 1) / jnp.sum(m, 1))
      return jnp.mean(-jnp.minimum(s * a, jnp.clip(s, 0.9, 1.15) * a))

    np.testing.assert_allclose(jax.grad(token_form)(lp), jax.grad(sequence_form)(lp),
                               rtol=1e-10, atol=1e-12)


def test_cispo_sapo_topr_opmd_dro_reinforce_rover_references():
  rho = np.exp(LP - OLD)
  a = bc(ADV)
  loss, _ = losses.get("cispo")(j(LP), j(OLD), j(ADV), j(MASK), epsilon_high=0.2)
  close(loss, -np.clip(rho, 0, 1.2) * a * LP * MASK)
  tau = np.where(a > 0, 1.0, 1.05)
  loss, _ = losses.get("sapo")(j(LP), j(OLD), j(ADV), j(MASK))
  close(loss, -(4 / tau) / (1 + np.exp(-tau * (rho - 1))) * a * MASK)
  seq = np.exp(((LP - OLD) * MASK).sum(1))[:, None]
  alpha = np.where(a >= 0, 1.0, np.clip(seq, 0, 1))
  loss, _ = losses.get("topr")(j(LP), j(OLD), j(ADV), j(MASK))
  close(loss, -alpha * a * LP * MASK)
  keep = ((a >= 0) & (rho <= 1.2)) | ((a <= 0) & (rho >= 0.8))
  for iw in (False, True):
    w = rho if iw else 1.0
    loss, _ = losses.get("opmd")(j(LP), j(OLD), j(ADV), j(MASK), tau=0.3, importance_weight=iw)
    close(loss, (-a * w * LP * keep + 0.3 * (LP - OLD) ** 2) * MASK)
  loss, _ = losses.get("dro")(j(LP), j(OLD), j(ADV), j(MASK), tau=0.3)
  close(loss, (-a * LP + 0.15 * (LP - OLD) ** 2) * MASK)
  loss, _ = losses.get("reinforce")(j(LP), j(OLD), j(ADV), j(MASK))
  close(loss, -a * LP * MASK)
  loss, _ = losses.get("rover")(j(LP), j(OLD), j(ADV_T), j(MASK), rho=0.5)
  close(loss, (0.5 * (LP - OLD) - ADV_T) ** 2 * MASK)


def test_gradients_of_weighted_surrogates():
  grad = lambda name, **kw: jax.grad(lambda x: jnp.sum(
      losses.get(name)(x, j(OLD), j(ADV), j(MASK), **kw)[0]))(j(LP))
  rho, a = np.exp(LP - OLD), bc(ADV)
  close(grad("cispo"), -np.clip(rho, 0, 1.2) * a * MASK)
  close(grad("reinforce"), -a * MASK * np.ones_like(LP))
  # SAPO's gate has the unclipped gradient -A·ρ at ρ = 1 (on-policy).
  g_sapo = jax.grad(lambda x: jnp.sum(pg.sapo(x, x, j(ADV), j(MASK))[0]))(j(LP))
  close(g_sapo, -a * MASK * np.ones_like(LP))


SURROGATES = ["ppo_clip", "gspo", "cispo", "sapo", "topr", "opmd", "dro", "reinforce", "rover"]


@pytest.mark.parametrize("name", SURROGATES)
def test_jit_grads_and_padding_invariance(name):
  fn = losses.get(name)
  assert losses.REGISTRY.family(name) == "policy_gradient"
  junk = np.where(MASK > 0, 0.0, 5.0)
  f = jax.jit(lambda x, o: fn(x, o, j(ADV_T if name == "rover" else ADV), j(MASK))[0])
  base = np.asarray(f(j(LP), j(OLD)))
  assert np.all(base[MASK == 0] == 0)
  close(f(j(LP - junk), j(OLD + junk)), base)
  with jax.enable_x64(True):
    adv = jnp.asarray(ADV_T if name == "rover" else ADV)
    w = jnp.asarray(RNG.normal(size=(B, T)))
    if name == "gspo":  # the token form is exact for per-sequence token means only
      w = jnp.asarray(RNG.normal(size=(B, 1)) / MASK.sum(1, keepdims=True)) * jnp.ones((B, T))
    if name in ("cispo", "topr"):
      # Their weights are stop-gradient functions of the ratio: hold the ratio fixed
      # (old = x − c) so finite differences see the same constant weight.
      old_of = lambda x: x - jnp.asarray(LP - OLD)
    else:
      old_of = lambda x: jnp.asarray(OLD)
    check_grads(jax.jit(lambda x: jnp.sum(fn(x, old_of(x), adv, jnp.asarray(MASK))[0] * w)),
                (jnp.asarray(LP),), order=1, modes=("rev",))


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="advantages"):
    pg.ppo_clip(j(LP), j(OLD), jnp.ones(3), j(MASK))
  with pytest.raises(ValueError, match="old_logps"):
    pg.ppo_clip(j(LP), j(OLD[:, :2]), j(ADV), j(MASK))
  with pytest.raises(ValueError, match="mask"):
    pg.gspo(j(LP), j(OLD), j(ADV), j(MASK[:, :2]))


def test_value_loss_entropy_and_mismatch_weights():
  v, vo, ret = (RNG.normal(size=(B, T)) for _ in range(3))
  loss, ex = pg.value_loss(j(v), j(vo), j(ret), j(MASK), clip_range=0.2)
  vc = vo + np.clip(v - vo, -0.2, 0.2)
  close(loss, 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2) * MASK)
  close(pg.value_loss(j(v), j(vo), j(ret), j(MASK), clip_range=None)[0],
        0.5 * (v - ret) ** 2 * MASK)
  with jax.enable_x64(True):
    check_grads(lambda x: jnp.sum(pg.value_loss(x, jnp.asarray(vo), jnp.asarray(ret),
                                                jnp.asarray(MASK))[0]),
                (jnp.asarray(v),), order=1, modes=("rev",))
  logits = RNG.normal(size=(B, T, 7))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  close(pg.entropy_bonus(j(logits), j(MASK)), (p * np.log(p)).sum(-1) * MASK)
  samp = OLD + 0.5 * RNG.normal(size=(B, T))
  w = np.exp(OLD - samp)
  close(pg.token_mismatch_weights(j(OLD), j(samp), j(MASK), cap=1.5), np.minimum(w, 1.5) * MASK)
  close(pg.token_mismatch_weights(j(OLD), j(samp), j(MASK), cap=1.5, truncate=False, lower=0.5),
        np.where((w > 1.5) | (w < 0.5), 0, w) * MASK)
  ws = np.exp(((OLD - samp) * MASK).sum(1, keepdims=True)) * np.ones((B, T))
  close(pg.sequence_mismatch_weights(j(OLD), j(samp), j(MASK), cap=3.0),
        np.minimum(ws, 3.0) * MASK, 1e-4)
  close(pg.sequence_mismatch_weights(j(OLD), j(samp), j(MASK), cap=3.0, truncate=False),
        np.where(ws > 3.0, 0, ws) * MASK, 1e-4)


@pytest.mark.parametrize("name", SURROGATES)
def test_extreme_padding_gives_finite_gradients(name):
  """Padding log-probs far apart (e.g. filled with −1e9) change neither value nor gradient."""
  adv = j(ADV_T if name == "rover" else ADV)
  fill = np.where(MASK > 0, 0.0, 1.0)
  f = jax.jit(jax.value_and_grad(lambda x, o: jnp.sum(losses.get(name)(x, o, adv, j(MASK))[0]
                                                      * j(1.0 + MASK))))
  v0, g0 = f(j(LP), j(OLD))
  for lp, old in ((LP - 1e9 * fill, OLD), (LP, OLD - 1e9 * fill), (LP + 300 * fill, OLD)):
    v, g = f(j(lp), j(old))
    assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g))), name
    close(v, float(v0), 1e-4)
    close(g, np.asarray(g0))


def test_value_entropy_mismatch_jit_padding_and_grads():
  v, vo, ret = (RNG.normal(size=(B, T)) for _ in range(3))
  junk = np.where(MASK > 0, 0.0, 1e4)
  f = jax.jit(lambda a, b, c: pg.value_loss(a, b, c, j(MASK), clip_range=0.2)[0])
  close(f(j(v + junk), j(vo - junk), j(ret + junk)), np.asarray(f(j(v), j(vo), j(ret))))
  # clip_range → ∞ is the unclipped loss
  close(pg.value_loss(j(v), j(vo), j(ret), j(MASK), clip_range=1e9)[0],
        0.5 * (v - ret) ** 2 * MASK)
  logits = RNG.normal(size=(B, T, 7))
  e = jax.jit(pg.entropy_bonus)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  bad = np.where(MASK[..., None] > 0, logits, 1e4 * RNG.normal(size=logits.shape))
  close(e(j(bad), j(MASK)), (p * np.log(p)).sum(-1) * MASK)
  close(e(j(np.zeros((B, T, 7))), j(MASK)), -np.log(7) * MASK)  # uniform: −H = −log V
  with jax.enable_x64(True):
    check_grads(lambda l: jnp.sum(pg.entropy_bonus(l, jnp.asarray(MASK)) * jnp.arange(T)),
                (jnp.asarray(logits),), order=1, modes=("rev",))
  samp = OLD + 0.5 * RNG.normal(size=(B, T))
  for fn in (pg.token_mismatch_weights, pg.sequence_mismatch_weights):
    jf = jax.jit(lambda o, s: fn(o, s, j(MASK), cap=3.0))
    close(jf(j(OLD - junk), j(samp + junk)), np.asarray(jf(j(OLD), j(samp))), 1e-4)
    close(fn(j(OLD), j(OLD), j(MASK)), MASK)  # same sampler: weight 1 on valid tokens
    g = jax.grad(lambda o: jnp.sum(fn(o, j(samp), j(MASK))))(j(OLD))
    assert np.all(np.asarray(g) == 0)  # stop-gradient weights
