"""Multi-turn rollouts: the token layout and its masks, turn bookkeeping, the sampler's
log-probs against the trainer's (token in, token out), one compilation for new data, a
small model using the calculator tool (JAX and host versions agree), bad inputs, and the
turn-level estimators (`turn_returns`, GiGPO inputs, turn -> token advantages)."""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import advantages, envs
from rlhf_jax import models as M
from rlhf_jax.advantages import turn as turn_lib
from rlhf_jax.data.tokenizer import CharTokenizer
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import multiturn, phases

TOK = CharTokenizer()
EOS = TOK.eos_id
TINY = dict(model_type="llama", vocab_size=TOK.vocab_size, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            max_position_embeddings=128, tie_word_embeddings=True)
MODEL = M.from_config(TINY)
PARAMS = MODEL.init(jax.random.key(0))
G = 2

# ----------------------------------------------------------------------------- scripted env

STOPS = tuple((i,) for i in range(5, 21)) + ((30, 31),)
OBS_BASE, FIRST_OBS = 60, (40, 41)


@flax.struct.dataclass
class _ScriptState:
  turns: jax.Array  # [B] the episode's length in turns
  turn: jax.Array


@dataclasses.dataclass(frozen=True)
class ScriptedEnv:
  """Row r ends after `turns[r]` turns. Turn k's observation is 1 + k % O tokens
  `OBS_BASE + k + j`, right-aligned (padding first); its reward 0.1 (k + 1) + 0.01 x the
  number of action tokens. Rows get a first observation of 1 (even) or 2 (odd) tokens."""
  obs_tokens: int = 3
  width: int = 3  # the observation width it returns (!= obs_tokens: a broken env)

  def reset(self, rng, batch):
    del rng
    b = batch["prompt_ids"].shape[0]
    first = jnp.tile(jnp.asarray([FIRST_OBS], jnp.int32), (b, 1))
    first_mask = jnp.stack([jnp.arange(b) % 2 == 1, jnp.ones(b, bool)], axis=1)
    return _ScriptState(turns=batch["turns"], turn=jnp.zeros(b, jnp.int32)), first, first_mask

  def step(self, state, action_ids, action_mask):
    k = state.turn
    n_act = jnp.sum(action_mask, axis=1)
    j = jnp.arange(self.width)[None, :]
    length = 1 + k % self.obs_tokens
    obs_mask = j >= self.width - length[:, None]
    obs = jnp.where(obs_mask, OBS_BASE + k[:, None] + j, 0).astype(jnp.int32)
    reward = 0.1 * (k + 1) + 0.01 * n_act
    done = k + 1 >= state.turns
    return state.replace(turn=k + 1), obs, obs_mask, reward.astype(jnp.float32), done


SPEC = envs.EnvSpec(max_turns=3, turn_tokens=4, obs_tokens=3, stop_sequences=STOPS)
SAMPLING = SamplingConfig(max_new_tokens=1, temperature=1.0, eos_ids=(EOS,), num_samples=G)
TURNS = np.array([1, 3, 5, 2], np.int32)
TRACES = []


def _traced(*args):
  TRACES.append(1)
  return multiturn.rollout_multiturn(*args)


ROLLOUT = jax.jit(_traced, static_argnums=(0, 4, 5, 6))


def _batch(seed, turns=TURNS, plen=6):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, TOK.vocab_size, (len(turns), plen)).astype(np.int32)
  lengths = rng.integers(1, plen + 1, len(turns))
  mask = np.arange(plen)[None, :] < lengths[:, None]  # right-padded: the rollout left-pads
  return {"prompt_ids": np.where(mask, ids, 0), "prompt_mask": mask, "turns": turns}


@functools.lru_cache(maxsize=None)
def _scripted(seed):
  batch = _batch(seed)
  ro, info = ROLLOUT(MODEL, PARAMS, batch, jax.random.key(seed), SAMPLING, ScriptedEnv(), SPEC)
  return batch, jax.tree.map(np.asarray, ro), jax.tree.map(np.asarray, info)


def _is_stop(seq):
  return any(tuple(seq[len(seq) - len(s):]) == s for s in STOPS if len(seq) >= len(s)) or (
      len(seq) and seq[-1] == EOS)


def test_layout_masks_and_turns():
  batch, ro, info = _scripted(0)
  n, t = ro.completion_ids.shape
  assert (n, t) == (len(TURNS) * G, SPEC.completion_tokens) == (8, 3 * 4 + 2 * 3)
  loss, obs, comp = ro.loss_mask.astype(bool), info.obs_mask, ro.completion_mask
  np.testing.assert_array_equal(comp, loss | obs)
  assert not (loss & obs).any()
  # Real tokens first, padding last; padding has turn -1 and the pad id.
  np.testing.assert_array_equal(comp, np.arange(t)[None] < ro.lengths[:, None])
  np.testing.assert_array_equal(info.token_turn == -1, ~comp)
  assert (ro.completion_ids[~comp] == SAMPLING.pad_id).all()
  np.testing.assert_array_equal(ro.logps[~loss], 0.0)
  turns = np.repeat(TURNS, G)
  np.testing.assert_array_equal(info.num_turns, np.minimum(turns, SPEC.max_turns))
  np.testing.assert_array_equal(info.done, turns <= SPEC.max_turns)  # row 2 ran out of turns
  np.testing.assert_array_equal(ro.finished, info.done)
  np.testing.assert_array_equal(info.turn_mask, np.arange(3)[None] < info.num_turns[:, None])
  for r in range(n):
    ids, tt = ro.completion_ids[r], info.token_turn[r]
    rewards = []
    expect, pos = [], 0
    for k in range(info.num_turns[r]):
      act = ids[(tt == k) & loss[r]].tolist()
      assert 1 <= len(act) <= SPEC.turn_tokens
      # A turn ends at its first stop sequence / EOS, or when the budget is spent.
      assert len(act) == SPEC.turn_tokens or _is_stop(act)
      assert not any(_is_stop(act[:i]) for i in range(1, len(act)))
      rewards.append(0.1 * (k + 1) + 0.01 * len(act))
      expect += act
      if k < info.num_turns[r] - 1:  # the last turn's observation is never appended
        expect += [OBS_BASE + k + j for j in range(3 - (1 + k % 3), 3)]
      pos = len(expect)
      assert ((tt == k) & obs[r]).sum() == (0 if k == info.num_turns[r] - 1 else 1 + k % 3)
    assert ids[:pos].tolist() == expect and ro.lengths[r] == pos
    np.testing.assert_allclose(info.turn_rewards[r, :len(rewards)], rewards, rtol=1e-6)
    np.testing.assert_array_equal(info.turn_rewards[r, len(rewards):], 0.0)
  np.testing.assert_allclose(info.reward, info.turn_rewards.sum(1), rtol=1e-6)
  # The prompt (left-padded) is the original prompt plus the first observation.
  for r in range(n):
    i = r // G
    orig = batch["prompt_ids"][i][batch["prompt_mask"][i]].tolist()
    first = list(FIRST_OBS) if i % 2 else [FIRST_OBS[1]]
    assert ro.prompt_ids[r][ro.prompt_mask[r]].tolist() == orig + first
    assert ro.prompt_mask[r, -1]


def test_anchor_ids_group_identical_histories():
  _, ro, info = _scripted(0)
  n = ro.completion_ids.shape[0]
  hist = {}
  for r in range(n):
    prompt = ro.prompt_ids[r][ro.prompt_mask[r]].tolist()
    for k in range(info.num_turns[r]):
      first = np.argmax(info.token_turn[r] == k)
      hist[r, k] = tuple(prompt + ro.completion_ids[r, :first].tolist())
  for (r, k), h in hist.items():
    for (s, m), h2 in hist.items():
      assert (h == h2) == (info.anchor_ids[r, k] == info.anchor_ids[s, m]), (r, k, s, m)
  # Each prompt's samples share their first anchor; turns not taken get 0.
  np.testing.assert_array_equal(info.anchor_ids[::2, 0], info.anchor_ids[1::2, 0])
  np.testing.assert_array_equal(info.anchor_ids[~info.turn_mask], 0)


def test_sampler_logps_equal_trainer_logps():
  _, ro, _ = _scripted(0)
  ro = jax.tree.map(jnp.asarray, ro)
  lp, _ = jax.jit(M.token_logps, static_argnums=0)(MODEL, PARAMS, ro.ids, ro.attn)
  lp = np.asarray(lp)[:, ro.prompt_len:]
  loss = np.asarray(ro.loss_mask, bool)
  np.testing.assert_allclose(np.where(loss, lp, 0.0), ro.logps, atol=1e-5, rtol=0)
  # The same through the step's grouped reference pass (prompt once per group).
  glp, _ = jax.jit(phases.completion_logps, static_argnums=(0, 4, 5))(
      MODEL, PARAMS, ro.ids, ro.attn, ro.prompt_len, G)
  np.testing.assert_allclose(np.where(loss, glp, 0.0), ro.logps, atol=1e-5, rtol=0)
  assert np.abs(ro.logps[loss]).min() > 0  # real log-probs, not zeros


def test_scanned_layers_decode_the_same_episodes():
  """`sampling_config.scan_layers`: stacked layers scanned in each decode step, the stacked
  cache written in place, give the per-layer rollout's tokens and log-probs."""
  batch, ro, info = _scripted(0)
  sc = dataclasses.replace(SAMPLING, scan_layers=True)
  run = lambda p, b, k, s: multiturn.rollout_multiturn(MODEL, p, b, k, s, ScriptedEnv(), SPEC)
  args = (M.stack_layers(PARAMS), batch, jax.random.key(0))
  scan_eqns = lambda s: str(jax.make_jaxpr(lambda *a: run(*a, s))(*args)).count(" scan[")
  assert scan_eqns(sc) > scan_eqns(SAMPLING)  # the decode scans over depth
  scanned = jax.jit(lambda *a: run(*a, sc))(*args)
  got, got_info = jax.tree.map(np.asarray, scanned)
  np.testing.assert_array_equal(got.ids, ro.ids)
  np.testing.assert_array_equal(got.loss_mask, ro.loss_mask)
  np.testing.assert_allclose(got.logps, ro.logps, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got_info.reward, info.reward, atol=1e-6, rtol=0)


def test_compiles_once_for_new_data():
  _scripted(0)
  before = len(TRACES)
  _, ro1, info1 = _scripted(1)
  _, ro2, info2 = _scripted(2)
  assert len(TRACES) == before <= 1
  assert ROLLOUT._cache_size() == 1  # pylint: disable=protected-access
  assert not np.array_equal(ro1.completion_ids, ro2.completion_ids)


# ----------------------------------------------------------------------------- calculator


CALC_TEXTS = ["23*45=<calc>23*45</calc>1035" + "1035<eos>", "7+8=15<eos>"]
CALC_MODEL = M.from_config(dict(TINY, hidden_size=32, intermediate_size=64))


@functools.lru_cache(maxsize=None)
def _calculator_user():
  """A small model fitted to two episodes: a tool call then the answer; a direct answer."""
  seqs = [TOK.encode(t) for t in CALC_TEXTS]
  ids, mask = envs.base.pad_rows(seqs, max(map(len, seqs)), TOK.pad_id)
  opt = optax.adam(1e-2)

  def loss(p):
    lp, _ = M.token_logps(CALC_MODEL, p, ids, mask)
    return -jnp.sum(lp * mask) / mask.sum()

  @jax.jit
  def fit(p):
    def body(c, _):
      p, s = c
      g = jax.grad(loss)(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (p, opt.init(p)), None, length=150)[0][0]
  return fit(CALC_MODEL.init(jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def _calculator_rollout(name):
  env, spec = envs.make(name, TOK, max_turns=2, turn_tokens=18, obs_tokens=8)
  batch = envs.prompt_batch(TOK, [{"prompt": "23*45="}, {"prompt": "7+8="}])
  greedy = SamplingConfig(max_new_tokens=1, temperature=0.0, eos_ids=(EOS,), num_samples=G)
  run = jax.jit(multiturn.rollout_multiturn, static_argnums=(0, 4, 5, 6))
  ro, info = run(CALC_MODEL, _calculator_user(), batch, jax.random.key(0), greedy, env, spec)
  return jax.tree.map(np.asarray, ro), jax.tree.map(np.asarray, info)


def test_calculator_tool_use_end_to_end():
  ro, info = _calculator_rollout("calculator")
  texts = [TOK.decode(ro.completion_ids[r][ro.completion_mask[r]], skip_special_tokens=False)
           for r in range(4)]
  assert texts == ["<calc>23*45</calc>10351035<eos>"] * 2 + ["15<eos>"] * 2
  # Row 0 uses every turn (a tool call, then the answer); row 2 answers in turn 0.
  np.testing.assert_array_equal(info.num_turns, [2, 2, 1, 1])
  np.testing.assert_array_equal(info.turn_rewards, [[0, 1], [0, 1], [1, 0], [1, 0]])
  np.testing.assert_array_equal(info.reward, 1.0)
  np.testing.assert_array_equal(info.done, True)
  obs = ["".join(TOK.decode(ro.completion_ids[r][info.obs_mask[r]])) for r in range(4)]
  assert obs == ["1035", "1035", "", ""]
  assert not (ro.loss_mask.astype(bool) & info.obs_mask).any()
  # The observation is in the cache as the trainer sees it.
  lp, _ = jax.jit(M.token_logps, static_argnums=0)(CALC_MODEL, _calculator_user(), ro.ids,
                                                    ro.attn)
  lp = np.asarray(lp)[:, ro.prompt_len:]
  np.testing.assert_allclose(np.where(ro.loss_mask > 0, lp, 0.0), ro.logps, atol=1e-5, rtol=0)


def test_host_calculator_end_to_end_matches_the_jax_calculator():
  jro, jinfo = _calculator_rollout("calculator")
  hro, hinfo = _calculator_rollout("host_calculator")
  for a, b in zip(jax.tree.leaves((jro, jinfo)), jax.tree.leaves((hro, hinfo))):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- bad inputs


def _trace(env, spec, batch=None, model=MODEL):
  batch = _batch(0) if batch is None else batch
  return jax.eval_shape(lambda p, b: multiturn.rollout_multiturn(
      model, p, b, jax.random.key(0), SAMPLING, env, spec), PARAMS, batch)


def test_context_too_long_is_a_named_error():
  spec = envs.EnvSpec(max_turns=10, turn_tokens=8, obs_tokens=6, stop_sequences=STOPS)
  with pytest.raises(envs.ContextLengthError, match=r"8 prompt \+ 134 completion tokens .*"
                                                    r"max_position_embeddings=128"):
    _trace(ScriptedEnv(), spec)
  ro, info = _trace(ScriptedEnv(), SPEC)  # fits
  assert ro.completion_ids.shape == info.token_turn.shape == (8, 18)


def test_wrong_observation_width_is_a_named_error():
  with pytest.raises(envs.EnvSpecError, match=r"observations \(8, 5\).*obs_tokens=3"):
    _trace(ScriptedEnv(width=5), SPEC)


def test_bad_specs():
  with pytest.raises(envs.EnvSpecError, match="max_turns"):
    envs.EnvSpec(max_turns=0, turn_tokens=4, obs_tokens=3)
  with pytest.raises(envs.EnvSpecError, match="env_spec must be an EnvSpec"):
    _trace(ScriptedEnv(), {"max_turns": 2})
  with pytest.raises(envs.StopStringError):
    envs.make("host", TOK, tool=envs.python_calculator, stop_strings=["é"])


# ----------------------------------------------------------------------------- estimators


def test_turn_returns_reference():
  rewards = np.array([1.0, 0.5, 0.0, 2.0], np.float32)
  step_r = np.array([[0.2, 0.3, 0.5], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 9.0]],
                    np.float32)
  smask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]], bool)
  gamma = 0.5

  def ref(normalize):
    r = np.where(smask, step_r, 0.0)
    for i in range(4):  # the unassigned part of the reward goes to the last valid turn
      last = smask[i].nonzero()[0][-1]
      r[i, last] += rewards[i] - r[i].sum()
    ret = np.zeros_like(r)
    for i in range(4):
      acc = 0.0
      for k in reversed(range(3)):
        acc = r[i, k] + gamma * acc if smask[i, k] else 0.0
        ret[i, k] = acc
    r0 = ret[:, 0].reshape(2, 2)
    mean = np.repeat(r0.mean(1), 2)
    std = np.repeat(r0.std(1), 2)
    adv = ret - mean[:, None]
    if normalize:
      adv = adv / (std[:, None] + 1e-6)
    return np.where(smask, adv, 0.0)

  fn = advantages.get("turn_returns")
  for normalize in (False, True):
    kw = dict(step_rewards=jnp.asarray(step_r), step_mask=jnp.asarray(smask), group_size=2,
              gamma=gamma, normalize_std=normalize)
    eager = fn(jnp.asarray(rewards), **kw)
    jitted = jax.jit(functools.partial(fn, **kw))(jnp.asarray(rewards))
    np.testing.assert_allclose(eager, ref(normalize), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
  decl = advantages.declaration("turn_returns")
  assert decl.kind == "step" and decl.needs == ("step_rewards", "step_mask", "group_size")


def test_turn_returns_single_turn_is_grpo():
  r = jnp.asarray([1.0, 0.0, 0.0, 0.5, 0.5, 0.5], jnp.float32)
  kw = dict(step_rewards=jnp.zeros((6, 1)), step_mask=jnp.ones((6, 1), bool), group_size=3)
  out = advantages.get("turn_returns")(r, **kw)[:, 0]
  np.testing.assert_allclose(out, advantages.get("dr_grpo")(r, group_size=3), atol=1e-7)
  np.testing.assert_array_equal(out[3:], 0.0)  # all-equal group: exact zeros
  out = advantages.get("turn_returns")(r, normalize_std=True, **kw)[:, 0]
  np.testing.assert_allclose(out, advantages.get("grpo")(r, group_size=3, unbiased=False),
                             rtol=1e-6)
  assert np.isfinite(np.asarray(out)).all()


def test_per_token_spreads_turn_advantages():
  adv = jnp.asarray([[1.0, -2.0, 3.0]])
  token_turn = jnp.asarray([[0, 0, 1, 1, 2, -1]])
  mask = jnp.asarray([[1, 1, 0, 1, 1, 0]])
  np.testing.assert_array_equal(turn_lib.per_token(adv, token_turn, mask),
                                [[1.0, 1.0, 0.0, -2.0, 3.0, 0.0]])
  with pytest.raises(ValueError, match="integer turn indices"):
    turn_lib.per_token(adv, token_turn.astype(jnp.float32), mask)


@pytest.mark.parametrize("name", ["gigpo", "turn_returns"])
def test_step_estimators_in_the_estimate_phase(name):
  _, ro, info = _scripted(0)
  ro, info = jax.tree.map(jnp.asarray, (ro, info))
  est = phases.Estimator.build(name, {}, group_size=G, provides=multiturn.STEP_INPUTS)
  with pytest.raises(ValueError, match="does not provide"):
    phases.Estimator.build(name, {}, group_size=G, provides=phases.STEP_INPUTS)
  scores = phases.Scores(rewards=info.reward, each=info.reward[:, None])
  sig = phases.Signals(ref_logps=ro.logps, kl=jnp.zeros_like(ro.logps),
                       token_rewards=jnp.zeros_like(ro.logps))
  estimate = jax.jit(multiturn.estimate, static_argnums=0)
  adv, _ = estimate(est, scores, ro, sig, None, info)
  per_turn = jax.jit(functools.partial(advantages.get(name), group_size=G))(info.reward, **{
      k: v for k, v in multiturn.step_inputs(info).items() if k in est.needs})
  assert adv.shape == ro.completion_ids.shape
  loss = np.asarray(ro.loss_mask, bool)
  tt = np.asarray(info.token_turn)
  expect = np.where(loss, np.take_along_axis(np.asarray(per_turn), np.maximum(tt, 0), 1), 0.0)
  np.testing.assert_allclose(adv, expect, rtol=1e-6)
  assert np.abs(np.asarray(adv)[loss]).max() > 0
  # A sequence-level estimator still gives [N] advantages.
  grpo = phases.Estimator.build("grpo", {}, group_size=G, provides=multiturn.STEP_INPUTS)
  adv, _ = estimate(grpo, scores, ro, sig, None, info)
  assert adv.shape == (ro.completion_ids.shape[0],)


def test_env_reward_function():
  _, ro, info = _scripted(0)
  fn = multiturn.env_reward()
  extras = multiturn.with_env_reward({}, info)
  np.testing.assert_array_equal(fn(ro.prompt_ids, ro.completion_ids, ro.completion_mask, extras),
                                info.reward)
  with pytest.raises(ValueError, match="with_env_reward"):
    fn(ro.prompt_ids, ro.completion_ids, ro.completion_mask, {})
