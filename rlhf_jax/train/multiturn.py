"""The multi-turn rollout phase: the model and an environment take turns, all inside `jit`.

    ro, info = rollout_multiturn(model, params, prompt_batch, rng, sampling_config, env, spec)

`ro` is the same `phases.Rollout` the single-turn sampler gives (so score / signals /
learn run unchanged) and `info` a `TurnInfo` with the turn-level quantities (per-turn
rewards, done flags, anchor ids, the turn of every token) that turn-level estimators
read (`estimate`, `rlhf_jax.advantages.turn`).

Layout. Each trajectory is ONE token sequence `[prompt, turn 0, obs 0, turn 1, obs 1, ...]`
with three kinds of completion tokens: model tokens (trained: `Rollout.loss_mask`),
observation tokens (never trained) and padding. `Rollout.completion_mask` marks model and
observation tokens (the attention mask of the trainer's teacher-forced pass),
`Rollout.logps` the sampler's temperature-1 log-probs of model tokens (0 elsewhere).
Real tokens come first and padding last, as from the single-turn sampler.

Decoding. The prompt (plus the environment's first observation) is prefilled once per
prompt and shared by its G samples (`models.prefill_groups`). The KV cache reserves
`turn_tokens + obs_tokens` slots per turn: a turn decodes one token per step
(`model.decode` with a KV-cache write) until every live row has emitted a stop sequence
or EOS, or the turn budget is spent; `env.step` then scores the turn, and its
observation is prefilled into the cache slots that follow the turn with one
`model.decode_hidden` call (the history is never re-encoded). Unused slots stay masked
out of attention, and position ids count real tokens only, so the cache sees exactly the
sequence the trainer later recomputes: the sampler's log-probs of model tokens equal
`models.token_logps` of `Rollout.ids` under `Rollout.attn` (token in, token out; within
1e-5 in float32). Done rows stop consuming (they write padding). Turns are a
`lax.while_loop`, each with an inner decode `lax.while_loop`; both exit early. The decode
reads per-layer weights, or with `sampling_config.scan_layers` scans the stacked layers and
writes the stacked cache in place, as the single-turn sampler does.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
from jax import custom_batching

from rlhf_jax import models as models_lib
from rlhf_jax.envs import base as env_base
from rlhf_jax.sampling.sampler import decode_params, left_pad, row_keys
from rlhf_jax.train import phases
from rlhf_jax.train.phases import Rollout

PAD, MODEL, OBS = 0, 1, 2  # token kinds in the decode buffers
_FNV_OFFSET, _FNV_PRIME = 2166136261, 16777619

# What a multi-turn step gives turn-level estimators besides the single-turn inputs.
TURN_INPUTS = ("step_rewards", "anchor_ids", "step_mask", "answer_probs")
STEP_INPUTS = phases.STEP_INPUTS + TURN_INPUTS


@flax.struct.dataclass
class TurnInfo:
  """Turn-level view of a multi-turn rollout (N rows, K = max_turns, T completion tokens).

  turn_rewards: [N, K] float32 each turn's environment reward (0 for turns not taken).
  turn_mask: [N, K] bool the turns the model took (valid steps).
  anchor_ids: [N, K] int32 a hash of everything the model had seen when it started each
    turn (prompt, earlier turns and observations): equal ids = identical states, the
    GiGPO anchor groups (0 for turns not taken).
  token_turn: [N, T] int32 the turn each completion token belongs to (a turn's
    observation carries the turn's index), -1 for padding.
  obs_mask: [N, T] bool the observation tokens.
  num_turns: [N] int32 turns taken.
  reward: [N] float32 the trajectory reward, the sum of the turn rewards.
  done: [N] bool the environment ended the episode (False: it ran out of turns).
  """
  turn_rewards: jax.Array
  turn_mask: jax.Array
  anchor_ids: jax.Array
  token_turn: jax.Array
  obs_mask: jax.Array
  num_turns: jax.Array
  reward: jax.Array
  done: jax.Array


@flax.struct.dataclass
class _Turns:
  """Carry of the turn loop (S = prompt + K * (turn_tokens + obs_tokens) cache slots)."""
  turn: jax.Array          # [] int32
  logits: jax.Array        # [N, V] float32 next-token logits after each row's last real token
  cache: Any
  kv_mask: jax.Array       # [N, S] bool real slots
  positions: jax.Array     # [N] int32 position id of each row's next token
  tokens: jax.Array        # [N, K * span] int32
  kind: jax.Array          # [N, K * span] int8 PAD / MODEL / OBS
  logps: jax.Array         # [N, K * span] float32
  token_turn: jax.Array    # [N, K * span] int32
  hash: jax.Array          # [N] uint32 rolling hash of the row's real tokens
  env_state: Any
  done: jax.Array          # [N] bool
  turn_rewards: jax.Array  # [N, K] float32
  turn_mask: jax.Array     # [N, K] bool
  anchors: jax.Array       # [N, K] int32


def _mix(h: jax.Array, tok: jax.Array, kind: int) -> jax.Array:
  """One FNV-1a step over (token, kind) in uint32 arithmetic."""
  x = (tok.astype(jnp.uint32) * jnp.uint32(4)) + jnp.uint32(kind)
  return (h ^ x) * jnp.uint32(_FNV_PRIME)


def _hash_columns(h: jax.Array, ids: jax.Array, mask: jax.Array, kind: int) -> jax.Array:
  """Mixes the real tokens of ids [N, L] into h [N], left to right."""
  def step(c, col):
    t, m = col
    return jnp.where(m, _mix(c, t, kind), c), None
  h, _ = jax.lax.scan(step, h, (ids.T, mask.T))
  return h


def _limit_vocab(logits: jax.Array, vocab_limit: Optional[int]) -> jax.Array:
  """Ids >= `vocab_limit` (a padded vocabulary's extra rows) get -inf, as in the sampler."""
  if vocab_limit is None or vocab_limit >= logits.shape[-1]:
    return logits
  ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  return jnp.where(ids < vocab_limit, logits, -jnp.inf)


def _col(a: jax.Array, v: jax.Array, t) -> jax.Array:
  return jax.lax.dynamic_update_slice(a, v[:, None].astype(a.dtype), (0, t))


def _check_env_out(env, spec, out, n):
  if not (isinstance(out, tuple) and len(out) == 5):
    raise env_base.EnvSpecError(f"{type(env).__name__}.step must return (state, obs_ids, "
                                f"obs_mask, reward, done), got {type(out).__name__}")
  _, obs, obs_mask, reward, done = out
  o = spec.obs_tokens
  if obs.shape != (n, o) or obs_mask.shape != (n, o):
    raise env_base.EnvSpecError(
        f"{type(env).__name__}.step returned observations {obs.shape} / mask "
        f"{obs_mask.shape}, but the EnvSpec reserves obs_tokens={o} slots per turn for "
        f"{n} rows: return [N, {o}] (clip longer observations, pad shorter ones)")
  if reward.shape != (n,) or done.shape != (n,):
    raise env_base.EnvSpecError(f"{type(env).__name__}.step must return reward and done of "
                                f"shape [{n}], got {reward.shape} and {done.shape}")


def in_sequence_under_vmap(fn: Callable) -> Callable:
  """`fn` whose `vmap` runs it once per mapped element (`lax.map`) instead of batching it.

  JAX cannot `vmap` a `while_loop` that holds an ordered host callback, nor an unordered one
  whose loop predicate is batched (each seed's episodes end on their own). Seed sweeps vmap
  the whole step, so a rollout against a host environment (`HostEnv`) runs its seeds one
  after another inside the program; each turn is still one host call, now per seed.
  Unbatched calls go to `fn` directly.
  """

  @custom_batching.custom_vmap
  def mapped(*args):
    return fn(*args)

  @mapped.def_vmap
  def _one_by_one(axis_size, in_batched, *args):
    args = jax.tree.map(lambda a, b: a if b else jnp.broadcast_to(a, (axis_size,) + a.shape),
                        list(args), list(in_batched))
    out = jax.lax.map(lambda xs: mapped(*xs), tuple(args))
    return out, jax.tree.map(lambda _: True, out)

  return mapped


def rollout_multiturn(model, params, prompt_batch: Mapping[str, jax.Array], rng: jax.Array,
                      sampling_config, env, env_spec: env_base.EnvSpec, *,
                      prompt_index: Optional[jax.Array] = None) -> Tuple[Rollout, TurnInfo]:
  """Samples G multi-turn episodes per prompt against `env` (see the module docstring).

  Args:
    model: a `rlhf_jax.models` LM decoder; static.
    params: its parameters (stacked or per layer).
    prompt_batch: {"prompt_ids" [B, P], "prompt_mask" [B, P], ...}; `env.reset` sees it
      (prompts left-padded) with one row per prompt.
    rng: a PRNG key (the environment's reset key and the token draws derive from it).
    sampling_config: `SamplingConfig`: num_samples = G, temperature / top-k / top-p,
      eos_ids (end a turn, like the spec's stop sequences), pad_id, vocab_limit (when the
      config has it). `max_new_tokens` is not used: the spec's `turn_tokens` and
      `max_turns` bound the episode.
    env: an environment (`rlhf_jax.envs.base.Env`); static.
    env_spec: its `EnvSpec`; static.
    prompt_index: optional int [B] dataset index of each prompt for its token draws.

  Returns:
    (`phases.Rollout` with T = env_spec.completion_tokens, `TurnInfo`).

  Raises:
    ContextLengthError: P + T exceeds the model's max_position_embeddings.
    EnvSpecError: the environment returns arrays of the wrong shape.
  """
  if not isinstance(env_spec, env_base.EnvSpec):
    raise env_base.EnvSpecError(f"env_spec must be an EnvSpec, got {type(env_spec).__name__}")
  ids0 = jnp.asarray(prompt_batch["prompt_ids"])
  if ids0.ndim != 2:
    raise ValueError(f"prompt_ids must have shape [B, P], got {ids0.shape}")
  method = sampling_config.method()
  vocab_limit = getattr(sampling_config, "vocab_limit", None)
  group, k_max = sampling_config.num_samples, env_spec.max_turns
  tt, o, span = env_spec.turn_tokens, env_spec.obs_tokens, env_spec.span
  t_buf, t_out = k_max * span, env_spec.completion_tokens
  batch = ids0.shape[0]
  n = batch * group
  pad = sampling_config.pad_id
  if prompt_index is None:
    prompt_index = jnp.arange(batch, dtype=jnp.int32)
  rng_env, rng_tok = jax.random.split(rng)

  # Reset (one row per prompt); the first observation extends the prompt.
  ids, mask = left_pad(ids0.astype(jnp.int32),
                       jnp.asarray(prompt_batch["prompt_mask"]).astype(bool))
  env_state, first, first_mask = env.reset(rng_env, dict(prompt_batch, prompt_ids=ids,
                                                         prompt_mask=mask))
  if first.ndim != 2 or first.shape[0] != batch or first_mask.shape != first.shape:
    raise env_base.EnvSpecError(f"{type(env).__name__}.reset must return a first observation "
                                f"[B={batch}, O0] with a mask of that shape, got {first.shape} / "
                                f"{first_mask.shape}")
  if first.shape[1]:
    ids, mask = left_pad(jnp.concatenate([ids, first.astype(jnp.int32)], axis=1),
                         jnp.concatenate([mask, first_mask.astype(bool)], axis=1))
  plen = ids.shape[1]
  max_pos = model.config.max_position_embeddings
  if plen + t_out > max_pos:
    raise env_base.ContextLengthError(
        f"a multi-turn episode needs up to {plen} prompt + {t_out} completion tokens "
        f"({k_max} turns x {tt} tokens + {k_max - 1} observations x {o} tokens) = "
        f"{plen + t_out} positions, more than the model's max_position_embeddings={max_pos}; "
        "lower max_turns / turn_tokens / obs_tokens or shorten the prompts")
  env_state = env_base.repeat_rows(env_state, group)

  stop_table, stop_width = env_spec.stop_table()
  stop_table = jnp.asarray(stop_table)
  eos = jnp.asarray(sampling_config.eos_ids or (-1,), jnp.int32)
  keys = row_keys(rng_tok, prompt_index, group)
  uniforms = jax.vmap(lambda key: jax.random.uniform(key, (k_max * tt,), jnp.float32))(keys)

  params = decode_params(params, getattr(sampling_config, "scan_layers", False))
  h, cache = models_lib.prefill_groups(model, params, ids, mask, extra_slots=t_buf,
                                       group_size=group, in_place=True)
  logits = model.logits_from_hidden(params, h)[:, -1].astype(jnp.float32)
  ids, mask = jnp.repeat(ids, group, axis=0), jnp.repeat(mask, group, axis=0)

  carry = _Turns(
      turn=jnp.zeros((), jnp.int32), logits=logits, cache=cache,
      kv_mask=jnp.concatenate([mask, jnp.zeros((n, t_buf), bool)], axis=1),
      positions=jnp.sum(mask, axis=1, dtype=jnp.int32),
      tokens=jnp.full((n, t_buf), pad, jnp.int32), kind=jnp.zeros((n, t_buf), jnp.int8),
      logps=jnp.zeros((n, t_buf), jnp.float32), token_turn=jnp.full((n, t_buf), -1, jnp.int32),
      hash=_hash_columns(jnp.full((n,), _FNV_OFFSET, jnp.uint32), ids, mask, 0),
      env_state=env_state, done=jnp.zeros((n,), bool),
      turn_rewards=jnp.zeros((n, k_max), jnp.float32), turn_mask=jnp.zeros((n, k_max), bool),
      anchors=jnp.zeros((n, k_max), jnp.int32))

  def decode_turn(c: _Turns, live: jax.Array) -> _Turns:
    """Decodes turn `c.turn` for the `live` rows until stop / EOS / the turn budget."""
    k = c.turn
    start = k * span

    def cond(s):
      j, _, active, _ = s
      return (j < tt) & jnp.any(active)

    def body(s):
      j, c, active, window = s
      t = start + j
      u = jax.lax.dynamic_index_in_dim(uniforms, k * tt + j, axis=1, keepdims=False)
      logits = _limit_vocab(c.logits, vocab_limit)
      tok, slogp = method.select(logits, u)
      if getattr(method, "is_plain", False):
        logp = slogp
      else:
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None],
                                   axis=-1)[:, 0]
      tok = jnp.where(active, tok, pad).astype(jnp.int32)
      kv_mask = _col(c.kv_mask, active, plen + t)
      new_logits, cache = model.decode(params, tok[:, None], c.positions[:, None], c.cache,
                                       write_index=plen + t, kv_mask=kv_mask, in_place=True)
      # As in the single-turn sampler: keep the LM-head matmul a library dot.
      new_logits = jax.lax.optimization_barrier(new_logits[:, -1]).astype(jnp.float32)
      c = c.replace(
          logits=jnp.where(active[:, None], new_logits, c.logits), cache=cache, kv_mask=kv_mask,
          positions=c.positions + active.astype(jnp.int32),
          tokens=_col(c.tokens, tok, t), kind=_col(c.kind, jnp.where(active, MODEL, PAD), t),
          logps=_col(c.logps, jnp.where(active, logp, 0.0), t),
          token_turn=_col(c.token_turn, jnp.where(active, k, -1), t),
          hash=jnp.where(active, _mix(c.hash, tok, MODEL), c.hash))
      window = jnp.where(active[:, None],
                         jnp.concatenate([window[:, 1:], tok[:, None]], axis=1), window)
      stop = jnp.any(tok[:, None] == eos[None, :], axis=1)
      if stop_table.shape[0]:
        hit = (stop_table[None] == -1) | (window[:, None, :] == stop_table[None])
        stop = stop | jnp.any(jnp.all(hit, axis=-1), axis=-1)
      return j + 1, c, active & ~stop, window

    window = jnp.full((n, stop_width), -2, jnp.int32)
    _, c, _, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), c, live, window))
    return c

  def append_obs(c: _Turns, obs: jax.Array, om: jax.Array) -> _Turns:
    """Prefills the observations `obs` [N, O] (real where `om`) after the turn."""
    slot = c.turn * span + tt
    obs = jnp.where(om, obs, pad).astype(jnp.int32)
    kv_mask = jax.lax.dynamic_update_slice(c.kv_mask, om, (0, plen + slot))
    pos = jnp.maximum(c.positions[:, None] + jnp.cumsum(om, axis=1, dtype=jnp.int32) - 1, 0)
    hid, cache = model.decode_hidden(params, obs, pos, c.cache, write_index=plen + slot,
                                     kv_mask=kv_mask, in_place=True)
    last = o - 1 - jnp.argmax(om[:, ::-1], axis=1)
    h_last = jnp.take_along_axis(hid, last[:, None, None], axis=1)
    new_logits = model.logits_from_hidden(params, h_last)[:, 0].astype(jnp.float32)
    has = jnp.any(om, axis=1)
    put = lambda a, v: jax.lax.dynamic_update_slice(a, v.astype(a.dtype), (0, slot))
    return c.replace(
        logits=jnp.where(has[:, None], new_logits, c.logits), cache=cache, kv_mask=kv_mask,
        positions=c.positions + jnp.sum(om, axis=1, dtype=jnp.int32),
        tokens=put(c.tokens, obs), kind=put(c.kind, jnp.where(om, OBS, PAD)),
        token_turn=put(c.token_turn, jnp.where(om, c.turn, -1)),
        hash=_hash_columns(c.hash, obs, om, OBS))

  def turn_cond(c: _Turns):
    return (c.turn < k_max) & ~jnp.all(c.done)

  def turn_body(c: _Turns) -> _Turns:
    k = c.turn
    live = ~c.done
    anchor = jax.lax.bitcast_convert_type(c.hash, jnp.int32)
    c = c.replace(anchors=_col(c.anchors, jnp.where(live, anchor, 0), k))
    c = decode_turn(c, live)
    action = jax.lax.dynamic_slice_in_dim(c.tokens, k * span, tt, axis=1)
    action_mask = jax.lax.dynamic_slice_in_dim(c.kind, k * span, tt, axis=1) == MODEL
    out = env.step(c.env_state, action, action_mask)
    _check_env_out(env, env_spec, out, n)
    new_state, obs, om, reward, ended = out
    reward = jnp.where(live, reward.astype(jnp.float32), 0.0)
    ended = live & ended.astype(bool)
    c = c.replace(env_state=env_base.select_rows(live, new_state, c.env_state),
                  done=c.done | ended, turn_rewards=_col(c.turn_rewards, reward, k),
                  turn_mask=_col(c.turn_mask, live, k))
    om = om.astype(bool) & (live & ~ended & (k < k_max - 1))[:, None]
    c = jax.lax.cond(jnp.any(om), lambda cc: append_obs(cc, obs, om), lambda cc: cc, c)
    return c.replace(turn=k + 1)

  c = jax.lax.while_loop(turn_cond, turn_body, carry)

  # Real tokens first (their order kept), padding last; then the static width T.
  order = jnp.argsort(c.kind == PAD, axis=1, stable=True)[:, :t_out]
  take = lambda a: jnp.take_along_axis(a, order, axis=1)
  tokens, kind, logps, token_turn = take(c.tokens), take(c.kind), take(c.logps), take(
      c.token_turn)
  completion_mask = kind != PAD
  loss_mask = kind == MODEL
  ro = Rollout(prompt_ids=ids, prompt_mask=mask, completion_ids=tokens,
               completion_mask=completion_mask, loss_mask=loss_mask.astype(jnp.float32),
               logps=jnp.where(loss_mask, logps, 0.0),
               lengths=jnp.sum(completion_mask, axis=1, dtype=jnp.int32), finished=c.done)
  ro = jax.tree.map(jax.lax.stop_gradient, ro)
  info = TurnInfo(turn_rewards=c.turn_rewards, turn_mask=c.turn_mask, anchor_ids=c.anchors,
                  token_turn=token_turn, obs_mask=kind == OBS,
                  num_turns=jnp.sum(c.turn_mask, axis=1, dtype=jnp.int32),
                  reward=jnp.sum(c.turn_rewards, axis=1), done=c.done)
  return ro, jax.tree.map(jax.lax.stop_gradient, info)


# ----------------------------------------------------------------------------- estimate


def step_inputs(info: TurnInfo) -> Dict[str, jax.Array]:
  """The turn-level estimator inputs (`TURN_INPUTS`) of a multi-turn rollout."""
  return {"step_rewards": info.turn_rewards, "anchor_ids": info.anchor_ids,
          "step_mask": info.turn_mask}


def estimate(estimator: phases.Estimator, scores: phases.Scores, ro: Rollout,
             sig: phases.Signals, adv_state, info: TurnInfo,
             greedy_rewards: Optional[jax.Array] = None,
             answer_probs: Optional[jax.Array] = None):
  """The estimate phase of a multi-turn step: `(advantages [N] or [N, T], new adv_state)`.

  A turn-level ("step" family) estimator gets the sequence rewards first, its declared
  inputs from the rollout and `info` (build it with `Estimator.build(...,
  provides=STEP_INPUTS)`), and its per-turn advantages [N, K] are spread over each turn's
  model tokens (`advantages.turn.per_token`); other estimators run as in the single-turn
  step. IGPO's P_k (`answer_probs` below) are passed when given.
  """
  inputs = dict(step_inputs(info), token_turn=info.token_turn)
  if answer_probs is not None:
    inputs["answer_probs"] = answer_probs
  return phases.estimate(estimator, scores, ro, sig, adv_state, greedy_rewards, inputs)


def answer_probs(model, params, ro: Rollout, info: TurnInfo, answer_ids: jax.Array,
                 answer_mask: jax.Array, *, group_size: int,
                 vocab_limit: Optional[int] = None) -> jax.Array:
  """IGPO's P_k [N, K + 1]: the policy's probability of the ground-truth answer after k turns.

  P_k = exp(mean_j log π(a_j | prompt, the first k turns with their observations)), the
  answer teacher-forced right after the history (k = 0: after the prompt and the first
  observation; k = K: after every turn). One pass over N (K + 1) rows that share their
  prompt (`models.completion_logps`); no gradient. A row without answer tokens gets P = 1.

  Shapes: ro / info of `rollout_multiturn` (N = B G rows, T completion tokens, K turns),
  answer_ids / answer_mask [B, A] right-padded (the prompt batch's) -> [N, K + 1] float32.
  """
  n, t = ro.completion_ids.shape
  k1 = info.turn_mask.shape[1] + 1
  a = answer_ids.shape[1]
  aids = jnp.repeat(answer_ids.astype(jnp.int32), group_size, axis=0)  # [N, A]
  alen = jnp.repeat(jnp.sum(answer_mask.astype(bool), axis=1, dtype=jnp.int32), group_size)
  real = info.token_turn >= 0
  before = info.token_turn[:, None, :] < jnp.arange(k1)[None, :, None]  # [N, K + 1, T]
  hist_len = jnp.sum(real[:, None, :] & before, axis=2, dtype=jnp.int32)  # [N, K + 1]
  pos = jnp.arange(t + a)[None, None, :]
  rel = pos - hist_len[:, :, None]  # position within the answer
  comp = jnp.concatenate([ro.completion_ids.astype(jnp.int32), jnp.zeros((n, a), jnp.int32)], 1)
  ans = jnp.take_along_axis(jnp.broadcast_to(aids[:, None, :], (n, k1, a)),
                            jnp.clip(rel, 0, a - 1), axis=2)
  is_hist = pos < hist_len[:, :, None]
  is_ans = (rel >= 0) & (rel < alen[:, None, None])
  ids = jnp.where(is_hist, comp[:, None, :], jnp.where(is_ans, ans, 0))
  logps, _ = models_lib.completion_logps(
      model, params, ro.prompt_ids[::group_size], ro.prompt_mask[::group_size],
      ids.reshape(n * k1, t + a), (is_hist | is_ans).reshape(n * k1, t + a),
      group_size=group_size * k1, vocab_limit=vocab_limit)
  lp = jnp.sum(jnp.where(is_ans, logps.reshape(n, k1, t + a), 0.0), axis=2)
  return jax.lax.stop_gradient(jnp.exp(lp / jnp.maximum(alen, 1)[:, None]))


ENV_REWARD_KEY = "env_reward"


def with_env_reward(extras: Mapping[str, jax.Array], info: TurnInfo,
                    key: str = ENV_REWARD_KEY) -> Dict[str, jax.Array]:
  """`extras` plus the trajectory reward under `key`, for `env_reward` in the score phase."""
  return dict(extras, **{key: info.reward})


def env_reward(key: str = ENV_REWARD_KEY):
  """A reward function returning the environment's trajectory reward from `extras[key]`
  (put there by `with_env_reward`), to combine with other reward functions."""
  def fn(prompt_ids, completion_ids, completion_mask, extras):
    del prompt_ids, completion_mask
    if key not in extras:
      raise ValueError(f"env_reward reads extras[{key!r}]; add it with "
                       "multiturn.with_env_reward(extras, turn_info)")
    r = jnp.asarray(extras[key], jnp.float32)
    if r.shape != completion_ids.shape[:1]:
      raise ValueError(f"extras[{key!r}] has shape {r.shape}, expected "
                       f"[{completion_ids.shape[0]}]")
    return r
  return fn


__all__ = ["TurnInfo", "rollout_multiturn", "estimate", "answer_probs", "step_inputs", "TURN_INPUTS",
           "STEP_INPUTS", "env_reward", "with_env_reward", "ENV_REWARD_KEY"]
