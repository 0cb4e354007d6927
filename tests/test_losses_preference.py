"""Pairwise preference losses vs independent float64 numpy references written from the papers."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax import losses
from rlhf_jax.losses import preference_aux

B = 6


def lsig(x):
  """float64 numpy log σ(x)."""
  return -np.logaddexp(0.0, -x)


def sig(x):
  return np.exp(lsig(x))


def make_inputs(seed, scale=1.0):
  """Random pairwise inputs (float64 numpy): summed log-probs ≤ 0, refs, lengths."""
  rng = np.random.default_rng(seed)
  c, r, rc, rr = (-np.abs(rng.normal(size=B)) * scale * rng.uniform(0.2, 1.0, size=B)
                  for _ in range(4))
  lc = rng.integers(1, 30, size=B).astype(np.float64)
  lr = rng.integers(1, 30, size=B).astype(np.float64)
  return dict(c=c, r=r, rc=rc, rr=rr, lc=lc, lr=lr, rng=rng)


def extras_for(name, d):
  """Extra keyword array inputs a method needs ([B] unless stated), float64 numpy."""
  rng = d["rng"]
  if name == "osp":
    return {"preference_strength": rng.uniform(size=B)}
  if name == "bco_pair":
    return {"delta": rng.normal(size=B)}
  if name == "copg":
    return {"chosen_rewards": rng.normal(size=B), "rejected_rewards": rng.normal(size=B)}
  if name == "inpo":
    return {"prev_chosen_logps": d["c"] + rng.normal(size=B),
            "prev_rejected_logps": d["r"] + rng.normal(size=B)}
  if name == "vpo":
    return {"cal_logps": -np.abs(rng.normal(size=B)), "ref_cal_logps": -np.abs(rng.normal(size=B))}
  if name == "power_dl":
    return {"labels": rng.uniform(0.5, 1.0, size=B)}
  return {}


# name -> (hyper-parameters, float64 reference(c, r, rc, rr, lc, lr, **extras)).
def _h(c, r, rc, rr):
  return (c - rc) - (r - rr)


def _log1mexp(x):
  return np.log(-np.expm1(np.minimum(x, -1e-6)))


REFS = {
    "dpo": ({"beta": 0.3}, lambda c, r, rc, rr, lc, lr: -lsig(0.3 * _h(c, r, rc, rr))),
    "cdpo": ({"beta": 0.3, "eps": 0.2}, lambda c, r, rc, rr, lc, lr:
             -0.8 * lsig(0.3 * _h(c, r, rc, rr)) - 0.2 * lsig(-0.3 * _h(c, r, rc, rr))),
    "rdpo": ({"beta": 0.3, "eps": 0.2}, lambda c, r, rc, rr, lc, lr:
             (-0.8 * lsig(0.3 * _h(c, r, rc, rr)) + 0.2 * lsig(-0.3 * _h(c, r, rc, rr))) / 0.6),
    "ipo": ({"beta": 0.2}, lambda c, r, rc, rr, lc, lr:
            ((c - rc) / lc - (r - rr) / lr - 1 / (2 * 0.2)) ** 2),
    "hinge": ({"beta": 0.3}, lambda c, r, rc, rr, lc, lr:
              np.maximum(0.0, 1 - 0.3 * _h(c, r, rc, rr))),
    "simpo": ({"beta": 2.0, "gamma": 0.7}, lambda c, r, rc, rr, lc, lr:
              -lsig(2.0 * c / lc - 2.0 * r / lr - 0.7)),
    "rpo": ({"beta": 0.3, "eta": 0.5}, lambda c, r, rc, rr, lc, lr:
            -lsig(0.3 * _h(c, r, rc, rr)) + 0.5 * (-c / lc)),
    "osp": ({"beta": 0.3}, lambda c, r, rc, rr, lc, lr, preference_strength:
            -(preference_strength * lsig(0.3 * _h(c, r, rc, rr))
              + (1 - preference_strength) * lsig(-0.3 * _h(c, r, rc, rr)))),
    "nca": ({"beta": 0.3}, lambda c, r, rc, rr, lc, lr:
            -lsig(0.3 * (c - rc)) - 0.5 * lsig(-0.3 * (c - rc)) - 0.5 * lsig(-0.3 * (r - rr))),
    "bco_pair": ({"beta": 0.3}, lambda c, r, rc, rr, lc, lr, delta:
                 -lsig(0.3 * (c - rc) - delta) - lsig(delta - 0.3 * (r - rr))),
    "sppo_hard": ({"beta": 0.3}, lambda c, r, rc, rr, lc, lr:
                  ((c - rc) - 0.5 / 0.3) ** 2 + ((r - rr) + 0.5 / 0.3) ** 2),
    "apo_zero": ({"beta": 0.3}, lambda c, r, rc, rr, lc, lr:
                 (1 - sig(0.3 * (c - rc))) + sig(0.3 * (r - rr))),
    "apo_down": ({"beta": 0.3}, lambda c, r, rc, rr, lc, lr:
                 sig(0.3 * (c - rc)) + (1 - sig(0.3 * _h(c, r, rc, rr)))),
    "discopop": ({"beta": 0.1, "tau": 0.05}, lambda c, r, rc, rr, lc, lr:
                 (1 - sig(0.1 * _h(c, r, rc, rr) / 0.05)) * -lsig(0.1 * _h(c, r, rc, rr))
                 + sig(0.1 * _h(c, r, rc, rr) / 0.05) * np.exp(-0.1 * _h(c, r, rc, rr))),
    "exo": ({"beta": 0.3, "eps": 0.01}, lambda c, r, rc, rr, lc, lr:
            sig(0.3 * _h(c, r, rc, rr)) * (lsig(0.3 * _h(c, r, rc, rr)) - np.log(0.99))
            + sig(-0.3 * _h(c, r, rc, rr)) * (lsig(-0.3 * _h(c, r, rc, rr)) - np.log(0.01))),
    "aot": ({"beta": 0.3, "eps": 0.1}, lambda c, r, rc, rr, lc, lr:
            -0.9 * lsig(0.3 * (np.sort(c - rc) - np.sort(r - rr)))
            - 0.1 * lsig(-0.3 * (np.sort(c - rc) - np.sort(r - rr)))),
    "orpo": ({"lam": 0.2}, lambda c, r, rc, rr, lc, lr:
             -c / lc - 0.2 * lsig((c / lc - _log1mexp(c / lc)) - (r / lr - _log1mexp(r / lr)))),
    "cpl": ({"alpha": 0.1, "lam": 0.5}, lambda c, r, rc, rr, lc, lr:
            np.logaddexp(0.0, -(0.1 * c - 0.5 * 0.1 * r))),
    "vpo": ({"beta": 0.3, "alpha": 0.2, "online": True}, lambda c, r, rc, rr, lc, lr, cal_logps,
            ref_cal_logps: -lsig(0.3 * _h(c, r, rc, rr)) + 0.2 * 0.3 * (cal_logps - ref_cal_logps)),
    "copg": ({"beta": 0.06}, lambda c, r, rc, rr, lc, lr, chosen_rewards, rejected_rewards:
             -((chosen_rewards - rejected_rewards) * _h(c, r, rc, rr)
               - 0.03 * _h(c, r, rc, rr) ** 2)),
    "dno": ({"eta": 0.4}, lambda c, r, rc, rr, lc, lr: -lsig(0.4 * c - 0.4 * rc - 0.4 * r + 0.4 * rr)),
    "inpo": ({"eta": 0.3, "tau": 0.1}, lambda c, r, rc, rr, lc, lr, prev_chosen_logps,
             prev_rejected_logps: ((c - r) - (0.1 / 0.3) * (rc - rr)
                                   - (0.2 / 0.3) * (prev_chosen_logps - prev_rejected_logps)
                                   - 1 / 0.6) ** 2),
    "power_dl": ({"beta": 2.0, "eta": 0.3}, lambda c, r, rc, rr, lc, lr, labels:
                 -(labels * lsig(2 * c / lc - 2 * r / lr)
                   + (1 - labels) * lsig(2 * r / lr - 2 * c / lc)) - 0.3 * 2 * c / lc),
}
NAMES = sorted(REFS)


def call(name, d, dtype=jnp.float64, **override):
  hp, _ = REFS[name]
  kw = {**hp, **{k: jnp.asarray(v, dtype) for k, v in extras_for(name, d).items()}, **override}
  args = [jnp.asarray(d[k], dtype) for k in ("c", "r", "rc", "rr", "lc", "lr")]
  return losses.get(name)(*args, **kw)


def reference(name, d):
  hp, ref = REFS[name]
  ex = extras_for(name, d)
  return ref(d["c"], d["r"], d["rc"], d["rr"], d["lc"], d["lr"], **ex)


@pytest.mark.parametrize("scale", [1.0, 1000.0])
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, scale):
  seed = zlib.crc32(name.encode()) % 1000  # stable across runs (str hash is salted)
  d = make_inputs(seed, scale)
  want = reference(name, make_inputs(seed, scale))
  assert np.all(np.isfinite(want)), name
  with jax.enable_x64(True):
    got, extras = call(name, d)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-9)
  assert got.shape == (B,)
  for e in extras:
    assert np.all(np.isfinite(np.asarray(e)))


@pytest.mark.parametrize("name", NAMES)
def test_float32_extreme_finite_and_close(name):
  d = make_inputs(7, 1000.0)
  want = reference(name, make_inputs(7, 1000.0))
  got, _ = call(name, d, jnp.float32)
  assert got.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(got))), name
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_grads(name):
  d = make_inputs(3, 2.0)
  hp, _ = REFS[name]
  with jax.enable_x64(True):
    ex = {k: jnp.asarray(v) for k, v in extras_for(name, d).items()}
    lc, lr = jnp.asarray(d["lc"]), jnp.asarray(d["lr"])
    fn = losses.get(name)
    w = jnp.linspace(0.5, 1.5, B)
    c, r, rc, rr = (jnp.asarray(d[k]) for k in ("c", "r", "rc", "rr"))
    if name == "dno":  # the previous iterate π_t is a constant (stop-gradient)
      check_grads(jax.jit(lambda c, r: jnp.sum(w * fn(c, r, rc, rr, lc, lr, **hp, **ex)[0])),
                  (c, r), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
      return
    check_grads(jax.jit(lambda c, r, rc, rr: jnp.sum(w * fn(c, r, rc, rr, lc, lr, **hp, **ex)[0])),
                (c, r, rc, rr), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_vmap(name):
  hp, _ = REFS[name]
  ds = [make_inputs(s, 5.0) for s in range(3)]
  fn = losses.get(name)

  def f(c, r, rc, rr, lc, lr, ex):
    return fn(c, r, rc, rr, lc, lr, **hp, **ex)[0]

  stack = lambda k: jnp.asarray(np.stack([d[k] for d in ds]), jnp.float32)
  args = [stack(k) for k in ("c", "r", "rc", "rr", "lc", "lr")]
  ex = {k: jnp.asarray(np.stack([extras_for(name, make_inputs(s, 5.0))[k] for s in range(3)]),
                       jnp.float32) for k in extras_for(name, ds[0])}
  got = jax.jit(jax.vmap(f))(*args, ex)
  for i in range(3):
    row = f(*[a[i] for a in args], {k: v[i] for k, v in ex.items()})
    np.testing.assert_allclose(np.asarray(got[i]), np.asarray(row), rtol=1e-5, atol=1e-5)
  if name != "aot":  # per-example vmap over B (scalars inside); AOT couples the batch
    per = jax.vmap(f)(*[a[0] for a in args], {k: v[0] for k, v in ex.items()})
    np.testing.assert_allclose(np.asarray(per), np.asarray(got[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_name_the_argument(name):
  d = make_inputs(0)
  hp, _ = REFS[name]
  fn = losses.get(name)
  ex = {k: jnp.asarray(v, jnp.float32) for k, v in extras_for(name, d).items()}
  c, r, rc, rr, lc, lr = (jnp.asarray(d[k], jnp.float32) for k in ("c", "r", "rc", "rr", "lc", "lr"))
  with pytest.raises(ValueError, match="chosen_logps"):
    fn(c[:, None], r, rc, rr, lc, lr, **hp, **ex)
  with pytest.raises(ValueError, match="rejected_logps"):
    fn(c, r[:-1], rc, rr, lc, lr, **hp, **ex)
  with pytest.raises(ValueError, match="chosen_logps"):
    fn(c.astype(jnp.int32), r, rc, rr, lc, lr, **hp, **ex)


def test_missing_inputs_are_clear():
  d = make_inputs(0)
  c, r, rc, rr, lc, lr = (jnp.asarray(d[k], jnp.float32) for k in ("c", "r", "rc", "rr", "lc", "lr"))
  with pytest.raises(ValueError, match="chosen_lengths"):
    losses.get("rpo")(c, r, rc, rr)
  with pytest.raises(ValueError, match="ref_chosen_logps"):
    losses.get("sppo_hard")(c, r)
  with pytest.raises(ValueError, match="ref_rejected_logps"):
    losses.get("dpo")(c, r, rc)
  with pytest.raises(ValueError, match="eps"):
    losses.get("rdpo")(c, r, rc, rr, eps=0.5)
  with pytest.raises(ValueError, match="cal_logps"):
    losses.get("vpo")(c, r, rc, rr, online=True)


def test_rdpo_eps_may_be_traced():
  # A traced flip rate (e.g. scheduled inside a jitted step) is not range-checked in Python.
  d = make_inputs(0)
  c, r, rc, rr = (jnp.asarray(d[k], jnp.float32) for k in ("c", "r", "rc", "rr"))
  f = jax.jit(lambda e: losses.get("rdpo")(c, r, rc, rr, beta=0.3, eps=e)[0])
  np.testing.assert_allclose(f(0.2), losses.get("rdpo")(c, r, rc, rr, beta=0.3, eps=0.2)[0],
                             rtol=1e-6)


BETA_CHECKED = ("dpo", "cdpo", "rdpo", "ipo", "hinge", "nca", "bco_pair", "sppo_hard",
                "apo_zero", "apo_down", "discopop", "exo", "simpo", "rpo", "aot")


@pytest.mark.parametrize("name", BETA_CHECKED)
def test_non_positive_beta_is_named_and_a_traced_beta_passes(name):
  d = make_inputs(0)
  c, r, rc, rr, lc, lr = (jnp.asarray(d[k], jnp.float32) for k in ("c", "r", "rc", "rr", "lc",
                                                                  "lr"))
  fn = losses.get(name)
  for bad in (0.0, -0.1):
    with pytest.raises(ValueError, match=rf"{name}: beta must be > 0 .*got {bad}"):
      fn(c, r, rc, rr, lc, lr, beta=bad)
  traced = jax.jit(lambda b: fn(c, r, rc, rr, lc, lr, beta=b)[0])(0.3)
  np.testing.assert_allclose(traced, fn(c, r, rc, rr, lc, lr, beta=0.3)[0], rtol=1e-5)


# ---- special-case reductions -------------------------------------------------------------

def _args(seed=1, scale=20.0):
  d = make_inputs(seed, scale)
  return d, [jnp.asarray(d[k]) for k in ("c", "r", "rc", "rr", "lc", "lr")]


def test_cdpo_rdpo_rpo_reduce_to_dpo():
  with jax.enable_x64(True):
    _, a = _args()
    base = losses.get("dpo")(*a, beta=0.2)[0]
    for name, kw in (("cdpo", {"eps": 0.0}), ("rdpo", {"eps": 0.0}), ("rpo", {"eta": 0.0}),
                     ("osp", {"preference_strength": jnp.ones(B)})):
      np.testing.assert_allclose(losses.get(name)(*a, beta=0.2, **kw)[0], base, rtol=1e-12)
    # η = 0 needs no lengths (the NLL term is absent)
    np.testing.assert_allclose(losses.get("rpo")(*a[:4], beta=0.2, eta=0.0)[0], base, rtol=1e-12)
    # and they genuinely differ otherwise
    assert not np.allclose(losses.get("rdpo")(*a, beta=0.2, eps=0.1)[0], base)


def test_simpo_gamma0_unnormalised_is_reference_free_dpo():
  with jax.enable_x64(True):
    _, (c, r, rc, rr, lc, lr) = _args()
    got = losses.get("simpo")(c, r, beta=0.7, gamma=0.0)[0]
    np.testing.assert_allclose(got, losses.get("dpo")(c, r, beta=0.7)[0], rtol=1e-12)
    np.testing.assert_allclose(got, -lsig(0.7 * (np.asarray(c) - np.asarray(r))), rtol=1e-12)


def test_copg_on_pairs_is_scaled_ipo():
  """CoPG with R(y) = −R(y′) = 1/4 equals (β/2)·IPO(τ=β) − 1/(8β) (Flet-Berliac et al.)."""
  with jax.enable_x64(True):
    _, (c, r, rc, rr, lc, lr) = _args(scale=3.0)
    beta = 0.3
    cp = losses.get("copg")(c, r, rc, rr, chosen_rewards=jnp.full(B, 0.25),
                            rejected_rewards=jnp.full(B, -0.25), beta=beta)[0]
    ip = losses.get("ipo")(c, r, rc, rr, beta=beta)[0]
    np.testing.assert_allclose(cp, 0.5 * beta * ip - 1 / (8 * beta), rtol=1e-10, atol=1e-10)


def test_dno_is_dpo_with_previous_iterate_reference():
  with jax.enable_x64(True):
    _, a = _args()
    np.testing.assert_allclose(losses.get("dno")(*a, eta=0.3)[0],
                               losses.get("dpo")(*a, beta=0.3)[0], rtol=1e-12)


def test_inpo_tau_eta_uses_only_reference_and_is_ipo():
  """τ = η drops the π_t term: INPO becomes IPO (sequence form) with τ_IPO = η."""
  with jax.enable_x64(True):
    _, (c, r, rc, rr, lc, lr) = _args(scale=3.0)
    got = losses.get("inpo")(c, r, rc, rr, prev_chosen_logps=c * 0 + 5.0,
                             prev_rejected_logps=r * 0 - 2.0, eta=0.4, tau=0.4)[0]
    np.testing.assert_allclose(got, losses.get("ipo")(c, r, rc, rr, beta=0.4)[0], rtol=1e-12)


def test_vpo_offline_uses_chosen_with_pessimistic_sign():
  with jax.enable_x64(True):
    d, a = _args(scale=3.0)
    got = losses.get("vpo")(*a, beta=0.3, alpha=0.5)[0]
    want = -lsig(0.3 * _h(d["c"], d["r"], d["rc"], d["rr"])) - 0.5 * 0.3 * (d["c"] - d["rc"])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_extras_are_implicit_rewards():
  with jax.enable_x64(True):
    d, a = _args(scale=3.0)
    _, ex = losses.get("dpo")(*a, beta=0.5)
    np.testing.assert_allclose(ex.chosen_rewards, 0.5 * (d["c"] - d["rc"]))
    np.testing.assert_allclose(ex.margins, ex.chosen_rewards - ex.rejected_rewards)
    np.testing.assert_array_equal(ex.accuracies, (ex.margins > 0).astype(float))


def test_kto_reference_grads_jit_vmap():
  rng = np.random.default_rng(5)
  lp, rl = -np.abs(rng.normal(size=(2, B))) * 300
  des = np.array([True, False] * (B // 2))
  z = 0.7

  def ref(lp, rl):
    rr = lp - rl
    return np.where(des, 1.3 * (1 - sig(0.2 * (rr - z))), 0.6 * (1 - sig(0.2 * (z - rr))))

  kto = losses.get("kto")
  kw = dict(reference_point=z, beta=0.2, desirable_weight=1.3, undesirable_weight=0.6)
  with jax.enable_x64(True):
    got = kto(jnp.asarray(lp), jnp.asarray(rl), jnp.asarray(des), **kw)[0]
    np.testing.assert_allclose(got, ref(lp, rl), rtol=1e-10, atol=1e-12)
    check_grads(lambda a, b: jnp.sum(kto(a, b, jnp.asarray(des), **kw)[0]),
                (jnp.asarray(lp / 300), jnp.asarray(rl / 300)), order=1, modes=("rev",))
  f = jax.jit(jax.vmap(lambda a, b, m: kto(a, b, m, **kw)[0]))
  out = f(jnp.asarray(np.stack([lp, lp]), jnp.float32), jnp.asarray(np.stack([rl, rl]), jnp.float32),
          jnp.asarray(np.stack([des, des])))
  np.testing.assert_allclose(np.asarray(out[1], np.float64), ref(lp, rl), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="desirable"):
    kto(jnp.asarray(lp), jnp.asarray(rl), jnp.asarray(des[:-1]), **kw)


def test_sspo_reference_grads_and_mask():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    d, a = _args(scale=3.0)
  logits = rng.normal(size=(B, 3, 4)) * 5
  labels = rng.integers(0, 4, size=(B, 3))
  mask = np.array([[1, 1, 0]] * B, bool)
  lp = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
  ce = -np.take_along_axis(lp, labels[..., None], -1)[..., 0]
  want = -lsig(0.2 * _h(d["c"], d["r"], d["rc"], d["rr"])) + 0.3 * ce[:, :2].mean(1)
  fn = losses.get("sspo")
  with jax.enable_x64(True):
    kw = dict(degree_labels=jnp.asarray(labels), degree_mask=jnp.asarray(mask), beta=0.2,
              weight=0.3)
    got = fn(*a, degree_logits=jnp.asarray(logits), **kw)[0]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    garbage = logits.copy()
    garbage[:, 2] = 1e4
    np.testing.assert_allclose(fn(*a, degree_logits=jnp.asarray(garbage), **kw)[0], want,
                               rtol=1e-10)
    check_grads(jax.jit(lambda l, c: jnp.sum(fn(c, *a[1:], degree_logits=l, **kw)[0])),
                (jnp.asarray(logits), a[0]), order=1, modes=("rev",))
  out = jax.jit(jax.vmap(lambda l: fn(*[x.astype(jnp.float32) for x in a],
                                      degree_logits=l, **kw)[0]))(
      jnp.asarray(np.stack([logits] * 2), jnp.float32))
  np.testing.assert_allclose(np.asarray(out[0], np.float64), want, rtol=1e-4)
  with jax.enable_x64(True), pytest.raises(ValueError, match="degree_labels"):
    fn(*a, degree_logits=jnp.asarray(logits), degree_labels=jnp.asarray(labels, jnp.float32))


def test_treg_reference_grads_and_padding():
  rng = np.random.default_rng(4)
  T = 5
  with jax.enable_x64(True):
    d, a = _args(scale=3.0)
  tl = {s: -np.abs(rng.normal(size=(B, T))) for s in ("c", "r")}
  better, worse = rng.normal(size=(2, B, T))
  mask = np.arange(T)[None, :] < rng.integers(1, T + 1, size=(B, 1))
  rhat = np.where(mask, sig(better - worse) - 0.5, 0.0)
  beta, alpha = 0.2, 0.5
  w = sig(beta * ((d["r"] - d["rr"]) - (d["c"] - d["rc"])))
  reg = -beta * np.sum(np.where(mask, rhat * tl["c"], 0), 1) - beta * np.sum(
      np.where(mask, rhat * tl["r"], 0), 1)
  want = -lsig(beta * _h(d["c"], d["r"], d["rc"], d["rr"])) + alpha * w * reg
  fn = losses.get("treg")
  with jax.enable_x64(True):
    rh = preference_aux.treg_token_rewards(jnp.asarray(better), jnp.asarray(worse),
                                           jnp.asarray(mask))
    np.testing.assert_allclose(rh, rhat, rtol=1e-12, atol=1e-12)

    def f(tc, tr, *pair):
      return fn(*pair, chosen_token_logps=tc, rejected_token_logps=tr,
                chosen_token_rewards=rh, rejected_token_rewards=rh,
                chosen_mask=jnp.asarray(mask), rejected_mask=jnp.asarray(mask),
                beta=beta, alpha=alpha)[0]

    np.testing.assert_allclose(f(jnp.asarray(tl["c"]), jnp.asarray(tl["r"]), *a), want,
                               rtol=1e-10)
    pad = np.where(mask, tl["c"], -1e6)
    np.testing.assert_allclose(f(jnp.asarray(pad), jnp.asarray(tl["r"]), *a), want, rtol=1e-10)
    # the weight w is stop-gradient, so check the token-level inputs (the DPO part is
    # checked in test_grads[dpo])
    check_grads(jax.jit(lambda x, y: jnp.sum(f(x, y, *a))),
                (jnp.asarray(tl["c"]), jnp.asarray(tl["r"])), order=1, modes=("rev",))
    out = jax.jit(jax.vmap(f))(*[jnp.stack([jnp.asarray(x)] * 2)
                                 for x in (tl["c"], tl["r"], *a)])
    np.testing.assert_allclose(out[1], want, rtol=1e-10)


def test_power_dl_label_update_and_cpl_discounting():
  with jax.enable_x64(True):
    l = jnp.asarray([1.0, 0.5]); m = jnp.asarray([2.0, -1.0])
    np.testing.assert_allclose(preference_aux.power_dl_update_labels(l, m, gamma=0.2),
                               0.8 * np.asarray(l) + 0.2 * sig(np.asarray(m)))
    tok = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    got = preference_aux.discounted_logp_sum(jnp.asarray(tok), jnp.asarray(mask), gamma=0.9)
    np.testing.assert_allclose(got, [-1 - 1.8 - 3 * 0.81, -0.5 - 0.45])


def test_cpl_discounted_token_inputs_reference():
  """CPL with γ: A± = α Σ_t γ^t log π(a_t) over each segment's tokens, float64 loops."""
  rng = np.random.default_rng(7)
  tc, tr = -rng.uniform(0.1, 3.0, size=(2, 4, 6))
  mc = np.arange(6)[None, :] < np.array([6, 3, 1, 4])[:, None]
  mr = np.arange(6)[None, :] < np.array([2, 6, 5, 1])[:, None]
  alpha, lam, gamma = 0.3, 0.6, 0.8

  def seg(tok, mask):
    return np.array([sum(gamma ** t * tok[b, t] for t in range(tok.shape[1]) if mask[b, t])
                     for b in range(tok.shape[0])])
  ap, am = alpha * seg(tc, mc), alpha * seg(tr, mr)
  want = np.log1p(np.exp(-(ap - lam * am)))
  fn = losses.get("cpl")
  assert "gamma" in losses.declaration("cpl").hyperparameter_names
  assert "chosen_mask" not in losses.declaration("cpl").hyperparameter_names
  with jax.enable_x64(True):
    j = lambda x: jnp.asarray(x)  # noqa: E731
    f = jax.jit(lambda c, r: fn(c, r, chosen_mask=j(mc), rejected_mask=j(mr), alpha=alpha,
                                lam=lam, gamma=gamma))
    loss, ex = f(j(tc), j(tr))
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    np.testing.assert_allclose(ex.chosen_rewards, ap, rtol=1e-12)
    # Padding is ignored; γ = 1 on tokens equals the summed-log-prob form (the default).
    pad = np.where(mc, tc, -1e6)
    np.testing.assert_allclose(f(j(pad), j(tr))[0], want, rtol=1e-12)
    one = fn(j(tc), j(tr), chosen_mask=j(mc), rejected_mask=j(mr), alpha=alpha, lam=lam)[0]
    summed = fn(j((tc * mc).sum(1)), j((tr * mr).sum(1)), alpha=alpha, lam=lam)[0]
    np.testing.assert_allclose(one, summed, rtol=1e-12)
    assert np.abs(np.asarray(one) - want).max() > 1e-3  # γ matters here
    check_grads(lambda c, r: jnp.sum(f(c, r)[0]), (j(tc), j(tr)), order=1, modes=("rev",))
  with pytest.raises(ValueError, match="gamma=0.9 discounts per token"):
    fn(jnp.zeros(3), jnp.zeros(3), gamma=0.9)
  with pytest.raises(ValueError, match="need chosen_mask and rejected_mask"):
    fn(jnp.zeros((3, 2)), jnp.zeros((3, 2)), gamma=0.9)
  with pytest.raises(ValueError, match="gamma must be in"):
    fn(jnp.zeros(3), jnp.zeros(3), gamma=1.5)


def test_every_name_registered():
  want = ("dpo cdpo rdpo ipo hinge simpo orpo kto rpo vpo cpl pro copg dno inpo "
          "nash_md sspo osp treg grao trpa power_dl nca bco_pair "
          "sppo_hard apo_zero apo_down discopop exo aot").split()
  helpers = ["rso_sample", "spo_rewards", "ra_dpo_relabel"]  # sampling / relabelling, not losses
  have = set(losses.names())
  assert not [n for n in want + helpers if n not in have]
  assert set(want) <= set(losses.names("preference"))
  assert set(helpers) == set(losses.names("preference_data"))


def test_helpers_jit_and_vmap():
  tok = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)), jnp.float32)
  mask = jnp.ones((2, 3, 4), bool)
  f = jax.jit(jax.vmap(lambda t, m: preference_aux.discounted_logp_sum(t, m, gamma=0.5)))
  np.testing.assert_allclose(f(tok, mask)[1], np.sum(np.asarray(tok[1]) * 0.5 ** np.arange(4), 1),
                             rtol=1e-5)
  g = jax.jit(jax.vmap(lambda a, b, m: preference_aux.treg_token_rewards(a, b, m)))
  np.testing.assert_allclose(g(tok, -tok, mask)[0], sig(2 * np.asarray(tok[0], np.float64)) - 0.5,
                             rtol=1e-5, atol=1e-6)
  h = jax.jit(jax.vmap(lambda l, m: preference_aux.power_dl_update_labels(l, m, gamma=0.5)))
  np.testing.assert_allclose(h(jnp.ones((2, 3)), jnp.zeros((2, 3))), 0.75 * np.ones((2, 3)))


def test_reference_free_reductions():
  """CPL (λ=1), POWER-DL (l=1, η=0) and ORPO (λ=0) reduce to simpler losses."""
  with jax.enable_x64(True):
    d, (c, r, rc, rr, lc, lr) = _args(scale=3.0)
    # CPL with λ = 1 is reference-free DPO with β = α
    np.testing.assert_allclose(losses.get("cpl")(c, r, alpha=0.4, lam=1.0)[0],
                               losses.get("dpo")(c, r, beta=0.4)[0], rtol=1e-12)
    # POWER-DL with hard labels and η = 0 is SimPO with γ = 0
    np.testing.assert_allclose(
        losses.get("power_dl")(c, r, rc, rr, lc, lr, beta=2.0, eta=0.0)[0],
        losses.get("simpo")(c, r, rc, rr, lc, lr, beta=2.0, gamma=0.0)[0], rtol=1e-12)
    # ORPO with λ = 0 is the token-mean NLL of the chosen response
    np.testing.assert_allclose(losses.get("orpo")(c, r, rc, rr, lc, lr, lam=0.0)[0],
                               -d["c"] / d["lc"], rtol=1e-12)
    # hinge is 0 once the margin passes 1/β; IPO is 0 exactly at h = 1/(2β)
    big = jnp.asarray(d["c"]) + 100.0
    assert np.all(np.asarray(losses.get("hinge")(big, r, rc, rr, beta=0.3)[0]) == 0)
    h0 = jnp.asarray(d["rc"] - d["rr"] + d["r"]) + 0.5 / 0.2
    np.testing.assert_allclose(losses.get("ipo")(h0, r, rc, rr, beta=0.2)[0], 0.0, atol=1e-20)


def test_discounted_logp_sum_padding_and_grads():
  rng = np.random.default_rng(9)
  tok = -np.abs(rng.normal(size=(3, 5)))
  mask = np.arange(5)[None] < np.array([[5], [2], [1]])
  want = np.sum(np.where(mask, tok * 0.8 ** np.arange(5), 0.0), 1)
  with jax.enable_x64(True):
    f = jax.jit(lambda t: preference_aux.discounted_logp_sum(t, jnp.asarray(mask), gamma=0.8))
    np.testing.assert_allclose(f(jnp.asarray(np.where(mask, tok, -1e9))), want, rtol=1e-12)
    check_grads(f, (jnp.asarray(tok),), order=1, modes=("rev",))
