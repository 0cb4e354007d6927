"""Group-relative advantage estimators vs float64 numpy references written from the papers."""

import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax import advantages
from rlhf_jax.advantages import bnpo as bnpo_mod
from rlhf_jax.advantages import outcome

G = 4
P = 3
RNG = np.random.default_rng(0)
R = RNG.normal(size=P * G)
BIN = np.array([1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0], np.float64)
LENS = RNG.integers(3, 20, size=P * G).astype(np.float64)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def groups(r, g=G):
  return [np.asarray(r[i:i + g], np.float64) for i in range(0, len(r), g)]


def ref_grpo(r, eps=1e-6, ddof=1):
  return np.concatenate([(x - x.mean()) / (x.std(ddof=ddof) + eps) for x in groups(r)])


def ref_rloo(r):
  out = []
  for x in groups(r):
    out += [x[i] - np.mean(np.delete(x, i)) for i in range(len(x))]
  return np.array(out)


def test_grpo_and_dr_grpo_match_reference():
  close(advantages.get("grpo")(jnp.asarray(R, jnp.float32), group_size=G), ref_grpo(R))
  close(advantages.get("grpo")(jnp.asarray(R, jnp.float32), group_size=G, unbiased=False),
        ref_grpo(R, ddof=0))
  ref_dr = np.concatenate([x - x.mean() for x in groups(R)])
  close(advantages.get("dr_grpo")(jnp.asarray(R, jnp.float32), group_size=G), ref_dr)
  close(advantages.get("rec")(jnp.asarray(R, jnp.float32), group_size=G), ref_dr)
  close(advantages.get("asymre")(jnp.asarray(R, jnp.float32), group_size=G, shift=0.1),
        ref_dr + 0.1)


def test_dr_grpo_is_grpo_without_std():
  r = jnp.asarray(R, jnp.float32)
  std = np.concatenate([[x.std(ddof=1)] * G for x in groups(R)])
  close(advantages.get("grpo")(r, group_size=G, eps=0.0) * std,
        advantages.get("dr_grpo")(r, group_size=G))


def test_rloo_leave_one_out_and_special_case():
  r = jnp.asarray(R, jnp.float32)
  out = advantages.get("rloo")(r, group_size=G)
  close(out, ref_rloo(R))
  close(out, G / (G - 1) * np.asarray(advantages.get("dr_grpo")(r, group_size=G)))
  with pytest.raises(ValueError, match="group_size"):
    advantages.get("rloo")(r, group_size=1)


def test_reinforce_pp_baseline_remax_opo_gpg():
  r = jnp.asarray(R, jnp.float32)
  a = np.concatenate([x - x.mean() for x in groups(R)])
  close(advantages.get("reinforce_pp_baseline")(r, group_size=G),
        (a - a.mean()) / (a.std() + 1e-6))
  greedy = RNG.normal(size=P)
  close(advantages.get("remax")(r, greedy_rewards=jnp.asarray(greedy, jnp.float32),
                                group_size=G), R - np.repeat(greedy, G))
  ref = []
  for x, l in zip(groups(R), groups(LENS)):
    ref.append(x - np.sum(l * x) / np.sum(l))
  close(advantages.get("opo")(r, lengths=jnp.asarray(LENS), group_size=G), np.concatenate(ref))
  # Equal lengths: OPO is the plain group-mean baseline.
  close(advantages.get("opo")(r, lengths=jnp.ones(P * G), group_size=G), a)
  # GPG: one degenerate group of three -> alpha = 12 / 8.
  rr = R.copy()
  rr[:G] = 2.0
  gp = advantages.get("gpg")(jnp.asarray(rr, jnp.float32), group_size=G)
  aa = np.concatenate([x - x.mean() for x in groups(rr)])
  close(gp, aa * (P * G) / (P * G - G))


def test_gdpo_reference_and_k_check():
  r2 = RNG.normal(size=(P * G, 2))
  w = np.array([1.0, 0.5])
  per = np.stack([ref_grpo(r2[:, k], eps=1e-4) for k in range(2)], axis=1)
  s = per @ w
  ref = (s - s.mean()) / (s.std(ddof=1) + 1e-4)
  close(advantages.get("gdpo")(jnp.asarray(r2, jnp.float32), group_size=G,
                               weights=jnp.asarray(w, jnp.float32)), ref, 1e-4)
  with pytest.raises(ValueError, match="K >= 2"):
    advantages.get("gdpo")(jnp.ones((8, 1)), group_size=4)


def test_outcome_estimators():
  b = jnp.asarray(BIN, jnp.float32)
  close(advantages.get("psr")(b), BIN)
  close(advantages.get("nsr")(b), -(1 - BIN))
  close(advantages.get("w_reinforce")(b), 0.1 * BIN - (1 - BIN))


def ref_passk(r, g, k):
  out = []
  for x in groups(r, g):
    n, c = g, int(x.sum())
    rbar = 1 - math.comb(n - c, k) / math.comb(n, k)
    sig = math.sqrt(rbar * (1 - rbar))
    if sig == 0:
      out += [0.0] * g
      continue
    pos = (1 - rbar) / sig
    neg = (1 - rbar - (math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1))) / sig
    out += [pos if v > 0.5 else neg for v in x]
  return np.array(out)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_passk_reference(k):
  b = jnp.asarray(BIN, jnp.float32)
  close(advantages.get("passk")(b, group_size=G, k=k), ref_passk(BIN, G, k), 1e-4)
  close(outcome.pass_at_k(8.0, 3.0, k=k), 1 - math.comb(5, k) / math.comb(8, k))


def test_passk_k1_is_grpo_population_std():
  b = jnp.asarray(BIN, jnp.float32)
  close(advantages.get("passk")(b, group_size=G, k=1),
        advantages.get("grpo")(b, group_size=G, unbiased=False), 1e-4)
  with pytest.raises(ValueError, match="k must be"):
    advantages.get("passk")(b, group_size=G, k=G + 1)


def ref_beta_pdf(p, a, b):
  if (p == 0 and a > 1) or (p == 1 and b > 1):
    return 0.0
  return math.exp((a - 1) * math.log(p) if a != 1 else 0.0) * \
      math.exp((b - 1) * math.log(1 - p) if b != 1 else 0.0) / \
      (math.gamma(a) * math.gamma(b) / math.gamma(a + b))


def test_bnpo_reference_and_reductions():
  r = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1], np.float64)
  ph = np.array([x.mean() for x in groups(r)])
  mu, var = ph.mean(), ph.var(ddof=1)
  kk = max(mu * (1 - mu) / (var + 1e-8) - 1, 0.0)
  a, b = max(1, 1 + kk * mu / 3), max(1, 1 + kk * (1 - mu) / 3)
  ref = []
  for x, p in zip(groups(r), ph):
    pdf = ref_beta_pdf(p, a, b)
    inv = min(1 / pdf, 1e6) if pdf > 0 else 1e6
    ref += list((x - p) * inv)
  close(advantages.get("bnpo")(jnp.asarray(r, jnp.float32), group_size=G), np.array(ref), 1e-4)
  # alpha = beta = 1 (moments with large variance) is REINFORCE with a group-mean baseline.
  st = bnpo_mod.BetaMoments(mean=jnp.asarray(0.5), var=jnp.asarray(1.0), count=jnp.asarray(1))
  close(advantages.get("bnpo")(jnp.asarray(r, jnp.float32), group_size=G, state=st),
        np.concatenate([x - x.mean() for x in groups(r)]))
  # alpha = beta = 3/2 divides by B(3/2,3/2)^-1 sqrt(p(1-p)).
  assert np.allclose(bnpo_mod.beta_parameters(0.5, 0.25 / 4.0), (1.5, 1.5), atol=1e-5)


def test_bnpo_running_moments_init_update():
  r = jnp.asarray([1, 0, 1, 1, 0, 0, 1, 0], jnp.float32)
  s0 = bnpo_mod.bnpo_init()
  s1 = jax.jit(lambda s, x: bnpo_mod.bnpo_update(s, x, group_size=4, momentum=0.9))(s0, r)
  close(s1.mean, 0.5)
  close(s1.var, 0.125)
  s2 = bnpo_mod.bnpo_update(s1, jnp.ones(8), group_size=4, momentum=0.9)
  close(s2.mean, 0.9 * 0.5 + 0.1 * 1.0)
  close(s2.var, 0.9 * 0.125)
  assert int(s2.count) == 2
  pair = bnpo_mod.bnpo_moments(group_size=4, momentum=0.9)
  s3 = pair.update(pair.update(pair.init(), r), jnp.ones(8))
  close(s3.mean, s2.mean)
  close(s3.var, s2.var)


def test_adora_copo_thr():
  b = BIN[:12]
  lens = np.array([5, 5, 5, 5, 9, 3, 9, 9, 20, 20, 1, 2], np.float64)
  out = advantages.get("adora")(jnp.asarray(b, jnp.float32), lengths=jnp.asarray(lens),
                                group_size=G)
  base = ref_grpo(b)
  # Group 2: max correct length 3 <= mean incorrect 9 -> damped; group 3: 20 > 1 -> kept.
  close(out, np.concatenate([base[:4], 0.1 * base[4:8], base[8:]]))
  ids = np.array([0, 0, 0, 0, 1, 2, 1, 3, 5, 5, 6, 6])
  res = advantages.get("copo")(jnp.asarray(b, jnp.float32), answer_ids=jnp.asarray(ids),
                               group_size=G)
  h = []
  for x in groups(ids):
    cnt = Counter(x.tolist())
    h.append(-sum(c / G * math.log2(c / G) for c in cnt.values()))
  h = np.array(h)
  rg = np.array([x.mean() for x in groups(b)])
  ag = (rg - rg.mean()) / (rg.std() + 1e-6)
  close(res.global_, np.repeat(ag, G))
  close(res.weight, np.repeat(1 / (1 + np.exp(-5 * (h - 1))), G))
  close(res.local, ref_grpo(b))
  adv = RNG.normal(size=(2, 5))
  thr_v = RNG.normal(size=(2, 5))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  ref = np.where(np.abs(thr_v) > 0.3, adv * (1 + 0.2 * np.sign(thr_v)), adv) * mask
  close(advantages.get("thr")(jnp.asarray(adv, jnp.float32),
                              token_hidden_reward=jnp.asarray(thr_v, jnp.float32),
                              mask=jnp.asarray(mask), p=0.2, min_abs=0.3), ref)


ZERO_ON_CONSTANT = {
    "grpo": {}, "dr_grpo": {}, "rec": {}, "rloo": {}, "reinforce_pp_baseline": {},
    "gpg": {}, "bnpo": {}, "passk": {"k": 2},
    "opo": {"lengths": jnp.arange(1.0, 2 * G + 1)},
    "adora": {"lengths": jnp.arange(1.0, 2 * G + 1)},
}


@pytest.mark.parametrize("name", sorted(ZERO_ON_CONSTANT))
def test_constant_group_gives_zero_and_no_nan(name):
  fn = jax.jit(lambda x: advantages.get(name)(x, group_size=G, **ZERO_ON_CONSTANT[name]))
  for value in (0.0, 1.0, 0.3):
    r = jnp.concatenate([jnp.full((G,), value), jnp.asarray([0.0, 1.0, 1.0, 0.0])])
    out = np.asarray(fn(r))
    assert np.all(np.isfinite(out)), out
    assert np.all(out[:G] == 0.0), (value, out)
    assert np.any(out[G:] != 0.0)
    # A batch of only degenerate groups: still zeros, no NaN.
    out2 = np.asarray(fn(jnp.full((2 * G,), value)))
    assert np.all(out2 == 0.0), (value, out2)


def test_constant_group_multi_reward_and_remax():
  r2 = jnp.concatenate([jnp.ones((G, 2)), jnp.asarray(RNG.normal(size=(G, 2)), jnp.float32)])
  out = np.asarray(advantages.get("gdpo")(r2, group_size=G))
  assert np.all(out[:G] == 0) and np.all(np.isfinite(out))
  out = advantages.get("remax")(jnp.ones(2 * G), greedy_rewards=jnp.ones(2), group_size=G)
  assert np.all(np.asarray(out) == 0)


def test_by_design_nonzero_on_constant_groups():
  """NSR / W-REINFORCE / AsymRE / COPO's global term keep a signal on consistent groups."""
  zeros = jnp.zeros(G)
  assert np.all(np.asarray(advantages.get("nsr")(zeros)) == -1.0)
  assert np.all(np.asarray(advantages.get("asymre")(zeros, group_size=G)) == np.float32(0.1))
  res = advantages.get("copo")(jnp.concatenate([zeros, jnp.ones(G)]),
                               answer_ids=jnp.zeros(2 * G, jnp.int32), group_size=G)
  assert np.all(np.asarray(res.local) == 0) and np.all(np.isfinite(np.asarray(res.global_)))


GROUPED = ["grpo", "dr_grpo", "rec", "asymre", "rloo", "reinforce_pp_baseline", "gpg", "bnpo"]


@pytest.mark.parametrize("name", GROUPED + ["passk", "opo", "remax", "adora", "copo"])
def test_group_size_not_dividing_raises(name):
  extra = {"passk": {"k": 1}, "opo": {"lengths": jnp.ones(10)},
           "remax": {"greedy_rewards": jnp.ones(3)}, "adora": {"lengths": jnp.ones(10)},
           "copo": {"answer_ids": jnp.zeros(10, jnp.int32)}}.get(name, {})
  with pytest.raises(ValueError, match="group_size=4 does not divide"):
    advantages.get(name)(jnp.ones(10), group_size=4, **extra)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "opo",
                                  "gpg", "gdpo"])
def test_jit_and_gradients(name):
  extra = {"opo": {"lengths": jnp.asarray(LENS)}}.get(name, {})
  with jax.enable_x64(True):
    shape = (P * G, 2) if name == "gdpo" else (P * G,)
    r = jnp.asarray(RNG.normal(size=shape), jnp.float64)
    fn = lambda x: advantages.get(name)(x, group_size=G, **extra)
    np.testing.assert_allclose(jax.jit(fn)(r), fn(r), rtol=1e-12)
    w = jnp.asarray(RNG.normal(size=P * G))
    check_grads(jax.jit(lambda x: jnp.sum(fn(x) * w)), (r,), order=1, modes=("rev",))


def test_rejects_bad_ranks_and_dtypes():
  with pytest.raises(ValueError, match="rewards must have rank 1"):
    advantages.get("grpo")(jnp.ones((4, 2)), group_size=2)
  with pytest.raises(ValueError, match="floating-point"):
    advantages.get("grpo")(jnp.ones(4, jnp.int32), group_size=2)
  with pytest.raises(ValueError, match="greedy_rewards"):
    advantages.get("remax")(jnp.ones(8), greedy_rewards=jnp.ones(3), group_size=4)
  with pytest.raises(KeyError, match="known"):
    advantages.get("grpoo")


def test_remaining_estimators_run_under_jit():
  r = jnp.asarray(BIN[:8], jnp.float32)
  ids = jnp.asarray([0, 1, 0, 2, 3, 3, 3, 1])
  cases = {
      "copo": lambda x: advantages.get("copo")(x, answer_ids=ids, group_size=G).global_,
      "asymre": lambda x: advantages.get("asymre")(x, group_size=G),
      "nsr": advantages.get("nsr"), "psr": advantages.get("psr"),
      "w_reinforce": advantages.get("w_reinforce"),
      "remax": lambda x: advantages.get("remax")(x, greedy_rewards=x[::G], group_size=G),
      "thr": lambda x: advantages.get("thr")(x, token_hidden_reward=jnp.ones((8, 3)),
                                             mask=jnp.ones((8, 3)), p=0.2),
  }
  for name, fn in cases.items():
    np.testing.assert_allclose(jax.jit(fn)(r), fn(r), rtol=1e-6, err_msg=name)


def test_remaining_gradients_and_helpers():
  """check_grads for the estimators not in test_jit_and_gradients (smooth in the rewards)."""
  with jax.enable_x64(True):
    r = jnp.asarray(RNG.uniform(0.05, 0.45, size=P * G))  # away from the 0.5 threshold
    r = r.at[::2].add(0.5)
    w = jnp.asarray(RNG.normal(size=P * G))
    lens = jnp.asarray(LENS)
    st = bnpo_mod.BetaMoments(mean=jnp.asarray(0.4), var=jnp.asarray(0.01), count=jnp.asarray(1))
    ids = jnp.asarray([0, 0, 1, 2, 0, 1, 2, 3, 0, 0, 0, 1])
    cases = {
        "asymre": lambda x: advantages.get("asymre")(x, group_size=G),
        "rec": lambda x: advantages.get("rec")(x, group_size=G),
        "remax": lambda x: advantages.get("remax")(x, greedy_rewards=x[::G] ** 2, group_size=G),
        # moments fixed by `state` (batch moments are stop-gradient by design)
        "bnpo": lambda x: advantages.get("bnpo")(x, group_size=G, state=st),
        "adora": lambda x: advantages.get("adora")(x, lengths=lens, group_size=G),
        "copo": lambda x: sum(advantages.get("copo")(x, answer_ids=ids, group_size=G,
                                                     entropy_penalty=0.3)[:2]),
        "thr": lambda x: advantages.get("thr")(x, token_hidden_reward=jnp.ones((P * G, 3)),
                                               mask=jnp.ones((P * G, 3)), p=0.2).sum(1),
    }
    for name, fn in cases.items():
      check_grads(jax.jit(lambda x: jnp.sum(fn(x) * w)), (r,), order=1, modes=("rev",))
  # thr: padding invariance and p = 0 identity
  adv, th = RNG.normal(size=(2, 5)), RNG.normal(size=(2, 5))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  f = jax.jit(lambda a, t: advantages.get("thr")(a, token_hidden_reward=t, mask=jnp.asarray(mask),
                                                 p=0.2))
  junk = np.where(mask > 0, 0.0, 1e6)
  close(f(jnp.asarray(adv + junk, jnp.float32), jnp.asarray(th - junk, jnp.float32)),
        np.asarray(f(jnp.asarray(adv, jnp.float32), jnp.asarray(th, jnp.float32))))
  close(advantages.get("thr")(jnp.asarray(adv, jnp.float32), token_hidden_reward=jnp.asarray(th),
                              mask=jnp.asarray(mask), p=0.0), adv * mask)
  # comb_ratio / pass_at_k / beta_parameters against math
  for a, b, k in [(5, 8, 3), (2, 8, 3), (8, 8, 2), (4, 7, 0)]:
    want = math.comb(a, k) / math.comb(b, k)
    close(outcome.comb_ratio(float(a), float(b), k), want, 1e-5)
  close(outcome.pass_at_k(jnp.asarray([8.0, 8.0, 8.0]), jnp.asarray([0.0, 8.0, 1.0]), k=1),
        [0.0, 1.0, 1 / 8])
  for mu, var in [(0.3, 0.01), (0.5, 0.2), (0.9, 0.001)]:
    kk = max(mu * (1 - mu) / (var + 1e-8) - 1, 0.0)
    close(bnpo_mod.beta_parameters(jnp.asarray(mu), jnp.asarray(var)),
          (max(1, 1 + kk * mu / 3), max(1, 1 + kk * (1 - mu) / 3)), 1e-4)
  # gdpo with K equal columns and unit weights is the batch-normalised GRPO advantage
  col = RNG.normal(size=P * G)
  g1 = ref_grpo(col, eps=1e-4) * 2
  close(advantages.get("gdpo")(jnp.asarray(np.stack([col, col], 1), jnp.float32), group_size=G),
        g1 / (g1.std(ddof=1) + 1e-4), 1e-4)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "gpg",
                                  "opo", "adora", "gdpo", "copo", "bnpo"])
def test_constant_group_has_finite_gradient(name):
  """A zero-variance group (or a whole zero-variance batch) gives finite gradients."""
  extra = {"opo": {"lengths": jnp.arange(1.0, 2 * G + 1)},
           "adora": {"lengths": jnp.arange(1.0, 2 * G + 1)},
           "copo": {"answer_ids": jnp.arange(2 * G) % 3}}.get(name, {})

  def fn(x):
    if name == "gdpo":
      return advantages.get(name)(jnp.stack([x, x ** 2], 1), group_size=G)
    out = advantages.get(name)(x, group_size=G, **extra)
    return out.global_ + out.local if name == "copo" else out

  w = jnp.arange(2.0 * G)
  g = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * w)))
  for r in (jnp.concatenate([jnp.ones(G), jnp.asarray([0.2, 0.5, 0.9, 0.1])]), jnp.ones(2 * G)):
    assert np.all(np.isfinite(np.asarray(g(r)))), (name, np.asarray(g(r)))


def test_answer_entropy_reference():
  from rlhf_jax.advantages import reweight
  ids = np.array([0, 0, 0, 0, 1, 2, 1, 3, 5, 6, 7, 8])
  want = []
  for x in groups(ids):
    p = np.array(list(Counter(x.tolist()).values())) / G
    want.append(-(p * np.log2(p)).sum())
  close(jax.jit(lambda a: reweight.answer_entropy(a, group_size=G))(jnp.asarray(ids)), want)
  close(want[2], 2.0)  # G distinct answers: log2 G


def test_masked_normalise_against_float64_reference():
  from rlhf_jax.advantages import base  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 5)).astype(np.float32)
  mask = rng.random((3, 4, 5)) < 0.6
  mask[2] = False  # a group with no valid element gives zeros
  got = np.asarray(base.masked_normalise(jnp.asarray(x), jnp.asarray(mask), (1, 2), eps=1e-6))
  want = np.zeros_like(x, np.float64)
  for i in range(2):
    v = x[i][mask[i]].astype(np.float64)
    want[i][mask[i]] = (v - v.mean()) / (v.std() + 1e-6)  # population std
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(got[~mask] == 0) and np.all(got[2] == 0)
  # axis=None: one statistic over every valid element.
  flat = np.asarray(base.masked_normalise(jnp.asarray(x), jnp.asarray(mask), None, eps=1e-6))
  v = x[mask].astype(np.float64)
  np.testing.assert_allclose(flat[mask], (v - v.mean()) / (v.std() + 1e-6), atol=1e-5)
