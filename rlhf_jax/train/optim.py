"""Optax optimisers built from a config block.

config keys (all optional but `learning_rate`):
  name: "adamw" | "adam" | "sgd" | "lion" (default "adamw")
  learning_rate: peak learning rate
  schedule: "constant" | "cosine" | "linear" (decay after warm-up; default "constant")
  warmup_steps, total_steps: schedule lengths in optimiser updates
  weight_decay, b1, b2, eps: optimiser hyper-parameters
  max_grad_norm: global-norm clipping (0 or None disables; negative or NaN is an error)

Errors name the key under `key` (default "optim"; e.g. "sft.optim", "value.optim").
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

_KNOWN = {"name", "learning_rate", "schedule", "warmup_steps", "total_steps",
          "weight_decay", "b1", "b2", "eps", "max_grad_norm", "end_value_ratio"}


def _get(cfg: Mapping[str, Any], key: str, default):
  value = cfg.get(key, default)
  return default if value is None else value


def _check_range(name: str, value: float, ok: bool, want: str, key: str = "optim") -> None:
  if not ok:
    raise ValueError(f"{key}.{name}={value!r} must be {want}")


def make_schedule(cfg: Mapping[str, Any], *, key: str = "optim") -> optax.Schedule:
  """Warm-up then constant / cosine / linear decay, from `cfg`."""
  lr = float(cfg["learning_rate"])
  _check_range("learning_rate", lr, math.isfinite(lr) and lr >= 0,
               "a finite number >= 0 (a negative rate would ascend the loss)", key)
  warmup = int(_get(cfg, "warmup_steps", 0))
  _check_range("warmup_steps", warmup, warmup >= 0, ">= 0", key)
  kind = _get(cfg, "schedule", "constant")
  total = int(_get(cfg, "total_steps", 0))
  end = lr * float(_get(cfg, "end_value_ratio", 0.0))
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind in ("cosine", "linear"):
    if total <= warmup:
      raise ValueError(
          f"{key}.total_steps={total} must exceed {key}.warmup_steps={warmup} for "
          f"the {kind!r} schedule; set {key}.total_steps to the number of updates")
    if kind == "cosine":
      decay = optax.cosine_decay_schedule(lr, total - warmup, alpha=end / lr if lr else 0.0)
    else:
      decay = optax.linear_schedule(lr, end, total - warmup)
  else:
    raise ValueError(f"{key}.schedule={kind!r} is unknown; use 'constant', 'cosine' or 'linear'")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(cfg: Mapping[str, Any], *, key: str = "optim"
                   ) -> optax.GradientTransformation:
  """Builds clip-by-global-norm + the named optimiser with its schedule.

  `key` is the config block's name in error messages ("optim", "sft.optim", ...).
  """
  cfg = dict(cfg)
  unknown = set(cfg) - _KNOWN
  if unknown:
    raise ValueError(f"unknown {key} keys {sorted(unknown)}; known keys: {sorted(_KNOWN)}")
  if "learning_rate" not in cfg:
    raise ValueError(f"{key}.learning_rate is required")
  sched = make_schedule(cfg, key=key)
  name = _get(cfg, "name", "adamw")
  wd = float(_get(cfg, "weight_decay", 0.0))
  b1, b2 = float(_get(cfg, "b1", 0.9)), float(_get(cfg, "b2", 0.999))
  eps = float(_get(cfg, "eps", 1e-8))
  _check_range("weight_decay", wd, wd >= 0, ">= 0", key)
  for param, beta in (("b1", b1), ("b2", b2)):
    _check_range(param, beta, 0 <= beta < 1, "in [0, 1)", key)
  _check_range("eps", eps, eps >= 0, ">= 0", key)
  clip = float(_get(cfg, "max_grad_norm", 0.0))
  _check_range("max_grad_norm", clip, clip >= 0,
               ">= 0 (0 or None: no clipping; a negative or NaN norm would silently turn "
               "clipping off)", key)
  if name == "adamw":
    opt = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  elif name == "adam":
    opt = optax.adam(sched, b1=b1, b2=b2, eps=eps)
  elif name == "sgd":
    opt = optax.sgd(sched)
  elif name == "lion":
    opt = optax.lion(sched, b1=b1, b2=b2 if cfg.get("b2") is not None else 0.99, weight_decay=wd)
  else:
    raise ValueError(f"{key}.name={name!r} is unknown; use 'adamw', 'adam', 'sgd' or 'lion'")
  if clip > 0:
    opt = optax.chain(clip_by_global_norm(clip), opt)
  return opt


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` as one scalar multiplier: g * min(1, max_norm / ||g||).

  Same values (up to float rounding) as optax's, which divides every element by
  max(||g|| / max_norm, 1); a multiply by a scalar fuses into the optimiser's own
  elementwise passes instead of writing a clipped copy of the gradients.
  """
  if not max_norm > 0:
    raise ValueError(f"max_grad_norm must be > 0, got {max_norm}")

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
