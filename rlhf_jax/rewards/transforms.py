"""Reward transforms of the online step's score phase (`config.reward_shaping`).

    config.reward_shaping = ("spo_win_rate", dict(name="noisy_verifier", rho0=0.1, rho1=0.2))

Each transform maps the reward functions' outputs side by side, `each [N, K]` (N = prompts
x G samples, K rewards), to new columns `[N, K']`; transforms apply in order, then the
columns are weighted and summed (`rl.reward_weights`, default all 1) or go to
constrained RLHF. Every transform is registered with its declaration: `needs` are inputs
the step provides ("group_size"; "ref_rewards" [N, M, K], the rewards of M samples of the
reference policy for the same prompt, which the step then decodes and scores;
"answer_logps" / "answer_mask" [N, A], the sampling policy's token log-probs of the
prompt's reference answer (+ EOS) written after each completion, which the step then
computes; "prompt_free_logps" [N, T], the policy's log-probs of each completion without
its prompt, with the sampler's `completion_logps` / `completion_mask` [N, T]), `state` a
factory `state(num_rewards=K) -> (init, update)` for a transform that keeps state (the
step keeps it in `RLState.shaping_state` and passes the current one as `state=`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import check_nonnegative, check_unit_interval
from rlhf_jax.losses.preference_online import spo_rewards
from rlhf_jax.registry import Registry
from rlhf_jax.rewards import ensemble as ensemble_lib
from rlhf_jax.rewards import shaping as shaping_lib
from rlhf_jax.rewards import shaping_state

REGISTRY = Registry("reward transform")
register = REGISTRY.register
get = REGISTRY.get
declaration = REGISTRY.declaration
STEP_INPUTS = ("group_size", "ref_rewards", "answer_logps", "answer_mask", "prompt_free_logps",
               "completion_logps", "completion_mask")
MODEL_INPUTS = ("answer_logps", "prompt_free_logps")  # inputs that cost the step a model pass


def names():
  return list(REGISTRY.names())


def _columns(columns: Optional[Sequence[int]], k: int, name: str) -> tuple:
  cols = tuple(range(k)) if columns is None else tuple(int(c) for c in columns)
  bad = [c for c in cols if not 0 <= c < k]
  if bad or not cols:
    raise ValueError(f"reward_shaping {name!r}: columns={list(cols)} must name reward columns "
                     f"0..{k - 1} (the config's rewards, in order)")
  return cols


def _grouped(x, g):
  return x.reshape((x.shape[0] // g, g) + x.shape[1:])


@register("ensemble", family="combine")
def ensemble(each, *, mode: str = "mean", coef: float = 0.1, columns=None):
  """Reward-model ensembles: the `columns` (default all) become one reward, first.

  mean: (1/K) Σ_k r_k;  wco: min_k r_k;  uwo: mean_k r_k − λ Var_k r_k (λ = `coef`).
  Paper: Reward Model Ensembles Help Mitigate Overoptimization (Coste et al., 2024).
  Shapes: [N, K] -> [N, 1 + K − |columns|].
  """
  cols = _columns(columns, each.shape[1], "ensemble")
  fns = {"mean": ensemble_lib.mean, "wco": ensemble_lib.wco,
         "uwo": lambda r: ensemble_lib.uwo(r, coef=coef)}
  if mode not in fns:
    raise ValueError(f"reward_shaping 'ensemble': mode={mode!r} is unknown; choose one of "
                     f"{', '.join(fns)}")
  combined = fns[mode](each[:, jnp.asarray(cols)])
  rest = [c for c in range(each.shape[1]) if c not in cols]
  return jnp.concatenate([combined[:, None], each[:, jnp.asarray(rest, jnp.int32)]], axis=1)


@register("lsc", family="reference", needs=("ref_rewards",))
def lsc(each, *, ref_rewards, quantile: float = 0.85):
  """Log-sigmoid centring: u_k = log σ(r_k − r_ref,k), r_ref,k the `quantile` (85th
  percentile) of the reference policy's rewards for the same prompt; the weighted sum of
  the columns is then the paper's Σ_k log σ(r_k − r_ref,k) combination (a soft AND).

  Paper: Transforming and Combining Rewards for Aligning LLMs (Wang et al., 2024).
  Shapes: each [N, K], ref_rewards [N, M, K] -> [N, K].
  """
  check_unit_interval("lsc", quantile=quantile)
  r_ref = shaping_lib.lsc_reference(ref_rewards, quantile=quantile, axis=1)   # [N, K]
  return shaping_lib.lsc(each, jax.lax.stop_gradient(r_ref))


@register("par", family="reference", needs=("ref_rewards",))
def par(each, *, ref_rewards):
  """Preference As Reward: r_k ← (1/M) Σ_m σ(r_k − r_ref,m,k) over the reference policy's
  M samples for the same prompt (bounded in (0, 1), centred on the reference).

  Paper: Reward Shaping to Mitigate Reward Hacking in RLHF (Fu et al., 2025).
  Shapes: each [N, K], ref_rewards [N, M, K] -> [N, K].
  """
  return jnp.mean(jax.nn.sigmoid(each[:, None, :] - ref_rewards), axis=1)


@register("reference_logprob", family="model", needs=("answer_logps", "answer_mask"))
def reference_logprob(each, *, answer_logps, answer_mask, normalize: bool = True):
  """Appends the log-prob of the prompt's reference answer y* after each completion y:
  r = (1/|y*|) Σ_t log π(y*_t | x, y, y*_<t) (the sum with `normalize=False`), as column K.

  The follow-up / reference-answer likelihood reward (FLR: Zhang et al., 2024, "Aligning
  Language Models Using Follow-up Likelihood as Reward Signal"; verifier-free RL scores a
  reasoning trace by the likelihood it gives the reference answer). π is the sampling
  policy, y's EOS is dropped and y* ends with EOS; no gradient flows through r. Weight
  the new column with `rl.reward_weights`. Shapes: each [N, K], answer_* [N, A] ->
  [N, K + 1].
  """
  r = shaping_lib.reference_logprob_reward(answer_logps, answer_mask, normalize=normalize)
  return jnp.concatenate([each, jax.lax.stop_gradient(r)[:, None]], axis=1)


@register("sar", family="model",
          needs=("completion_logps", "prompt_free_logps", "completion_mask"))
def sar(each, *, completion_logps, prompt_free_logps, completion_mask):
  """Appends the self-aligned reward SAR = (PPL(y) − PPL(y | x)) / PPL(y) as column K:
  the relative drop in the completion's perplexity from conditioning on the prompt
  (PPL = exp(−mean_t log π); PPL(y) from the policy run on the completion alone, whose
  first token has no context and is left out of both means).

  "Self-Aligned Reward: Towards Effective and Efficient Reasoners" (2025) [form from the
  library's `relative_perplexity_reward`]. Shapes: each [N, K], the rest [N, T] -> [N, K + 1].
  """
  mask = completion_mask.astype(jnp.float32).at[:, 0].set(0.0)
  r = shaping_lib.relative_perplexity_reward(completion_logps, prompt_free_logps, mask)
  return jnp.concatenate([each, jax.lax.stop_gradient(r)[:, None]], axis=1)


@register("noisy_verifier", family="correction")
def noisy_verifier(each, *, rho0: float = 0.0, rho1: float = 0.0, columns=(0,)):
  """Backward correction of noisy binary verifiers: R̂ = (R̃ − ρ0)/(1 − ρ0 − ρ1) on `columns`.

  ρ0 = P(R̃=1 | R=0), ρ1 = P(R̃=0 | R=1); E[R̂ | R] = R. Paper: Reinforcement Learning
  with Verifiable yet Noisy Rewards under Imperfect Verifiers (Cai et al., 2025).
  Shapes: [N, K] -> [N, K].
  """
  cols = jnp.asarray(_columns(columns, each.shape[1], "noisy_verifier"))
  fixed = shaping_lib.noisy_backward_correction(each[:, cols], rho0=rho0, rho1=rho1)
  return each.at[:, cols].set(fixed)


@register("spo_win_rate", family="group", needs=("group_size",))
def spo_win_rate(each, *, group_size: int, temperature: float = 0.0):
  """Self-play win-rates: r_i ← (1/(G−1)) Σ_{j≠i} P(y_i ≻ y_j) within each prompt's group,
  per column, with P = σ((r_i − r_j)/T) (T > 0) or 1[r_i > r_j] + ½·1[r_i = r_j] (T = 0).

  Paper: A Minimaximalist Approach to RLHF (Swamy et al., 2024), "SPO"; the preference
  function here is the configured reward's comparison. Shapes: [N, K] -> [N, K].
  """
  check_nonnegative("spo_win_rate", temperature=temperature)
  r = _grouped(each, group_size).transpose(0, 2, 1)                  # [B, K, G]
  d = r[..., :, None] - r[..., None, :]                               # [B, K, G, G]
  p = (jax.nn.sigmoid(d / temperature) if temperature > 0
       else (d > 0).astype(each.dtype) + 0.5 * (d == 0).astype(each.dtype))
  b, k, g = r.shape
  pm = p.reshape(b * k, g, g)
  wins = spo_rewards(pm, jnp.ones((b * k, g), bool)).reshape(b, k, g)
  return wins.transpose(0, 2, 1).reshape(each.shape)


class _Weights(NamedTuple):
  init: Callable[[], Any]
  update: Callable[[Any, jax.Array], Any]


def _dynamic_weights_state(*, num_rewards: int, lr: float = 0.1, min_weight: float = 0.0):
  dw = shaping_state.dynamic_reward_weights(num_rewards, lr=lr, min_weight=min_weight)
  # The signal: minus each objective's batch mean, so lagging objectives gain weight.
  return _Weights(dw.init, lambda st, each: dw.update(st, -jnp.mean(each, axis=0)))


@register("dynamic_weights", family="combine", state=_dynamic_weights_state)
def dynamic_weights(each, *, state, lr: float = 0.1, min_weight: float = 0.0):
  """Dynamic reward weighting: one column r·w, w on the simplex moved by exponentiated
  gradient after every step with the signal s_k = −mean_batch r_k (objectives that score
  lower gain weight) [choice: the paper adapts w by hypervolume or gradient signals].

  Paper: Learning to Optimize Multi-Objective Alignment Through Dynamic Reward Weighting
  (2025). `state`: the current weights (`RLState.shaping_state`). Shapes: [N, K] -> [N, 1].
  """
  del lr, min_weight  # used by the state's update
  return (each @ state.weights)[:, None]


class Shaping(NamedTuple):
  """The configured chain: ((name, kwargs), ...) with kwargs as sorted tuples (hashable)."""
  steps: tuple

  @classmethod
  def from_config(cls, specs) -> "Shaping":
    out = []
    for i, spec in enumerate(specs or ()):
      if isinstance(spec, str):
        name, kwargs = spec, {}
      elif hasattr(spec, "get") and "name" in spec:
        kwargs = {k: v for k, v in dict(spec).items() if k != "name"}
        name = spec["name"]
      else:
        raise ValueError(f"reward_shaping[{i}]={spec!r}: give a name or dict(name=..., "
                         f"<hyper-parameters>); transforms: {', '.join(names())}")
      if name not in REGISTRY:
        raise ValueError(f"reward_shaping[{i}]: unknown transform {name!r}; choose one of "
                         f"{', '.join(names())}")
      kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
      declaration(name).check_kwargs(kwargs, key=f"reward_shaping[{i}] ({name})")
      out.append((name, tuple(sorted(kwargs.items()))))
    return cls(tuple(out))

  @property
  def needs(self) -> frozenset:
    return frozenset(n for name, _ in self.steps for n in declaration(name).needs)

  def init(self, num_rewards: int):
    """The states of the stateful transforms (a tuple, None per stateless one), or None."""
    states, k = [], num_rewards
    for name, kwargs in self.steps:
      decl = declaration(name)
      states.append(None if decl.state is None
                    else decl.state(num_rewards=k, **dict(kwargs)).init())
      k = jax.eval_shape(
          lambda e, n=name, kw=kwargs, st=states[-1]: _call(
              n, kw, e, 1, _placeholders(e), st),
          jax.ShapeDtypeStruct((2, k), jnp.float32)).shape[1]
    return tuple(states) if any(s is not None for s in states) else None

  def __call__(self, each, *, group_size: int, ref_rewards=None, state=None, inputs=None):
    """(transformed each [N, K'], new state); `inputs`: the other declared inputs by name."""
    inputs = dict(inputs or {}, ref_rewards=ref_rewards)
    new_states = []
    for i, (name, kwargs) in enumerate(self.steps):
      decl = declaration(name)
      st = None if state is None else state[i]
      if decl.state is not None and st is None:
        raise ValueError(f"reward_shaping {name!r} keeps state: build the RL state with "
                         "online.init_state(..., reward_shaping=<the same transforms>, "
                         "num_rewards=K)")
      out = _call(name, kwargs, each, group_size, inputs, st)
      if decl.state is not None:  # advanced with this step's rewards, used from the next
        st = decl.state(num_rewards=each.shape[1], **dict(kwargs)).update(st, each)
      new_states.append(st)
      each = out
    return each, (None if state is None else tuple(new_states))


def _placeholders(each):
  """Zeros for every declared input (shape inference of the columns a transform returns)."""
  n = each.shape[0]
  return {"ref_rewards": jnp.zeros((n, 1, each.shape[1])), "answer_mask": jnp.ones((n, 1)),
          **{k: jnp.zeros((n, 1)) for k in ("answer_logps", "prompt_free_logps",
                                             "completion_logps", "completion_mask")}}


def _call(name, kwargs, each, group_size, inputs, state):
  decl = declaration(name)
  inputs = dict(inputs, group_size=group_size)
  args = dict(kwargs)
  for n in decl.needs:
    if inputs.get(n) is None:
      raise ValueError(f"reward_shaping {name!r} needs {n!r}, which this step did not "
                       "provide (the online step provides it when the transform is in "
                       "config.reward_shaping)")
    args[n] = inputs[n]
  if decl.state is not None:
    args["state"] = state
  out = get(name)(each, **args)
  if out.ndim != 2 or out.shape[0] != each.shape[0]:
    raise ValueError(f"reward_shaping {name!r} returned shape {out.shape}; expected "
                     f"[{each.shape[0]}, K']")
  return out
