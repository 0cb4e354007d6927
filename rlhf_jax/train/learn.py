"""The learn phase: epochs x minibatches x micro-batches of the declared objective.

    objective = make_objective(model, settings, value_model=None)
    loss, aux = objective(params, value_params, minibatch, normalizer, beta)
    carry, aux = learn(objective, settings, optimizer, value_optimizer, carry, data, rng)

The objective is the per-token surrogate (a registered policy-gradient loss) plus
β·KL to the reference (unless the KL is in the reward) minus the entropy bonus,
aggregated with `settings.aggregation` under a global normaliser, plus the clipped
value loss with a value model. `learn` runs `settings.epochs` passes over the sampled
data, each shuffled into `settings.num_minibatches` minibatches (one optimiser update
each), each accumulated over `settings.micro_batches` (the update does not depend on
the split). An update whose loss or gradient is non-finite is skipped, and so is every
later update of the step.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import guards
from rlhf_jax import losses as losses_lib
from rlhf_jax.losses import aggregate as aggregate_lib
from rlhf_jax.losses import policy_gradient as pg_lib
from rlhf_jax.train.policy_passes import completion_logits, completion_logps
from rlhf_jax.train.rl_config import RLSettings


class Trainable(NamedTuple):
  """What the learn phase updates; `ok` turns False at the first non-finite update."""
  params: Any
  value_params: Any
  opt_state: Any
  value_opt_state: Any
  ok: jax.Array


def make_objective(model, settings: RLSettings, value_model=None, *,
                   policy_logps: Optional[Callable] = None, value_fn: Optional[Callable] = None,
                   vocab_limit: Optional[int] = None):
  """Returns `objective(params, value_params, mb, normalizer, beta) -> (loss, aux)`.

  mb: {"ids", "attn" [n, P + T], "mask", "old_logps", "ref_logps" [n, T],
  "advantages" [n] or [n, T], and with a value model "old_values", "returns" [n, T],
  "prompt_len" (static int)}.
  A surrogate that declares "vocab_mean_log_ratio" (ROVER) gets the vocabulary mean of
  log π_θ − log π_old at each position [n, T] (stop-gradient): the policy pass then also
  returns mean_v log π_θ(v|·), and `mb["old_vocab_mean_logps"]` holds the old policy's
  (absent: the data trains in one update, where θ = θ_old and the ratio is 0).
  policy_logps(params, mb) -> (logps, entropy[, vocab mean]) [n, T] and value_fn(value_params, mb) ->
  values [n, T] default to the completion positions of `model` / `value_model`;
  `vocab_limit` (the sampler's `SamplingConfig.vocab_limit`) restricts the default
  policy log-probs to the real vocabulary, so they equal the sampler's.
  """
  surrogate = losses_lib.get(settings.surrogate)
  surrogate_kwargs = dict(settings.surrogate_kwargs)
  if value_fn is None and value_model is not None:
    value_fn = lambda vp, mb: value_model.apply(  # noqa: E731
        vp, mb["ids"], attention_mask=mb["attn"])[:, mb["prompt_len"] - 1:-1]
  if settings.value_based:
    return _value_based_objective(model, settings, value_fn, vocab_limit)
  vocab_mean = surrogate_vocab_mean(settings)
  kl_fn = losses_lib.get(settings.kl_estimator)
  # Minibatches keep whole groups only when the batch is not shuffled into several.
  # Whole groups of G rows share their prompt (not with Knapsack RL's ragged groups).
  group = settings.group_size if settings.num_minibatches == 1 and not settings.knapsack else 1
  if policy_logps is None:
    policy_logps = lambda params, mb: completion_logps(  # noqa: E731
        model, params, mb["ids"], mb["attn"], mb["prompt_len"], group, vocab_limit,
        vocab_mean=vocab_mean)

  def objective(params, value_params, mb, normalizer, beta):
    outs = policy_logps(params, mb)
    lp, ent = outs[0], outs[1]
    mask = mb["mask"]
    inputs = {}
    if vocab_mean:
      if len(outs) < 3:
        raise ValueError(f"rl.surrogate={settings.surrogate!r} needs the vocabulary-mean "
                         "log-probs: policy_logps must return (logps, entropy, vocab_mean)")
      vm = jax.lax.stop_gradient(outs[2])
      old = mb.get("old_vocab_mean_logps")
      inputs["vocab_mean_log_ratio"] = jnp.zeros_like(vm) if old is None else vm - old
    pg, extras = surrogate(lp, mb["old_logps"], mb["advantages"], mask, **inputs,
                           **surrogate_kwargs)
    kl, agg, loss = _regularised(settings, kl_fn, pg, lp, ent, mb, normalizer, beta)
    aux = {"pg_loss": agg(pg), "kl": agg(jax.lax.stop_gradient(kl)),
           "entropy": agg(jax.lax.stop_gradient(ent)),
           "clip_fraction": agg(extras.clipped.astype(jnp.float32))}
    if value_fn is not None:
      values = value_fn(value_params, mb)
      vl, _ = pg_lib.value_loss(
          values, mb["old_values"], mb["returns"], mask, clip_range=settings.value_clip)
      aux["value_loss"] = agg(vl)
      loss = loss + settings.value_coef * aux["value_loss"]
    aux["loss"] = loss
    return loss, aux
  return objective


def _regularised(settings: RLSettings, kl_fn, per_token, lp, ent, mb, normalizer, beta):
  """(kl [n, T], the aggregation, the loss): the surrogate's per-token loss + β·KL to the
  reference (unless the KL is in the reward) − the entropy bonus, aggregated under the
  minibatch's normaliser."""
  mask = mb["mask"]
  kl = kl_fn(lp, mb["ref_logps"], mask)
  if not settings.kl_in_reward:
    per_token = per_token + beta * kl
  if settings.entropy_coef:
    per_token = per_token - settings.entropy_coef * ent
  agg = lambda x: aggregate_lib.aggregate(x, mask, mode=settings.aggregation,  # noqa: E731
                                          normalizer=normalizer)
  return kl, agg, agg(per_token)


def _value_based_objective(model, settings: RLSettings, value_fn, vocab_limit):
  """B-Coder's objective: the value-based surrogate on the policy's logits (the Q function's
  advantage part) and the value model (V), with the reference's logits as the frozen LM of
  the conservative target; + β·KL − entropy bonus as for the policy-gradient surrogates.

  mb additionally holds "token_rewards" [n, T] (`Signals.token_rewards`) and
  "frozen_logits" [n, T, V] (`Signals.ref_logits`). The value model trains through the
  surrogate's TD loss (no clipped PPO value loss).
  """
  surrogate = losses_lib.get(settings.surrogate)
  surrogate_kwargs = dict(settings.surrogate_kwargs)
  if value_fn is None:
    raise ValueError(f"rl.surrogate={settings.surrogate!r} learns Q(s, a) = α(ℓ − max ℓ) + V(s): "
                     "it needs a value model for V (config.value = dict(optim=None), or "
                     "make_update(..., value_model=...))")
  kl_fn = losses_lib.get(settings.kl_estimator)

  def objective(params, value_params, mb, normalizer, beta):
    p = mb["prompt_len"]
    logits = completion_logits(model, params, mb["ids"], mb["attn"], p, vocab_limit)
    actions, mask = mb["ids"][:, p:], mb["mask"]
    values = value_fn(value_params, mb)
    q_loss, extras = surrogate(logits, values, actions, mb["token_rewards"], mask,
                               frozen_logits=mb["frozen_logits"], **surrogate_kwargs)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    lp = jnp.take_along_axis(logp_all, actions[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    kl, agg, loss = _regularised(settings, kl_fn, q_loss, lp, ent, mb, normalizer, beta)
    sg = jax.lax.stop_gradient
    aux = {"pg_loss": agg(q_loss), "kl": agg(sg(kl)), "entropy": agg(sg(ent)),
           "clip_fraction": jnp.zeros((), jnp.float32), "td_loss": agg(extras.td_loss),
           "value_loss": agg(extras.td_loss), "loss": loss}
    return loss, aux
  return objective


def surrogate_vocab_mean(settings: RLSettings) -> bool:
  """Whether the surrogate declares the vocabulary-mean log-ratio (ROVER); raises
  ValueError for any other declared input, which the learn phase does not compute."""
  if settings.value_based:
    return False
  needs = losses_lib.declaration(settings.surrogate).needs
  unknown = [n for n in needs if n != "vocab_mean_log_ratio"]
  if unknown:
    raise ValueError(f"rl.surrogate={settings.surrogate!r} needs {unknown}, which the learn "
                     "phase does not compute; choose another surrogate")
  return "vocab_mean_log_ratio" in needs


def old_vocab_mean_needed(settings: RLSettings) -> bool:
  """The old policy's vocabulary-mean log-probs are needed when the surrogate reads the
  ratio and the data trains in more than one update (after the first, θ ≠ θ_old)."""
  return surrogate_vocab_mean(settings) and settings.epochs * settings.num_minibatches > 1


def scan(f, carry, xs):
  """`lax.scan`, or a direct call when there is one step (no loop, nothing to accumulate)."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    carry, y = f(carry, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda v: v[None], y)
  return jax.lax.scan(f, carry, xs)


def apply_if(ok, optimizer, grads, opt_state, params):
  """`(params, opt_state)` after one optimiser update if `ok`, else unchanged."""
  def apply(operands):
    grads, opt_state, params = operands
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return jax.lax.cond(ok, apply, lambda o: (o[2], o[1]), (grads, opt_state, params))


def gradients(objective, micro_batches: int, params, value_params, mb, normalizer, beta):
  """Sums the gradients (and aux) of `micro_batches` slices of the minibatch `mb`."""
  grad_fn = jax.grad(objective, argnums=(0, 1), has_aux=True)
  prompt_len = mb["prompt_len"]
  k = micro_batches
  micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]),
                       {kk: v for kk, v in mb.items() if kk != "prompt_len"})

  def accumulate(acc, m):
    (gp, gv), aux = grad_fn(params, value_params, dict(m, prompt_len=prompt_len), normalizer,
                            beta)
    return jax.tree.map(jnp.add, acc, (gp, gv, aux)), None

  zeros = jax.tree.map(jnp.zeros_like, (params, value_params))
  first = dict(jax.tree.map(lambda x: x[0], micro), prompt_len=prompt_len)
  aux0 = jax.eval_shape(lambda: grad_fn(params, value_params, first, normalizer, beta)[1])
  aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
  (gp, gv, aux), _ = scan(accumulate, (*zeros, aux0), micro)
  return gp, gv, aux


def learn(objective, settings: RLSettings, optimizer: optax.GradientTransformation,
          value_optimizer: Optional[optax.GradientTransformation], carry: Trainable,
          data: Dict[str, jax.Array], prompt_len: int, beta: jax.Array, rng: jax.Array,
          normalizer: Optional[Callable] = None):
  """The learn phase. Returns `(carry, aux)`, aux stacked [epochs, minibatches].

  `normalizer(mb)`: the denominator of the minibatch's loss, shared by its micro-batches
  (default: `aggregate.global_normalizer` of the token mask under `settings.aggregation`).
  """
  nmb = settings.num_minibatches
  n = data["ids"].shape[0]
  has_value = carry.value_params is not None

  def minibatch_update(c: Trainable, mb):
    """One optimiser update; skipped (params and optimiser state kept) when non-finite."""
    denom = (aggregate_lib.global_normalizer(mb["mask"], mode=settings.aggregation)
             if normalizer is None else normalizer(mb))
    mb = dict(mb, prompt_len=prompt_len)
    gp, gv, aux = gradients(objective, settings.micro_batches, c.params, c.value_params, mb,
                            denom, beta)
    aux["grad_norm"] = optax.tree.norm(gp)
    # Any non-finite gradient makes the global norm non-finite. Once anything in the step
    # (rewards included) was non-finite, no later update is applied either.
    ok = c.ok & guards.is_finite_tree((aux, optax.tree.norm(gv) if gv is not None else 0.0))
    # A conditional, not a select: the usual (finite) path writes the update in place.
    params, opt_state = apply_if(ok, optimizer, gp, c.opt_state, c.params)
    value_params, value_opt_state = c.value_params, c.value_opt_state
    if has_value:
      value_params, value_opt_state = apply_if(ok, value_optimizer, gv, value_opt_state,
                                               value_params)
    return Trainable(params, value_params, opt_state, value_opt_state, ok), aux

  def epoch(c, e):
    if nmb == 1:
      shuffled = jax.tree.map(lambda x: x[None], data)
    else:
      perm = jax.random.permutation(jax.random.fold_in(rng, e), n)
      shuffled = jax.tree.map(lambda x: x[perm].reshape((nmb, n // nmb) + x.shape[1:]), data)
    return scan(minibatch_update, c, shuffled)

  return scan(epoch, carry, jnp.arange(settings.epochs))
