"""VPL as a trainable reward model: the head over a batch of users' pairs, the offline step,
the two-user synthetic task and the named errors."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.data.synthetic import PreferenceTask
from rlhf_jax.models import reward_heads
from rlhf_jax.train import offline, offline_config, offline_heads, offline_loop
from test_offline_step import LM, _pref_batch

D, Z, BETA = 6, 3, 0.3
USERS = np.array([0, 1, 0, 2, 1, 0, 3])  # users 2 and 3 have one pair each


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _head_and_features(seed=0):
  head = reward_heads.VPLHead(latent_dim=Z, hidden=8, reward_hidden=(8,))
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  hc = jax.random.normal(k[0], (len(USERS), D))
  hr = jax.random.normal(k[1], (len(USERS), D))
  params = head.init(k[2], hc, hr, jnp.ones((len(USERS),) * 2, bool))["params"]
  return head, params, hc, hr


def _call(c, r, m, v, mask):
  return losses.get("vpl")(c, r, mean=m, log_var=v, mask=mask, kl_coef=BETA)


def _per_user(head, params, hc, hr, rows):
  """The encoder over the user's pairs alone (no mask): mean, log_var [1, Z]."""
  enc = reward_heads.VPLEncoder(Z, 8)
  return enc.apply({"params": params["encoder"]}, hc[rows][None], hr[rows][None])


def _reward(params, h, z):
  return np.asarray(reward_heads.VPLRewardHead((8,)).apply(
      {"params": params["reward"]}, jnp.asarray(h, jnp.float32), jnp.asarray(z, jnp.float32)),
      np.float64)


def test_vpl_objective_matches_a_per_user_reference():
  head, params, hc, hr = _head_and_features()
  rng = jax.random.PRNGKey(7)
  rows, diff = jax.jit(lambda p, a, b, u, key: offline_heads.vpl_batch_loss(
      head, p, a, b, u, key, _call))(params, hc, hr, jnp.asarray(USERS, jnp.float32), rng)
  eps = np.asarray(jax.random.normal(rng, (len(USERS), Z)), np.float64)
  b = len(USERS)
  want, want_diff = 0.0, []
  for i, u in enumerate(USERS):
    own = np.flatnonzero(USERS == u)
    mean, log_var = (np.asarray(x, np.float64)[0] for x in _per_user(head, params, hc, hr, own))
    z = mean + np.exp(0.5 * log_var) * eps[i]
    zz = np.repeat(z[None], len(own), 0)
    margins = _reward(params, hc[own], zz) - _reward(params, hr[own], zz)
    kl = 0.5 * np.sum(mean ** 2 + np.exp(log_var) - log_var - 1.0)
    want += (-np.sum(_log_sigmoid(margins)) + BETA * kl) / (len(own) * b)
    want_diff.append(margins[list(own).index(i)])
  np.testing.assert_allclose(float(jnp.sum(rows)), want, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(diff), want_diff, rtol=2e-5, atol=1e-6)


def test_vpl_evaluation_never_reads_the_pairs_own_label():
  head, params, hc, hr = _head_and_features(1)
  users = jnp.asarray(USERS, jnp.float32)
  ev = jax.jit(lambda a, b: offline_heads.vpl_batch_loss(head, params, a, b, users, None, _call))
  rows, diff = ev(hc, hr)
  assert np.all(np.isfinite(np.asarray(rows)))  # one-pair users: an empty context
  for i in (0, 3):  # a user with three pairs; a user with one
    hc2, hr2 = hc.at[i].set(hr[i]), hr.at[i].set(hc[i])
    _, diff2 = ev(hc2, hr2)
    np.testing.assert_allclose(float(diff2[i]), -float(diff[i]), rtol=1e-5, atol=1e-6)
    others = USERS != USERS[i]
    np.testing.assert_allclose(np.asarray(diff2)[others], np.asarray(diff)[others], rtol=1e-6)
  # ... while a same-user pair's label does move it: the context is read.
  hc3, hr3 = hc.at[2].set(hr[2]), hr.at[2].set(hc[2])
  assert abs(float(ev(hc3, hr3)[1][0]) - float(diff[0])) > 1e-6
  # The held-out pair's z is the posterior mean of the user's other pairs.
  mean, _ = _per_user(head, params, hc, hr, np.array([2, 5]))
  z = np.asarray(mean, np.float64)
  want = _reward(params, hc[:1], z) - _reward(params, hr[:1], z)
  np.testing.assert_allclose(float(diff[0]), want[0], rtol=2e-5, atol=1e-6)


def _vpl_model():
  rm = offline_heads.HeadedRewardModel.from_config(
      LM.with_head("reward"), dict(name="vpl", latent_dim=Z, hidden=8, reward_hidden=(8,)))
  return rm, rm.init(jax.random.PRNGKey(5), LM.with_head("reward").init(jax.random.PRNGKey(2)))


def test_vpl_offline_step_trains_every_part_and_draws_z_per_step():
  import optax
  rm, params = _vpl_model()
  batch = _pref_batch()
  batch["user_id"] = jnp.asarray(np.arange(batch["chosen_ids"].shape[0]) % 2, jnp.float32)
  fn = offline.make_batch_loss("reward_model", rm, losses.get("vpl"), {"kl_coef": 0.1})
  assert fn.stochastic
  g = jax.grad(lambda p: fn(p, None, batch, rng=jax.random.PRNGKey(0))[0])(params)
  for part in (g["backbone"], g["head"]["encoder"], g["head"]["reward"]):
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(part)) > 0
  step = offline.make_step("reward_model", rm, losses.get("vpl"), optax.sgd(0.0),
                           loss_kwargs={"kl_coef": 0.1}, donate=False)
  state = offline.init_state(params, optax.sgd(0.0), rng=jax.random.PRNGKey(3))
  _, m1 = step(state, batch)
  _, m1b = step(state, batch)
  _, m2 = step(state.replace(step=state.step + 1), batch)  # same params, the next step's z
  assert float(m1["loss"]) == float(m1b["loss"])
  assert float(m1["loss"]) != float(m2["loss"])
  assert step._cache_size() == 1  # pylint: disable=protected-access
  metrics = offline.make_eval("reward_model", rm, losses.get("vpl"),
                              loss_kwargs={"kl_coef": 0.1})(state, batch)
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_vpl_named_errors(tmp_path):
  with pytest.raises(ValueError, match="'vpl' loss and the 'vpl' head go together"):
    offline_heads.check_config(dict(name="vpl"), "bt")
  with pytest.raises(ValueError, match="'vpl' loss and the 'vpl' head go together"):
    offline_heads.check_config({}, "vpl")
  offline_heads.check_config(dict(name="vpl"), "vpl")
  for bad in ({"prompt": "a"}, {"user_id": "alice"}, {"user_id": True}):
    with pytest.raises(ValueError, match="integer 'user_id'"):
      offline_heads.check_records(dict(name="vpl"), [{"user_id": 0}, bad], "training")
  offline_heads.check_records({}, [{"prompt": "a"}], "training")  # other heads: not needed
  rm, params = _vpl_model()
  fn = offline.make_batch_loss("reward_model", rm, losses.get("vpl"))
  with pytest.raises(KeyError, match="user_id"):
    fn(params, None, _pref_batch())
  c = offline_config.synthetic_config("reward_model", loss="vpl", arg="fast")
  c.rm_head = dict(name="vpl")
  c.workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="training record 0 has user_id=None"):
    offline_loop.train(c)  # the task has no users
  c.loss = "bt"
  with pytest.raises(ValueError, match="go together"):
    offline_loop.train(c)
  assert not os.path.exists(c.workdir)


def test_preference_task_with_users():
  task = PreferenceTask(user_targets="ab", max_len=6)
  recs = task.generate(200, seed=0)
  users = np.array([r["user_id"] for r in recs])
  assert set(users) == {0, 1}
  for r in recs:
    target = "ab"[r["user_id"]]
    gap = r["chosen"].count(target) - r["rejected"].count(target) - 0.25 * (
        len(r["chosen"]) - len(r["rejected"]))
    assert gap > 0 and np.isclose(gap, r["chosen_reward"] - r["rejected_reward"])
  # The users disagree on some pairs: one reward cannot fit both.
  disagree = [r for r in recs if task.reward(r["chosen"], 1 - r["user_id"])
              < task.reward(r["rejected"], 1 - r["user_id"])]
  assert len(disagree) > 20
  assert "user_id" not in PreferenceTask().generate(4, seed=0)[0]
  with pytest.raises(ValueError, match="user_targets must be distinct letters"):
    PreferenceTask(user_targets="ax")
  with pytest.raises(ValueError, match="user_targets must be distinct letters"):
    PreferenceTask(user_targets="aa")
