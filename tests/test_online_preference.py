"""Online preference optimisation in the fused step (`rl.objective='preference'`): the pairs
phase against numpy, the objective against a float64 DPO reference, micro-batch
invariance, one compilation, DNO / INPO iterates, and the named config errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.train import online, phases, preference_step
from rlhf_jax.train.rl_config import RLSettings
from test_online import prompts, setup


def _even_fraction(prompt_ids, completion_ids, completion_mask, extras):
  """A graded reward: the fraction of even completion tokens (varies within groups)."""
  m = completion_mask.astype(jnp.float32)
  return jnp.sum((completion_ids % 2 == 0) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def _settings(**rl):
  return RLSettings.from_config(dict(dict(group_size=4, objective="preference"), **rl))


# ----------------------------------------------------------------------------- pairs phase


def _np_pairs(r, mode):
  out = []
  for row in r:
    if mode == "best_worst":
      hi, lo = int(np.argmax(row)), int(np.argmin(row))
      out.append([(hi, lo, float(row[hi] > row[lo]))])
    else:
      ps = []
      for i, j in itertools.combinations(range(len(row)), 2):
        hi, lo = (i, j) if row[i] >= row[j] else (j, i)
        ps.append((hi, lo, float(row[i] != row[j])))
      out.append(ps)
  return np.asarray(out)


@pytest.mark.parametrize("mode", ["best_worst", "all_pairs"])
def test_group_pairs_match_numpy(mode):
  r = np.asarray([[0.1, 0.9, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0], [0.0, -1.0, 2.0, 0.5]],
                 np.float32)
  p = preference_step.group_pairs(jnp.asarray(r), mode=mode)
  ref = _np_pairs(r, mode)
  assert p.chosen.shape == (3, preference_step.num_pairs(4, mode))
  np.testing.assert_array_equal(np.asarray(p.chosen), ref[..., 0])
  np.testing.assert_array_equal(np.asarray(p.rejected), ref[..., 1])
  np.testing.assert_array_equal(np.asarray(p.weight), ref[..., 2])
  assert float(np.sum(np.asarray(p.weight)[1])) == 0.0  # all-equal group: no preference


def test_rso_pairs_are_ordered_distinct_and_follow_the_tilted_distribution():
  r = jnp.asarray([[0.0, 1.0, 2.0, 3.0]] * 2000)
  p = preference_step.group_pairs(r, mode="rso", rng=jax.random.PRNGKey(0), rso_beta=1.0)
  c, j, w = (np.asarray(x)[:, 0] for x in p)
  assert np.all(c != j) and np.all(w == 1.0)
  rn = np.asarray(r)[0]
  assert np.all(rn[c] > rn[j])
  # Tilted towards high rewards: each candidate is drawn more often than a lower one.
  counts = np.bincount(np.concatenate([c, j]), minlength=4)
  assert np.all(np.diff(counts) > 0), counts


def test_reward_levels_match_numpy():
  r = np.asarray([[0.5, 1.0, 0.5, 0.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
  want = [[1 + len({x for x in row if x > v}) for v in row] for row in r]
  np.testing.assert_array_equal(np.asarray(preference_step.reward_levels(jnp.asarray(r))), want)


# ----------------------------------------------------------------------------- objective


@pytest.fixture(scope="module")
def stepped():
  """One DPO step's inputs and the learn data of its pairs phase (shared)."""
  model, _, sc, opt, _, state = setup()
  settings = _settings(preference_loss_kwargs=dict(beta=0.5), pairs="all_pairs")
  phase = preference_step.PreferencePhase.build(settings)
  batch = {k: jnp.asarray(v) for k, v in prompts(n=4, seed=3).items()}
  ro = phases.rollout(model, state.params, batch, jax.random.PRNGKey(5), sc)
  scores = phases.Scores(rewards=_even_fraction(None, ro.completion_ids, ro.completion_mask, {}),
                         each=None)
  sig = phases.signals(model, state.ref_params, ro, scores.rewards, jnp.float32(0.0),
                       group_size=4, kl_in_reward=False)
  data, _ = phase.data(model, ro, scores, sig, None, jax.random.PRNGKey(0))
  return model, state, phase, ro, scores, data


def test_dpo_objective_matches_a_float64_reference(stepped):
  model, state, phase, ro, scores, data = stepped
  objective = phase.make_objective(model)
  mb = dict(data, prompt_len=ro.prompt_len)
  # Perturb the policy so that policy and reference differ.
  params = jax.tree.map(lambda p: p * 1.05, state.params)
  loss, aux = objective(params, None, mb, phase.normalizer(mb), None)
  # Independent reference: full-row token log-probs, pairs and DPO in float64 numpy.
  def seq(p):
    lp, _ = models.token_logps(model, p, ro.ids, ro.attn)
    return np.sum(np.asarray(lp[:, ro.prompt_len:], np.float64) * np.asarray(ro.loss_mask), 1)
  pol, ref = seq(params), seq(state.ref_params)
  r = np.asarray(scores.rewards, np.float64).reshape(-1, 4)
  terms, weights = [], []
  for b in range(r.shape[0]):
    for hi, lo, w in _np_pairs(r[b:b + 1], "all_pairs")[0]:
      hi, lo = int(hi) + 4 * b, int(lo) + 4 * b
      h = (pol[hi] - ref[hi]) - (pol[lo] - ref[lo])
      terms.append(np.log1p(np.exp(-0.5 * h)))
      weights.append(w)
  weights = np.asarray(weights)
  assert weights.sum() > 0
  want = np.sum(np.asarray(terms) * weights) / weights.sum()
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
  assert 0.0 <= float(aux["implicit_accuracy"]) <= 1.0


def test_listwise_pro_objective_ranks_the_group_by_reward(stepped):
  model, state, _, ro, scores, _ = stepped
  settings = _settings(preference_loss="pro", preference_loss_kwargs=dict(sft_weight=0.0))
  phase = preference_step.PreferencePhase.build(settings)
  assert phase.listwise
  sig = phases.signals(model, state.ref_params, ro, scores.rewards, jnp.float32(0.0),
                       group_size=4, kl_in_reward=False)
  data, _ = phase.data(model, ro, scores, sig, None, jax.random.PRNGKey(0))
  mb = dict(data, prompt_len=ro.prompt_len)
  loss, _ = phase.make_objective(model)(state.params, None, mb, phase.normalizer(mb), None)
  lp, _ = models.token_logps(model, state.params, ro.ids, ro.attn)
  m = np.asarray(ro.loss_mask, np.float64)
  s = (np.sum(np.asarray(lp[:, ro.prompt_len:], np.float64) * m, 1) / m.sum(1)).reshape(-1, 4)
  r = np.asarray(scores.rewards, np.float64).reshape(-1, 4)
  total, groups = 0.0, 0
  for b in range(r.shape[0]):
    if r[b].max() == r[b].min():
      continue
    z = s[b][np.argsort(-r[b], kind="stable")]
    total += sum(np.log(np.sum(np.exp(z[k:]))) - z[k] for k in range(3))
    groups += 1
  np.testing.assert_allclose(float(loss), total / max(groups, 1), rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the step


def _three_steps(**rl):
  """(update, [state after 0..3 steps], last metrics) of the preference step with `rl`."""
  model, _, sc, opt, _, state0 = setup()
  settings = _settings(**rl)
  state = online.init_state(state0.params, opt, jax.random.PRNGKey(1), settings)
  update = online.make_update(model, [_even_fraction], opt, settings, sc, donate=False)
  history = [state]
  for i in range(3):
    state, m = update(state, prompts(n=4, seed=i), jax.random.PRNGKey(i))
    history.append(state)
  return update, history, m


@pytest.fixture(scope="module")
def dpo_run():
  return _three_steps(pairs="all_pairs", ref_update_every=2)


def test_online_dpo_step_learns_with_one_compilation(dpo_run):
  update, history, m = dpo_run
  assert update._cache_size() == 1  # pylint: disable=protected-access
  for key in ("loss", "implicit_accuracy", "logratio_margin", "preference_pairs", "reward_mean"):
    assert np.isfinite(float(m[key])), key
  assert float(m["preference_pairs"]) > 0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), history[0].params,
                       history[-1].params)
  assert max(jax.tree.leaves(moved)) > 0


def test_dno_reference_is_the_policy_of_the_last_kth_step(dpo_run):
  _, history, _ = dpo_run  # ref_update_every=2
  same = lambda a, b: all(bool(jnp.array_equal(x, y)) for x, y in  # noqa: E731
                          zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(history[1].ref_params, history[0].params)  # step 1: still the initial policy
  assert same(history[2].ref_params, history[2].params)  # step 2: synced
  assert same(history[3].ref_params, history[2].params)  # step 3: the policy of step 2
  assert not same(history[3].params, history[2].params)


def test_inpo_iterate_and_micro_batch_invariance():
  one, two = (_three_steps(preference_loss="inpo", iterate_every=2, micro_batches=micro)[1]
              for micro in (1, 2))
  for a, b in zip(jax.tree.leaves(one[-1].params), jax.tree.leaves(two[-1].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  for a, b in zip(jax.tree.leaves(one[3].iterate_params), jax.tree.leaves(one[2].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # π_t: the policy of step 2
  assert one[0].ref_params is not None and one[0].iterate_params is not None


def test_nash_md_step_samples_mixture_opponents():
  model, _, sc, opt, _, state0 = setup()
  settings = _settings(preference_loss="nash_md", mixture_beta=0.5)
  state = online.init_state(state0.params, opt, jax.random.PRNGKey(1), settings)
  update = online.make_update(model, [_even_fraction], opt, settings, sc, donate=False)
  for i in range(2):
    state, m = update(state, prompts(n=4, seed=i), jax.random.PRNGKey(i))
  assert update._cache_size() == 1  # pylint: disable=protected-access
  assert 0.0 < float(m["win_rate_vs_mixture"]) < 1.0 and np.isfinite(float(m["loss"]))


def test_opponent_preference_probs_are_the_reward_sigmoid(stepped):
  model, state, _, ro, scores, _ = stepped
  phase = preference_step.PreferencePhase.build(
      _settings(preference_loss="nash_md", preference_temperature=0.5))
  assert phase.opponent
  sig = phases.signals(model, state.ref_params, ro, scores.rewards, jnp.float32(0.0),
                       group_size=4, kl_in_reward=False)
  opp = scores.rewards[::-1]
  data, _ = phase.data(model, ro, scores, sig, None, jax.random.PRNGKey(0), opp)
  want = 1.0 / (1.0 + np.exp(-(np.asarray(scores.rewards, np.float64) - np.asarray(opp)) / 0.5))
  np.testing.assert_allclose(np.asarray(data["preference_probs"]).reshape(-1), want, rtol=1e-6)
  mb = dict(data, prompt_len=ro.prompt_len)
  loss, _ = phase.make_objective(model)(state.params, None, mb, phase.normalizer(mb), None)
  lp, _ = models.token_logps(model, state.params, ro.ids, ro.attn)
  seq = np.sum(np.asarray(lp[:, ro.prompt_len:], np.float64) * np.asarray(ro.loss_mask), 1)
  # Policy = reference here: the coefficient is P - 1/2 (tau * log-ratio = 0).
  np.testing.assert_allclose(float(loss), np.mean(-(want - 0.5) * seq), rtol=2e-5, atol=1e-6)


def test_grao_scores_the_reference_answer_with_eos():
  batch = {"answer_ids": jnp.asarray([[5, 6, 0], [7, 0, 0]]),
           "answer_mask": jnp.asarray([[1, 1, 0], [1, 0, 0]], bool)}
  ids, mask = phases.reference_answers(batch, eos_id=2)
  np.testing.assert_array_equal(np.asarray(ids), [[5, 6, 2, 0], [7, 2, 0, 0]])
  np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 1, 0], [1, 1, 0, 0]])
  model, _, sc, opt, rewards, state0 = setup()
  settings = _settings(preference_loss="grao")
  state = online.init_state(state0.params, opt, jax.random.PRNGKey(1), settings)
  update = online.make_update(model, rewards, opt, settings, sc, donate=False)
  state, m = update(state, prompts(n=4, seed=0), jax.random.PRNGKey(0))
  assert np.isfinite(float(m["loss"]))
  with pytest.raises(ValueError, match="no answer_ids"):
    phases.reference_answers({}, eos_id=2)


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("rl, match", [
    (dict(objective="preference", preference_loss="ppo_clip"), r"policy-gradient loss.*rl\.surrogate"),
    (dict(surrogate="dpo"), r"rl\.objective='preference'"),
    (dict(preference_loss="dpo"), r"rl\.preference_loss is read only with rl\.objective"),
    (dict(iterate_every=2), r"rl\.iterate_every is read only"),
    (dict(objective="preference", group_size=1), r"rl\.group_size must be >= 2"),
    (dict(objective="preference", pairs="best"), r"rl\.pairs='best' is unknown"),
    (dict(objective="preference", kl_coef=0.1), r"rl\.kl_coef"),
    (dict(objective="preference", preference_loss="nope"), r"rl\.preference_loss='nope'"),
    (dict(objective="dpo"), r"rl\.objective='dpo' is unknown"),
    (dict(objective="preference", mixture_beta=1.5), r"rl\.mixture_beta"),
])
def test_bad_preference_configs_are_named(rl, match):
  with pytest.raises(ValueError, match=match):
    RLSettings.from_config(dict(dict(group_size=4), **rl))


@pytest.mark.parametrize("loss, kwargs, match", [
    ("inpo", {}, r"rl\.iterate_every=k"),
    ("kto", {"reference_point": 0.0}, r"needs 'logps', 'ref_logps', 'desirable'"),
    ("dpo", {"bta": 0.1}, r"rl\.preference_loss_kwargs has 'bta'"),
])
def test_losses_the_step_cannot_feed_are_named(loss, kwargs, match):
  settings = _settings(preference_loss=loss, preference_loss_kwargs=kwargs)
  with pytest.raises(ValueError, match=match):
    preference_step.PreferencePhase.build(settings)


def test_preference_objective_refuses_a_value_model():
  model, _, sc, opt, _, _ = setup()
  with pytest.raises(ValueError, match=r"config\.value"):
    online.make_update(model, [_even_fraction], opt, _settings(), sc,
                       value_model=model.with_head("value"))


# ----------------------------------------------------------------------------- T-REG


class _Tok:
  """Stand-in tokenizer: characters to ids 3..15; '!' cannot be encoded."""

  def encode(self, text):
    if "!" in text:
      raise KeyError("!")
    return [3 + ord(c) % 13 for c in text]


def _right_padded_logps(model, params, ro, prefix):
  """Full-row token log-probs of [prefix, prompt's real tokens, completion], right-padded
  (another layout than the step's left-padded prompts), float64 [N, T]."""
  p, t = ro.prompt_len, ro.ids.shape[1] - ro.prompt_len
  ids, attn = np.asarray(ro.ids), np.asarray(ro.attn)
  rows, masks, starts = [], [], []
  width = len(prefix) + ids.shape[1]
  for n in range(ids.shape[0]):
    real = ids[n, :p][attn[n, :p]]
    seq = np.concatenate([prefix, real, ids[n, p:]])
    m = np.concatenate([np.ones(len(prefix) + len(real), bool), attn[n, p:]])
    starts.append(len(prefix) + len(real))
    rows.append(np.pad(seq, (0, width - len(seq))))
    masks.append(np.pad(m, (0, width - len(m))))
  lp, _ = models.token_logps(model, params, jnp.asarray(np.stack(rows)),
                             jnp.asarray(np.stack(masks)))
  lp = np.asarray(lp, np.float64)
  return np.stack([lp[n, s:s + t] for n, s in enumerate(starts)])


def test_treg_token_rewards_and_objective_match_float64(stepped):
  model, state, _, ro, scores, _ = stepped
  settings = _settings(preference_loss="treg", pairs="all_pairs",
                       preference_loss_kwargs=dict(beta=0.5, alpha=0.3),
                       token_reward_prompts=("ab", "xyz")).with_prompt_ids(_Tok())
  assert settings.token_reward_prompt_ids == (tuple(_Tok().encode("ab")),
                                              tuple(_Tok().encode("xyz")))
  phase = preference_step.PreferencePhase.build(settings)
  sig = phases.signals(model, state.ref_params, ro, scores.rewards, jnp.float32(0.0),
                       group_size=4, kl_in_reward=False)
  policy = jax.tree.map(lambda p: p * 0.97, state.params)  # the sampling policy ≠ reference
  data, metrics = phase.data(model, ro, scores, sig, None, jax.random.PRNGKey(0),
                             policy_params=policy)
  mask = np.asarray(ro.loss_mask, np.float64)
  better, worse = (_right_padded_logps(model, policy, ro, np.asarray(ids))
                   for ids in settings.token_reward_prompt_ids)
  want_r = (1.0 / (1.0 + np.exp(-(better - worse))) - 0.5) * mask
  got_r = np.asarray(data["token_rewards"], np.float64).reshape(want_r.shape)
  np.testing.assert_allclose(got_r, want_r, atol=2e-5)
  assert np.abs(want_r).max() > 1e-3  # the two prompts really differ
  np.testing.assert_allclose(float(metrics["token_reward_mean"]),
                             want_r.sum() / mask.sum(), atol=1e-5)

  # The objective: DPO + α·w·(L_REG(y_w) + L_REG(y_l)), L_REG(y) = −β Σ_t r̂_t log π(y_t),
  # w = σ(β(b − a)), in float64 over the all_pairs of each group.
  params = jax.tree.map(lambda p: p * 1.05, state.params)
  mb = dict(data, prompt_len=ro.prompt_len)
  loss, _ = phase.make_objective(model)(params, None, mb, phase.normalizer(mb), None)
  tok = lambda p: np.asarray(models.token_logps(model, p, ro.ids, ro.attn)[0],  # noqa: E731
                             np.float64)[:, ro.prompt_len:] * mask
  pol_t, ref_t = tok(params), tok(state.ref_params)
  pol, ref = pol_t.sum(1), ref_t.sum(1)
  r = np.asarray(scores.rewards, np.float64).reshape(-1, 4)
  beta, alpha, terms, weights = 0.5, 0.3, [], []
  for b in range(r.shape[0]):
    for hi, lo, w in _np_pairs(r[b:b + 1], "all_pairs")[0]:
      hi, lo = int(hi) + 4 * b, int(lo) + 4 * b
      a_, b_ = pol[hi] - ref[hi], pol[lo] - ref[lo]
      reg = -beta * np.sum(want_r[hi] * pol_t[hi]) - beta * np.sum(want_r[lo] * pol_t[lo])
      wt = 1.0 / (1.0 + np.exp(-beta * (b_ - a_)))
      terms.append(np.log1p(np.exp(-beta * (a_ - b_))) + alpha * wt * reg)
      weights.append(w)
  weights = np.asarray(weights)
  want = np.sum(np.asarray(terms) * weights) / weights.sum()
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)


def test_treg_config_errors_are_named():
  with pytest.raises(ValueError, match=r"rl\.token_reward_prompts=\(better, worse\)"):
    preference_step.PreferencePhase.build(_settings(preference_loss="treg"))
  with pytest.raises(ValueError, match=r"does not take them"):
    preference_step.PreferencePhase.build(
        _settings(token_reward_prompts=("a", "b")).with_prompt_ids(_Tok()))
  with pytest.raises(ValueError, match=r"two non-empty strings"):
    _settings(preference_loss="treg", token_reward_prompts=("a", ""))
  with pytest.raises(ValueError, match=r"cannot encode 'no!'"):
    _settings(preference_loss="treg", token_reward_prompts=("a", "no!")).with_prompt_ids(_Tok())
  with pytest.raises(ValueError, match=r"rl\.token_reward_prompts is read only"):
    RLSettings.from_config(dict(group_size=4, token_reward_prompts=("a", "b")))


@pytest.mark.parametrize("loss, shaping, match", [
    ("grao", ("lsc",), r"also scores the prompts' reference answers.*\['ref_rewards'\]"),
    ("nash_md", ({"name": "spo_win_rate"},), r"also scores one opponent per sample"),
])
def test_shaping_the_extra_scored_rows_cannot_read_is_named(loss, shaping, match):
  model, _, sc, opt, rewards, _ = setup()
  with pytest.raises(ValueError, match=match):
    online.make_update(model, rewards, opt, _settings(preference_loss=loss), sc,
                       reward_shaping=shaping)
