"""LoRA in the online RL step: only the adapters train; the reference is the base model.

    config.lora = dict(rank=8, alpha=16, targets=("q_proj", "v_proj"), export="peft")

With `config.lora` the `RLState` of `rlhf_jax.train.online` holds

  params     = {"lora": adapters}   the only leaves `jax.grad` differentiates and the
                                    optimiser keeps state for (`rlhf_jax.models.lora`);
  ref_params = the base weights     the frozen base AND the fixed reference policy (the
                                    policy with adapters off): one copy serves both.

The policy is the base with the adapters attached (`lora.attach`: x W + (x A)(alpha / r · B)
on every target kernel, the same function as merging W + alpha / r * A @ B): the sampler
decodes from it and the learn phase differentiates the objective through it with respect
to the adapters only (`wrap_objective`). No merged copy of the target kernels exists in
the step; `sample_merged=True` has the sampler decode from merged kernels instead (fewer,
larger matmuls per token, at the memory of one copy of every target kernel). Fresh
adapters have B = 0, so the first policy equals the base model. A moving reference
(`rl.ref_update_every`, `rl.ref_ema_decay`) is rejected: the reference is the base.

Targets: transformers module names ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
"up_proj", "down_proj") or rlhf_jax kernel names ("q_kernel", ...), as
`lora.resolve_targets` accepts; a name the model does not have is a ValueError listing the
valid ones. `export`: at the end of training write the adapters in PEFT's layout
(`<workdir>/lora_adapter`, "peft"), the merged model as transformers safetensors
(`<workdir>/lora_merged`, "merged"), "both", or nothing (None).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Optional, Tuple

import jax

from rlhf_jax.models import lora as lora_lib

KEY = "lora"
EXPORTS = (None, "peft", "merged", "both")
KEYS = ("rank", "alpha", "targets", "export", "init_seed", "sample_merged")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What `config.lora` sets: rank r, alpha, target kernel names, the export, the seed,
  and whether the sampler decodes from merged kernels."""
  rank: int = 8
  alpha: float = 16.0
  targets: Tuple[str, ...] = ("q_kernel", "v_kernel")
  export: Optional[str] = None
  init_seed: int = 0
  sample_merged: bool = False


def from_config(config, model, settings=None) -> Optional[LoraSpec]:
  """`config.lora` checked against the model (None when unset). Each bad value is named."""
  cfg = config.get("lora") if hasattr(config, "get") else None
  if not cfg:
    return None
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  unknown = sorted(set(cfg) - set(KEYS))
  if unknown:
    raise ValueError(f"config.lora has unknown keys {unknown}; use {', '.join(KEYS)}")
  rank, alpha = cfg.get("rank", 8), cfg.get("alpha", 16.0)
  try:
    lora_lib._check_rank_alpha(rank, alpha)  # pylint: disable=protected-access
  except ValueError as e:
    raise ValueError(f"config.lora (rank={rank!r}, alpha={alpha!r}): {e}") from None
  targets = cfg.get("targets", ("q_proj", "v_proj"))
  try:
    names = lora_lib.resolve_targets(model, targets)
  except ValueError as e:
    raise ValueError(f"config.lora.targets={targets!r}: {e}") from None
  export = cfg.get("export")
  if export not in EXPORTS:
    raise ValueError(f"config.lora.export={export!r} is unknown; use one of {EXPORTS}")
  if export in ("peft", "both") and model.config.model_type == "gpt2":
    raise ValueError("config.lora.export='peft': GPT-2 fuses q/k/v into one c_attn module, "
                     "which PEFT's q/k/v adapters do not map to; use export='merged'")
  if settings is not None and (settings.moves_reference or settings.iterate_every):
    raise ValueError("config.lora trains adapters against the base model as the fixed "
                     "reference; unset rl.ref_update_every, rl.ref_ema_decay and "
                     "rl.iterate_every")
  sample_merged = cfg.get("sample_merged", False)
  if not isinstance(sample_merged, bool):
    raise ValueError(f"config.lora.sample_merged={sample_merged!r}: use True or False")
  return LoraSpec(rank=int(rank), alpha=float(alpha), targets=names, export=export,
                  init_seed=int(cfg.get("init_seed", 0)), sample_merged=sample_merged)


def init_adapters(spec: LoraSpec, model, base_params) -> dict:
  """`{"lora": adapters}`: fresh adapters (B = 0) for `spec.targets` of every layer.

  The online state of a LoRA run is
  `online.init_state(init_adapters(spec, model, base), optimizer, rng, settings,
  ref_params=base)`: the optimiser state covers the adapters only.
  """
  return {KEY: lora_lib.init(jax.random.PRNGKey(spec.init_seed), model, base_params,
                             spec.rank, spec.alpha, spec.targets)}


def merge(spec: LoraSpec, base_params, params):
  """The policy's parameters: the base with `params["lora"]` merged in (pure, jit-able)."""
  return lora_lib.apply_params(base_params, params[KEY], spec.alpha, spec.rank)


def policy(spec: LoraSpec, base_params, params):
  """The parameters the step's sampler and policy passes read: the adapters attached
  (`attach`), or merged when `spec.sample_merged`."""
  return (merge if spec.sample_merged else attach)(spec, base_params, params)


def attach(spec: LoraSpec, base_params, params):
  """The policy's parameters with the adapters attached (not merged): the training passes'
  form, x @ W + (x @ A) @ (alpha / r · B) (`lora.attach`)."""
  return lora_lib.attach(base_params, params[KEY], spec.alpha, spec.rank)


def wrap_objective(spec: LoraSpec, objective, base_params):
  """`objective(policy_params, ...)` as a function of the adapters `{"lora": ...}`.

  `base_params` is closed over: `jax.grad` with respect to the first argument gives a
  gradient tree of the adapters alone. The objective sees the adapters attached
  (`attach`), so no merged kernel and no kernel-sized gradient exists in the learn phase.
  """
  def over_adapters(params, *args):
    return objective(attach(spec, base_params, params), *args)
  return over_adapters


@functools.partial(jax.jit, static_argnums=(0,))
def merged(spec: LoraSpec, base_params, params):
  """`merge`, jitted: the policy's parameters outside the step (evaluation, export)."""
  return merge(spec, base_params, params)


def export(spec: LoraSpec, config, model, params, base_params) -> Mapping[str, Any]:
  """Writes `spec.export` under `config.workdir`; returns {"lora_peft" | "lora_merged": path}.

  params: one run's `{"lora": adapters}` (an `RLState.params`); base_params: its base
  weights (`RLState.ref_params`).
  """
  from rlhf_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train.placement import fetch  # pylint: disable=g-import-not-at-top
  out = {}
  if spec.export is None:
    return out
  adapters = fetch(params[KEY])
  if spec.export in ("peft", "both"):
    out["lora_peft"] = os.path.join(config.workdir, "lora_adapter")
    if jax.process_index() == 0:
      lora_lib.export_peft(out["lora_peft"], model, adapters, spec.alpha)
  if spec.export in ("merged", "both"):
    out["lora_merged"] = os.path.join(config.workdir, "lora_merged")
    base = fetch(models_lib.stack_layers(base_params))
    if jax.process_index() == 0:
      lora_lib.export_merged(out["lora_merged"], model, base, adapters, spec.alpha, spec.rank)
  return out
