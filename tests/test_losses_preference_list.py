"""Listwise/group preference losses, Nash-MD, SPO rewards, RSO sampling, RA-DPO relabelling
vs float64 numpy references written from the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax import losses
from rlhf_jax.losses import preference_online

B, K = 3, 5


def lsig(x):
  return -np.logaddexp(0.0, -x)


def sig(x):
  return np.exp(lsig(x))


def make_list(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  logps = -np.abs(rng.normal(size=(B, K))) * scale
  ref = -np.abs(rng.normal(size=(B, K))) * scale
  lengths = rng.integers(1, 20, size=(B, K)).astype(np.float64)
  mask = np.ones((B, K), bool)
  mask[0, 3:] = False
  mask[1, 1] = False  # a hole in the middle
  rewards = rng.normal(size=(B, K))
  levels = rng.integers(1, 5, size=(B, K))
  return dict(logps=logps, ref=ref, lengths=lengths, mask=mask, rewards=rewards,
              levels=levels, rng=rng)


# ---- numpy references ---------------------------------------------------------------------

def ref_pro(d, T=0.7, w=0.05):
  out = []
  for b in range(B):
    idx = np.flatnonzero(d["mask"][b])
    s = d["logps"][b, idx] / d["lengths"][b, idx]
    loss = 0.0
    for k in range(len(s) - 1):
      loss -= s[k] / T - np.log(np.sum(np.exp(s[k:] / T)))
    out.append(loss - w * s[0])
  return np.array(out)


def ref_grao(d, ry, ly, ryr, beta=0.5, lam=0.6, eps=1e-6):
  out = []
  for b in range(B):
    idx = np.flatnonzero(d["mask"][b])
    j = d["logps"][b, idx] / d["lengths"][b, idx]
    jy = ry[b] / ly[b]
    allr = np.append(d["rewards"][b, idx], ryr[b])
    adv_all = (allr - allr.mean()) / (allr.std() + eps)
    a, ay = adv_all[:-1], adv_all[-1]
    out.append(-np.mean(a * j + beta * ay * jy + lam * a * (j - jy)))
  return np.array(out)


def ref_trpa(d, kl, beta=0.1, c1=2.5, coef=0.001):
  out = []
  for b in range(B):
    idx = np.flatnonzero(d["mask"][b])
    delta = (d["logps"][b, idx] - d["ref"][b, idx]) / d["lengths"][b, idx]
    lev = d["levels"][b, idx]
    terms = [-lsig((c1 if lev[i] == 1 else 1.0) * beta * (delta[i] - delta[j]))
             for i in range(len(idx)) for j in range(len(idx)) if lev[i] < lev[j]]
    out.append((np.mean(terms) if terms else 0.0) + coef * np.mean(kl[b, idx]))
  return np.array(out)


# ---- the three list losses, generic checks -----------------------------------------------

def list_call(name, d, dtype, **ov):
  a = lambda k: jnp.asarray(d[k], dtype)
  if name == "pro":
    return losses.get("pro")(a("logps"), a("lengths"), jnp.asarray(d["mask"]),
                             temperature=0.7, **ov)
  if name == "grao":
    ex = d["grao_extra"]
    return losses.get("grao")(a("logps"), a("lengths"), a("rewards"), jnp.asarray(d["mask"]),
                              ref_answer_logps=jnp.asarray(ex[0], dtype),
                              ref_answer_lengths=jnp.asarray(ex[1], dtype),
                              ref_answer_rewards=jnp.asarray(ex[2], dtype), **ov)
  return losses.get("trpa")(a("logps"), a("ref"), a("lengths"), jnp.asarray(d["levels"]),
                            jnp.asarray(d["mask"]), kl_penalty=a("kl"), **ov)


def full(seed, scale):
  d = make_list(seed, scale)
  rng = d["rng"]
  d["grao_extra"] = (-np.abs(rng.normal(size=B)) * scale, rng.integers(1, 9, size=B) * 1.0,
                     rng.normal(size=B))
  d["kl"] = np.abs(rng.normal(size=(B, K)))
  return d


def list_ref(name, d):
  if name == "pro":
    return ref_pro(d)
  if name == "grao":
    return ref_grao(d, *d["grao_extra"])
  return ref_trpa(d, d["kl"])


LIST = ["pro", "grao", "trpa"]


@pytest.mark.parametrize("name", LIST)
def test_list_reference_extreme_and_padding(name):
  for scale in (1.0, 1000.0):
    d = full(11, scale)
    want = list_ref(name, d)
    with jax.enable_x64(True):
      got = list_call(name, d, jnp.float64)[0]
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
      # padded entries may hold anything
      bad = dict(d)
      for k in ("logps", "ref", "rewards", "kl"):
        bad[k] = np.where(d["mask"], d[k], 1e6)
      bad["levels"] = np.where(d["mask"], d["levels"], 1)
      np.testing.assert_allclose(list_call(name, bad, jnp.float64)[0], want, rtol=1e-9, atol=1e-9)
    got32 = list_call(name, d, jnp.float32)[0]
    assert np.all(np.isfinite(np.asarray(got32)))
    np.testing.assert_allclose(np.asarray(got32, np.float64), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", LIST)
def test_list_grads_jit_vmap(name):
  d = full(12, 2.0)
  with jax.enable_x64(True):
    def f(lp):
      dd = dict(d)
      dd["logps"] = lp
      return jnp.sum(list_call(name, dd, jnp.float64)[0] * jnp.arange(1.0, B + 1))
    check_grads(jax.jit(f), (jnp.asarray(d["logps"]),), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
  ds = [full(s, 2.0) for s in (1, 2)]
  stacked = {k: np.stack([x[k] for x in ds]) for k in ("logps", "ref", "lengths", "mask",
                                                      "rewards", "levels", "kl")}
  stacked["grao_extra"] = tuple(np.stack([x["grao_extra"][i] for x in ds]) for i in range(3))

  def one(lp, ref, ln, m, rw, lv, kl, g0, g1, g2):
    dd = dict(logps=lp, ref=ref, lengths=ln, mask=m, rewards=rw, levels=lv, kl=kl,
              grao_extra=(g0, g1, g2))
    return list_call(name, dd, jnp.float32)[0]

  keys = ("logps", "ref", "lengths", "mask", "rewards", "levels", "kl")
  got = jax.jit(jax.vmap(one))(*[jnp.asarray(stacked[k]) for k in keys],
                               *[jnp.asarray(x, jnp.float32) for x in stacked["grao_extra"]])
  for i in range(2):
    np.testing.assert_allclose(np.asarray(got[i], np.float64), list_ref(name, ds[i]),
                               rtol=1e-4, atol=1e-4)


def test_list_errors_name_argument():
  d = full(0, 1.0)
  with pytest.raises(ValueError, match="mask"):
    losses.get("pro")(jnp.asarray(d["logps"]), jnp.asarray(d["lengths"]),
                      jnp.asarray(d["mask"][:, :2]))
  with pytest.raises(ValueError, match="logps"):
    losses.get("pro")(jnp.asarray(d["logps"][0]), jnp.asarray(d["lengths"]),
                      jnp.asarray(d["mask"]))
  with pytest.raises(ValueError, match="levels"):
    losses.get("trpa")(*[jnp.asarray(d[k], jnp.float32) for k in ("logps", "ref", "lengths")],
                       jnp.asarray(d["levels"], jnp.float32), jnp.asarray(d["mask"]))
  with pytest.raises(ValueError, match="ref_answer"):
    losses.get("grao")(*[jnp.asarray(d[k], jnp.float32) for k in ("logps", "lengths", "rewards")],
                       jnp.asarray(d["mask"]), ref_answer_logps=jnp.zeros(B + 1),
                       ref_answer_lengths=jnp.ones(B + 1), ref_answer_rewards=jnp.zeros(B + 1))


def test_pro_two_items_is_dpo_like_pair():
  """For K = 2 the Plackett–Luce term is −log σ(s_1 − s_2)."""
  with jax.enable_x64(True):
    s = jnp.asarray([[-1.0, -3.0], [-2.0, -0.5]])
    got = losses.get("pro")(s, jnp.ones((2, 2)), jnp.ones((2, 2), bool), sft_weight=0.0)[0]
    np.testing.assert_allclose(got, -lsig(np.array([2.0, -1.5])), rtol=1e-12)


# ---- Nash-MD ------------------------------------------------------------------------------

def test_nash_md_mixture_and_self_play_reduction():
  rng = np.random.default_rng(0)
  lg, rl = rng.normal(size=(2, 2, 4, 7)) * 10

  def lsm(x):
    return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(
        -1, keepdims=True)

  with jax.enable_x64(True):
    mix = preference_online.nash_md_mixture_logits
    want = lsm(0.75 * lsm(lg) + 0.25 * lsm(rl))
    np.testing.assert_allclose(mix(jnp.asarray(lg), jnp.asarray(rl), beta=0.25), want, rtol=1e-10)
    # β = 0: the opponent is the current policy (self-play); β = 1: the reference
    np.testing.assert_allclose(mix(jnp.asarray(lg), jnp.asarray(rl), beta=0.0), lsm(lg),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mix(jnp.asarray(lg), jnp.asarray(rl), beta=1.0), lsm(rl),
                               rtol=1e-10, atol=1e-12)
  out = jax.jit(jax.vmap(lambda a, b: mix(a, b, beta=0.25)))(jnp.asarray(lg, jnp.float32),
                                                               jnp.asarray(rl, jnp.float32))
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-4, atol=1e-4)


def test_nash_md_loss_reference_grads_jit_vmap():
  rng = np.random.default_rng(1)
  lp, rl = -np.abs(rng.normal(size=(2, 6))) * 1000
  p = rng.uniform(size=6)
  tau = 0.1
  want = -(p - 0.5 - tau * (lp - rl)) * lp
  fn = losses.get("nash_md")
  with jax.enable_x64(True):
    got, ex = fn(jnp.asarray(lp), jnp.asarray(rl), jnp.asarray(p), tau=tau)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # gradient = −(P − ½ − τ log π/π_ref) ∇log π (the coefficient is a constant)
    g = jax.grad(lambda x: jnp.sum(fn(x, jnp.asarray(rl), jnp.asarray(p), tau=tau)[0]))(
        jnp.asarray(lp))
    np.testing.assert_allclose(g, -(p - 0.5 - tau * (lp - rl)), rtol=1e-10)
    # τ = 0 (no regulariser): pure self-play win-rate policy gradient
    g0 = jax.grad(lambda x: jnp.sum(fn(x, jnp.asarray(rl), jnp.asarray(p), tau=0.0)[0]))(
        jnp.asarray(lp))
    np.testing.assert_allclose(g0, -(p - 0.5), rtol=1e-12)
    check_grads(lambda x: jnp.sum(fn(x, jnp.asarray(rl), jnp.asarray(p), tau=0.0)[0]),
                (jnp.asarray(lp / 1000),), order=1, modes=("rev",))
  out = jax.jit(jax.vmap(lambda a, b, c: fn(a, b, c, tau=tau)[0]))(
      *[jnp.asarray(np.stack([x, x]), jnp.float32) for x in (lp, rl, p)])
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out[0], np.float64), want, rtol=1e-4)
  with pytest.raises(ValueError, match="preference_probs"):
    fn(jnp.asarray(lp), jnp.asarray(rl), jnp.asarray(p[:3]))


# ---- SPO rewards ---------------------------------------------------------------------------

def test_spo_rewards_reference_padding_jit_vmap():
  rng = np.random.default_rng(3)
  P = rng.uniform(size=(B, K, K))
  mask = make_list(0)["mask"]
  want = np.zeros((B, K))
  for b in range(B):
    idx = np.flatnonzero(mask[b])
    for i in idx:
      others = [j for j in idx if j != i]
      want[b, i] = np.mean(P[b, i, others])
  fn = losses.get("spo_rewards")
  with jax.enable_x64(True):
    np.testing.assert_allclose(fn(jnp.asarray(P), jnp.asarray(mask)), want, rtol=1e-12)
    bad = np.where(mask[:, :, None] & mask[:, None, :], P, 1e9)
    np.testing.assert_allclose(fn(jnp.asarray(bad), jnp.asarray(mask)), want, rtol=1e-12)
    check_grads(lambda x: jnp.sum(fn(x, jnp.asarray(mask)) * jnp.arange(K)), (jnp.asarray(P),),
                order=1, modes=("rev",))
  out = jax.jit(jax.vmap(fn))(jnp.asarray(np.stack([P, P]), jnp.float32),
                              jnp.asarray(np.stack([mask, mask])))
  np.testing.assert_allclose(np.asarray(out[1], np.float64), want, rtol=1e-5)
  with pytest.raises(ValueError, match="preference_matrix"):
    fn(jnp.asarray(P[:, :, :2]), jnp.asarray(mask))


# ---- RSO statistical rejection sampling ----------------------------------------------------

@jax.jit
def _pass_uniforms(rng, p):
  return jax.random.uniform(jax.random.fold_in(rng, p), (8,))


def _uniforms(rng, n, k):
  assert k == 8
  return [_pass_uniforms(rng, p) for p in range(n)]


def ref_rso(rng, rewards, mask, n, beta):
  """The paper's Algorithm 1 (python loop), fed the same per-pass uniforms."""
  remaining = [i for i in range(len(rewards)) if mask[i]]
  accepted = []
  p = 0
  uniforms = np.asarray(_uniforms(rng, n, len(rewards)), np.float64)
  while len(accepted) < n and remaining:
    u = uniforms[p]
    r_max = max(rewards[i] for i in remaining)
    take = []
    for i in remaining:
      if u[i] < np.exp((rewards[i] - r_max) / beta):
        accepted.append(i)
        take.append(i)
        if len(accepted) == n:
          break
    remaining = [i for i in remaining if i not in take]
    p += 1
  return accepted


_RSO = jax.jit(lambda k, r, m, beta: losses.get("rso_sample")(k, r, m, num_samples=4, beta=beta))


def test_rso_sample_matches_algorithm():
  fn = losses.get("rso_sample")
  rewards = np.random.default_rng(4).normal(size=8).astype(np.float32)
  mask = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
  for beta in (0.3, 1e-4, 1e4):
    for seed in range(4):
      rng = jax.random.PRNGKey(seed)
      got = _RSO(rng, jnp.asarray(rewards), jnp.asarray(mask), beta)
      want = ref_rso(rng, rewards.astype(np.float64), mask, 4, beta)
      assert list(np.asarray(got.indices)[np.asarray(got.valid)]) == want, (beta, seed)
    if beta == 1e-4:  # β → 0: greedy, best-first among valid candidates
      order = [i for i in np.argsort(-rewards) if mask[i]][:4]
      assert list(np.asarray(got.indices)) == order
    if beta == 1e4:  # β → ∞: accept everything in order (uniform sampling from π_sft)
      assert list(np.asarray(got.indices)) == list(np.flatnonzero(mask)[:4])
  # fewer valid candidates than requested
  few = _RSO(jax.random.PRNGKey(0), jnp.asarray(rewards), jnp.asarray(np.arange(8) < 2), 0.3)
  assert list(np.asarray(few.valid)) == [True, True, False, False]
  assert sorted(np.asarray(few.indices)[:2].tolist()) == [0, 1]
  with pytest.raises(ValueError, match="num_samples"):
    fn(rng, jnp.asarray(rewards), num_samples=0)
  with pytest.raises(ValueError, match="rewards"):
    fn(rng, jnp.asarray(rewards)[None], num_samples=2)


def test_rso_acceptance_rate_statistics():
  """Acceptance of candidate i in the first pass has probability exp((r_i − r_max)/β)."""
  fn = losses.get("rso_sample")
  rewards = jnp.asarray([0.0, -0.5, -1.0, -2.0])
  keys = jax.random.split(jax.random.PRNGKey(1), 3000)
  # num_samples=1, best candidate last: the first pass walks the candidates in order and
  # stops at the first i with u_i < exp((r_i − r_max)/β) (the last one always passes).
  out = jax.jit(jax.vmap(lambda k: fn(k, rewards[::-1], num_samples=1, beta=1.0)))(keys)
  idx = np.asarray(out.indices[:, 0])
  acc = np.exp(np.asarray(rewards[::-1]))  # exp(r_i − r_max), r_max = 0 is last
  p_first = [acc[0], (1 - acc[0]) * acc[1], (1 - acc[0]) * (1 - acc[1]) * acc[2]]
  p_first.append(1 - sum(p_first))
  np.testing.assert_allclose(np.bincount(idx, minlength=4) / len(keys), p_first, atol=0.03)
  assert np.all(np.asarray(out.valid))


# ---- RA-DPO relabelling --------------------------------------------------------------------

def test_ra_dpo_relabel():
  fn = losses.get("ra_dpo_relabel")
  rc = np.array([0.9, 0.4, 0.7])
  rr = np.array([0.1, 0.3, 0.6])
  out = jax.jit(fn)(jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32))
  np.testing.assert_allclose(out.goal_rewards, np.concatenate([rc, rr]), rtol=1e-6)
  np.testing.assert_array_equal(out.chosen_index, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(out.rejected_index, [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(out.source, [0, 1, 2, 0, 1, 2])
  # applying the relabelling: conditioned on the rejected's score, the rejected is preferred
  pair = np.stack([rc, rr], 1)
  src, ci = np.asarray(out.source), np.asarray(out.chosen_index)
  np.testing.assert_allclose(pair[src, ci], np.asarray(out.goal_rewards), rtol=1e-6)
  vm = jax.vmap(fn)(jnp.ones((2, 3)), jnp.zeros((2, 3)))
  assert vm.goal_rewards.shape == (2, 6)
  with pytest.raises(ValueError, match="rejected_rewards"):
    fn(jnp.asarray(rc), jnp.asarray(rr[:2]))
