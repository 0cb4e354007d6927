"""Pure-function losses over arrays, and the name registry configs use.

`get(name)` returns a loss function; `names(family=None)` lists registered
names (families: "preference", "policy_gradient", "reward_model", "kl", "value").
"""

from rlhf_jax.losses.registry import REGISTRY, declaration, get, names, register
from rlhf_jax.losses.common import masked_mean, masked_sum

# Importing the modules registers their functions.
# pylint: disable=g-bad-import-order,unused-import
from rlhf_jax.losses import policy_gradient, kl, aggregate  # noqa: F401,E402
from rlhf_jax.losses import reward_model  # noqa: F401
from rlhf_jax.losses import preference, preference_aux, preference_online, preference_list  # noqa: F401,E402
from rlhf_jax.losses import value_based  # noqa: F401,E402
