"""Calling a registered loss with the inputs its declaration lists.

The offline step and the online preference step both hold a dictionary of the inputs they
can compute (log-probs, lengths, rewards, ...) and call the configured loss with the ones
its declaration (`rlhf_jax.losses.declaration`) asks for; what it needs and the step cannot
provide is a named error.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from rlhf_jax import losses as losses_lib

OFFLINE_FIX = ("pass a constant in config.loss_kwargs, a per-example field of the records "
               "through config.data.passthrough, or use a loss with a matching signature")


def parameters(fn: Callable):
  """(name, required) of every parameter of a registered loss (its declaration)."""
  return losses_lib.REGISTRY.declaration_of(fn).parameters


def missing_inputs(fn: Callable, available, kwargs: Mapping[str, Any]) -> list:
  """The required inputs of `fn` that neither `available` (names) nor `kwargs` give."""
  return [name for name, required in parameters(fn)
          if required and name not in kwargs and name not in available]


def call_with_available(fn: Callable, available: Mapping[str, Any], kwargs: Mapping[str, Any],
                        what: str, *, key: str = "loss_kwargs", fix: str = OFFLINE_FIX):
  """Calls `fn` with the named inputs its declaration lists (hyper-parameters from kwargs).

  `key` names the config entry holding `kwargs` and `fix` says how to provide a missing
  input, in the errors.
  """
  params = dict(parameters(fn))
  for k in kwargs:
    if k not in params:
      raise ValueError(f"{key} has {k!r}, which {what} does not take; it takes "
                       f"{sorted(p for p in params if p not in available)}")
  args = {}
  for name, required in params.items():
    if name in kwargs:
      continue
    if name in available and available[name] is not None:
      args[name] = available[name]
    elif required:
      raise ValueError(f"{what} needs {name!r}, which this batch cannot provide (it provides "
                       f"{sorted(k for k, v in available.items() if v is not None)}); {fix}")
  return fn(**args, **kwargs)


def is_unpaired_loss(loss_fn: Optional[Callable]) -> bool:
  """True for losses over single completions with labels (KTO-style signatures)."""
  if loss_fn is None:
    return False
  params = dict(parameters(loss_fn))
  return "desirable" in params and "chosen_logps" not in params


def is_list_loss(loss_fn: Optional[Callable]) -> bool:
  """True for listwise losses over `logps` / `mask` [B, K] (PRO, TRPA, GRAO signatures)."""
  if loss_fn is None:
    return False
  params = dict(parameters(loss_fn))
  return "logps" in params and "mask" in params and "desirable" not in params


def parameter_names(fn: Callable) -> tuple:
  """The names of every parameter of a registered loss (its declaration)."""
  return tuple(name for name, _ in parameters(fn))
