"""Reward functions, verifiers and reward shaping.

A reward function is `fn(prompt_ids [N, P], completion_ids [N, T],
completion_mask [N, T], batch_extras) -> [N]` (or `[N, K]`); see `base`.
`registry` builds the entries of `config.rewards` (built-ins in `builtin`, see
docs/rewards.md). Submodules: `verifiers` (pure-jnp), `callback` (Python checks via
`jax.pure_callback`), `judge` (prompted LM judge), `ensemble`, `shaping`,
`shaping_state`, `starc`.
"""

from rlhf_jax.rewards.base import RewardFn, combine, from_model, reward_model  # noqa: F401
from rlhf_jax.rewards import ensemble, shaping, shaping_state, starc, verifiers  # noqa: F401
from rlhf_jax.rewards import callback, judge  # noqa: F401
from rlhf_jax.rewards import builtin, registry  # noqa: F401
from rlhf_jax.rewards.registry import (Reward, RewardContext, RewardDecl, RewardError,  # noqa: F401
                                       build_rewards, decl, register, register_text_scorer,
                                       text_scorer)
