"""Flax decoder models, heads, and weight I/O."""

from rlhf_jax.models.axes import axes_for_path, logical_axes
from rlhf_jax.models.config import (
    SUPPORTED_MODEL_TYPES,
    DecoderConfig,
    config_from_hf,
    config_to_hf,
)
from rlhf_jax.models.attention import BACKENDS as ATTENTION_BACKENDS
from rlhf_jax.models.decoder import REMAT_POLICIES, Decoder, KVCache, last_index
from rlhf_jax.models.hf_io import load_hf, save_hf
from rlhf_jax.models.gguf import load_gguf
from rlhf_jax.models.logps import completion_logps, logps_from_hidden, token_logps
from rlhf_jax.models.model import (
    Model,
    RewardModel,
    ValueModel,
    check_token_ids,
    from_config,
    prefill_groups,
    stack_layers,
    unstack_cache,
    unstack_layers,
)
from rlhf_jax.models import attention, lora  # noqa: E402  (lora uses save_hf)

__all__ = [
    "SUPPORTED_MODEL_TYPES", "DecoderConfig", "config_from_hf", "config_to_hf",
    "Decoder", "KVCache", "last_index", "Model", "RewardModel", "ValueModel", "check_token_ids",
    "from_config", "load_hf", "load_gguf", "save_hf", "token_logps", "completion_logps",
    "logps_from_hidden", "logical_axes", "axes_for_path", "prefill_groups", "stack_layers", "unstack_cache",
    "unstack_layers", "attention", "lora", "ATTENTION_BACKENDS", "REMAT_POLICIES",
]
