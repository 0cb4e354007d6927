"""The online RL step's state: `RLState` and `init_state` (re-exported by
`rlhf_jax.train.online`)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import guards
from rlhf_jax import models as models_lib
from rlhf_jax.rewards import transforms
from rlhf_jax.train import knapsack as knapsack_lib
from rlhf_jax.train.rl_config import RLSettings


@flax.struct.dataclass
class RLState:
  """Everything one RL update reads and writes (a pytree; donated to the step).

  ref_params: the reference policy: fixed, or a lagged / EMA copy of the policy
    (`rl.ref_update_every` / `rl.ref_ema_decay`, `rlhf_jax.train.reference`).
  value_params / value_opt_state: the PPO value model (None without one).
  kl_state: the KL controller state (`rlhf_jax.losses.kl` controllers).
  adv_state: estimator state such as BNPO moments (None when stateless).
  reward_state: constrained RLHF's Lagrange multipliers (None without constraints).
  guard: `guards.NonFiniteState` counting skipped (non-finite) updates.
  iterate_params: the kept iterate π_t of online preference methods (INPO;
    `rl.iterate_every`), None otherwise.
  shaping_state: the state of stateful reward transforms (`config.reward_shaping`).
  alloc_state: Knapsack RL's success rate per dataset record (`rl.knapsack`,
    `rlhf_jax.train.knapsack.AllocState`), None otherwise.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ref_params: Any
  kl_state: Any
  rng: jax.Array
  value_params: Any = None
  value_opt_state: Any = None
  adv_state: Any = None
  guard: Any = None
  reward_state: Any = None
  iterate_params: Any = None
  shaping_state: Any = None
  alloc_state: Any = None


def init_state(params, optimizer: optax.GradientTransformation, rng: jax.Array,
               settings: RLSettings, *, ref_params=None, value_params=None,
               value_optimizer: Optional[optax.GradientTransformation] = None,
               adv_state=None, unroll_layers: bool = True, reward_shaping=None,
               num_rewards: int = 1, num_records: Optional[int] = None) -> RLState:
  """Builds the initial `RLState`; the reference defaults to a copy of `params`.

  `reward_shaping` (a `transforms.Shaping` or `config.reward_shaping` specs) and
  `num_rewards` (the reward columns K) initialise the state of stateful reward transforms.
  `num_records` (the training records `record_index` points into) sizes Knapsack RL's
  success-rate table (`rl.knapsack`).

  With `unroll_layers` (the default) decoder params and the reference are kept per layer
  (`models.unstack_layers`): the sampler, the reference pass and the gradient then read
  each layer's weights in place instead of slicing a stacked array inside every decode
  step and layer loop. Unrolling makes compilation grow with depth; with
  `unroll_layers=False` they stay stacked (`models.stack_layers`, the checkpoint / Hugging
  Face layout) and the reference and training passes scan over the layers: for a 24-layer
  model (hidden 128) on 2 CPU cores, compilation 25 -> 14 s and a 25% slower step. The
  sampler unrolls the layers in both cases.
  """
  kl_controller = settings.kl_controller()
  dual = settings.reward_constraints()
  if adv_state is None:
    adv_state = settings.initial_adv_state()
  layout = models_lib.unstack_layers if unroll_layers else models_lib.stack_layers
  params = _with_layout(params, layout)
  ref = (settings.reference_update().init(params) if ref_params is None
         else _with_layout(ref_params, layout))
  iterate = settings.iterate_update()
  if settings.knapsack and not num_records:
    raise ValueError("rl.knapsack keeps a success rate per training record: pass "
                     "init_state(..., num_records=<the number of training records>)")
  vopt = None
  if value_params is not None:
    if value_optimizer is None:
      raise ValueError("value_params were given without a value_optimizer")
    vopt = value_optimizer.init(value_params)
  return RLState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                 ref_params=ref, kl_state=kl_controller.init(), rng=rng,
                 value_params=value_params, value_opt_state=vopt, adv_state=adv_state,
                 reward_state=None if dual is None else dual.init(),
                 iterate_params=None if iterate is None else iterate.init(params),
                 shaping_state=as_shaping(reward_shaping).init(num_rewards),
                 alloc_state=knapsack_lib.init(num_records) if settings.knapsack else None,
                 guard=jax.tree.map(jnp.copy, guards.nonfinite_init(window=1)))  # window=1: orbax
  # cannot save size-0 arrays; copies: distinct (donatable) buffers


def as_shaping(reward_shaping) -> transforms.Shaping:
  if isinstance(reward_shaping, transforms.Shaping):
    return reward_shaping
  return transforms.Shaping.from_config(reward_shaping)


def _with_layout(params, layout):
  if isinstance(params, Mapping) and "layers" in params:
    return layout(params)
  return params
