"""Token/step-level estimators (GAE, REINFORCE++, GiGPO, ROVER) vs float64 numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax import advantages
from rlhf_jax.advantages import token

RNG = np.random.default_rng(1)
B, T = 3, 6
REW = RNG.normal(size=(B, T))
VAL = RNG.normal(size=(B, T))
LEN = np.array([6, 4, 1])
MASK = (np.arange(T)[None] < LEN[:, None]).astype(np.float64)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def ref_gae(r, v, lens, gamma, lam):
  out = np.zeros_like(r)
  for b, n in enumerate(lens):
    last = 0.0
    for t in reversed(range(n)):
      nv = v[b, t + 1] if t + 1 < n else 0.0
      delta = r[b, t] + gamma * nv - v[b, t]
      last = delta + gamma * lam * last
      out[b, t] = last
  return out


def ref_returns(r, lens, gamma):
  out = np.zeros_like(r)
  for b, n in enumerate(lens):
    for t in range(n):
      out[b, t] = sum(gamma ** (k - t) * r[b, k] for k in range(t, n))
  return out


def j(x):
  return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_reference(gamma, lam):
  out = advantages.get("gae")(j(REW), values=j(VAL), mask=j(MASK), gamma=gamma, lam=lam)
  close(out, ref_gae(REW, VAL, LEN, gamma, lam))


def test_gae_special_cases():
  gamma = 0.9
  one = advantages.get("gae")(j(REW), values=j(VAL), mask=j(MASK), gamma=gamma, lam=1.0)
  close(one, (ref_returns(REW, LEN, gamma) - VAL) * MASK)
  zero = advantages.get("gae")(j(REW), values=j(VAL), mask=j(MASK), gamma=gamma, lam=0.0)
  v_next = np.concatenate([VAL[:, 1:], np.zeros((B, 1))], axis=1) * np.concatenate(
      [MASK[:, 1:], np.zeros((B, 1))], axis=1)
  close(zero, (REW + gamma * v_next - VAL) * MASK)


def test_gae_padding_invariance_jit_and_grads():
  fn = jax.jit(lambda r, v: advantages.get("gae")(r, values=v, mask=j(MASK), gamma=0.9, lam=0.8))
  junk = np.where(MASK > 0, 0.0, 1e3)
  close(fn(j(REW + junk), j(VAL - junk)), fn(j(REW), j(VAL)))
  with jax.enable_x64(True):
    m = jnp.asarray(MASK)
    f = lambda r, v: jnp.sum(jnp.sin(advantages.get("gae")(r, values=v, mask=m, gamma=0.9,
                                                           lam=0.8)))
    check_grads(jax.jit(f), (jnp.asarray(REW), jnp.asarray(VAL)), order=1, modes=("rev",))


def test_reinforce_pp_reference_and_discounted_returns():
  g = ref_returns(REW, LEN, 0.95)
  valid = g[MASK > 0]
  ref = (g - valid.mean()) / (valid.std() + 1e-6) * MASK
  close(advantages.get("reinforce_pp")(j(REW), mask=j(MASK), gamma=0.95), ref)
  close(token.discounted_returns(j(REW), j(MASK), gamma=0.95), g)
  out = advantages.get("reinforce_pp")(jnp.ones((B, T)), mask=j(MASK), gamma=0.0)
  assert np.all(np.asarray(out) == 0)
  with jax.enable_x64(True):
    f = lambda r: jnp.sum(jnp.cos(advantages.get("reinforce_pp")(r, mask=jnp.asarray(MASK))))
    check_grads(jax.jit(f), (jnp.asarray(REW),), order=1, modes=("rev",))


def ref_gigpo(ep, step_r, ids, smask, g, gamma, omega, eps=1e-6):
  n, s = step_r.shape
  lens = smask.sum(1).astype(int)
  ret = ref_returns(step_r, lens, gamma)
  out = np.zeros((n, s))
  for start in range(0, n, g):
    e = ep[start:start + g]
    a_e = (e - e.mean()) / (e.std() + eps)
    buckets = {}
    for i in range(start, start + g):
      for t in range(lens[i]):
        buckets.setdefault(ids[i, t], []).append(ret[i, t])
    for i in range(start, start + g):
      for t in range(lens[i]):
        vals = np.array(buckets[ids[i, t]])
        a_s = (ret[i, t] - vals.mean()) / (vals.std() + eps)
        out[i, t] = a_e[i - start] + omega * a_s
  return out


def test_gigpo_reference_and_degenerate():
  g, n, s = 3, 6, 4
  ep = RNG.normal(size=n)
  step_r = RNG.normal(size=(n, s))
  ids = RNG.integers(0, 3, size=(n, s))
  smask = (np.arange(s)[None] < np.array([4, 3, 2, 4, 1, 3])[:, None]).astype(np.float64)
  out = advantages.get("gigpo")(j(ep), step_rewards=j(step_r), anchor_ids=jnp.asarray(ids),
                                step_mask=j(smask), group_size=g, gamma=0.9, omega=0.5)
  close(out, ref_gigpo(ep, step_r, ids, smask, g, 0.9, 0.5), 1e-4)
  const = advantages.get("gigpo")(jnp.ones(n), step_rewards=jnp.zeros((n, s)),
                                  anchor_ids=jnp.asarray(ids), step_mask=j(smask), group_size=g)
  assert np.all(np.asarray(const) == 0)
  with pytest.raises(ValueError, match="anchor_ids"):
    advantages.get("gigpo")(j(ep), step_rewards=j(step_r), anchor_ids=jnp.asarray(ids[:, :2]),
                            step_mask=j(smask), group_size=g)
  with pytest.raises(ValueError, match="group_size=4 does not divide"):
    advantages.get("gigpo")(j(ep), step_rewards=j(step_r), anchor_ids=jnp.asarray(ids),
                            step_mask=j(smask), group_size=4)


def test_rover_targets_reference():
  r = RNG.normal(size=4)
  vm = RNG.normal(size=(4, 5))
  mask = (np.arange(5)[None] < np.array([5, 3, 2, 1])[:, None]).astype(np.float64)
  rt = np.concatenate([r[:2] - r[:2].mean(), r[2:] - r[2:].mean()])
  ref = np.zeros((4, 5))
  for b in range(4):
    n = int(mask[b].sum())
    for t in range(n):
      ref[b, t] = rt[b] + (0.7 * vm[b, t + 1] if t + 1 < n else 0.0)
  out = advantages.get("rover")(j(r), vocab_mean_log_ratio=j(vm), mask=j(mask), group_size=2,
                                rho=0.7)
  close(out, ref)


def test_gigpo_and_rover_under_jit():
  n, s = 4, 3
  step_r = j(RNG.normal(size=(n, s)))
  ids = jnp.asarray(RNG.integers(0, 2, size=(n, s)))
  sm = jnp.ones((n, s))
  f = lambda e: advantages.get("gigpo")(e, step_rewards=step_r, anchor_ids=ids, step_mask=sm,
                                        group_size=2)
  e = j(RNG.normal(size=n))
  close(jax.jit(f)(e), f(e))
  g = lambda r: advantages.get("rover")(r, vocab_mean_log_ratio=step_r, mask=sm, group_size=2)
  close(jax.jit(g)(e), g(e))


def test_padding_invariance_grads_and_reductions():
  junk = np.where(MASK > 0, 0.0, 1e4)
  rpp = jax.jit(lambda r: advantages.get("reinforce_pp")(r, mask=j(MASK), gamma=0.9))
  close(rpp(j(REW + junk)), np.asarray(rpp(j(REW))), 1e-4)
  close(token.discounted_returns(j(REW + junk), j(MASK), gamma=0.9),
        ref_returns(REW, LEN, 0.9), 1e-4)
  # γ = 0: the return is the immediate reward
  close(token.discounted_returns(j(REW), j(MASK), gamma=0.0), REW * MASK)
  g, n, s = 3, 6, 4
  ep = RNG.normal(size=n)
  step_r = RNG.normal(size=(n, s))
  ids = RNG.integers(0, 3, size=(n, s))
  smask = (np.arange(s)[None] < np.array([4, 3, 2, 4, 1, 3])[:, None]).astype(np.float64)
  sjunk = np.where(smask > 0, 0.0, 1e4)
  gi = jax.jit(lambda e, sr, a: advantages.get("gigpo")(e, step_rewards=sr, anchor_ids=a,
                                                        step_mask=j(smask), group_size=g,
                                                        gamma=0.9, omega=0.5))
  want = ref_gigpo(ep, step_r, ids, smask, g, 0.9, 0.5)
  close(gi(j(ep), j(step_r + sjunk), jnp.asarray(np.where(smask > 0, ids, 7))), want, 1e-4)
  # ω = 0: the episode-level GRPO advantage (population std) on every valid step
  e0 = advantages.get("gigpo")(j(ep), step_rewards=j(step_r), anchor_ids=jnp.asarray(ids),
                               step_mask=j(smask), group_size=g, omega=0.0)
  epa = np.concatenate([(x - x.mean()) / (x.std() + 1e-6) for x in (ep[:3], ep[3:])])
  close(e0, epa[:, None] * smask, 1e-4)
  with jax.enable_x64(True):
    f = lambda e, sr: jnp.sum(jnp.sin(advantages.get("gigpo")(
        e, step_rewards=sr, anchor_ids=jnp.asarray(ids), step_mask=jnp.asarray(smask),
        group_size=g, gamma=0.9, omega=0.5)))
    check_grads(jax.jit(f), (jnp.asarray(ep), jnp.asarray(step_r)), order=1, modes=("rev",))
  # ROVER: padding invariance, ρ = 0 is the group-centred reward, targets carry no gradient
  r = RNG.normal(size=4)
  vm = RNG.normal(size=(4, 5))
  mask = (np.arange(5)[None] < np.array([5, 3, 2, 1])[:, None]).astype(np.float64)
  ro = lambda v, rho=0.7: advantages.get("rover")(j(r), vocab_mean_log_ratio=v, mask=j(mask),
                                                  group_size=2, rho=rho)
  close(ro(j(vm + np.where(mask > 0, 0.0, 1e4))), np.asarray(ro(j(vm))))
  rt = np.concatenate([r[:2] - r[:2].mean(), r[2:] - r[2:].mean()])
  close(ro(j(vm), rho=0.0), rt[:, None] * mask)
  gr = jax.grad(lambda v: jnp.sum(ro(v)))(j(vm))
  assert np.all(np.asarray(gr) == 0)


def test_check_steps_names_the_estimator_and_the_mismatch():
  check_steps = token.check_steps
  r, sr = jnp.zeros(2), jnp.zeros((2, 3))
  check_steps("x", r, sr, step_mask=jnp.ones((2, 3), bool))  # consistent: no error
  with pytest.raises(ValueError, match=r"gigpo: anchor_ids has shape \(2, 2\) but step_rewards "
                     r"has \(2, 3\)"):
    check_steps("gigpo", r, sr, anchor_ids=jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match="turn_returns: step_rewards has 2 rows but rewards has 3"):
    check_steps("turn_returns", jnp.zeros(3), sr)


def _np_pure(r, step, mask, g, t, c):
  """PURE in float64 numpy, turn by turn: min-form weights, return-to-go, RLOO baselines."""
  n, k = step.shape
  ret = np.zeros((n, k))
  for i in range(n):
    valid = [j for j in range(k) if mask[i, j]]
    if not valid:
      continue
    e = np.exp(-step[i, valid] / t - np.max(-step[i, valid] / t))
    wr = dict(zip(valid, e / e.sum() * step[i, valid]))
    for j in valid:
      ret[i, j] = sum(wr[m] for m in valid if m >= j)
  loo = lambda x: np.asarray([(x[(i // g) * g:(i // g + 1) * g].sum() - x[i]) / (g - 1)  # noqa: E731
                              for i in range(n)])
  adv = ret - loo(ret[:, 0])[:, None] + c * (r - loo(r))[:, None]
  return np.where(mask, adv, 0.0)


def test_pure_turn_estimator_reference_and_min_limit():
  rng = np.random.default_rng(7)
  n, k, g = 6, 4, 3
  step = rng.normal(size=(n, k))
  mask = np.ones((n, k), bool)
  mask[1, 2:] = False
  mask[4, 1:] = False
  r = rng.normal(size=n)
  fn = jax.jit(lambda r, s, m: advantages.get("pure")(r, step_rewards=s, step_mask=m,
                                                      group_size=g, temperature=0.5,
                                                      outcome_coef=0.3))
  got = fn(jnp.asarray(r, jnp.float32), jnp.asarray(step, jnp.float32), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), _np_pure(r, step, mask, g, 0.5, 0.3),
                             rtol=1e-5, atol=1e-5)
  # T -> 0 and no outcome: a turn's return is the min of the step rewards from it on, minus
  # the group's leave-one-out mean of the episodes' minima.
  got = advantages.get("pure")(jnp.asarray(r, jnp.float32), step_rewards=jnp.asarray(
      step, jnp.float32), step_mask=jnp.asarray(mask), group_size=g, temperature=1e-4,
                               outcome_coef=0.0)
  mins = np.where(mask, np.asarray([[np.min(step[i, j:][mask[i, j:]]) if mask[i, j] else 0.0
                                     for j in range(k)] for i in range(n)]), 0.0)
  want = _np_pure(np.zeros(n), step, mask, g, 1e-4, 0.0)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-3)
  np.testing.assert_allclose(want[:, 0] + np.asarray(
      [(mins[(i // g) * g:(i // g + 1) * g, 0].sum() - mins[i, 0]) / (g - 1)
       for i in range(n)]), mins[:, 0], atol=1e-3)
