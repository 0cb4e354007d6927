"""Dispatch a config to its training loop by `config.paradigm`."""

from __future__ import annotations

from typing import Any, Dict

PARADIGMS = ("online", "sft", "preference", "reward_model")


def run(config) -> Dict[str, Any]:
  paradigm = config.get("paradigm")
  if paradigm == "online":
    from rlhf_jax.train import online_loop  # pylint: disable=g-import-not-at-top
    summary = online_loop.train(config)
  elif paradigm in PARADIGMS:
    from rlhf_jax.train import offline_loop  # pylint: disable=g-import-not-at-top
    summary = offline_loop.train(config)
  else:
    raise ValueError(f"config.paradigm={paradigm!r} is unknown; use one of {PARADIGMS}")
  for k, v in summary.items():
    if k != "state":
      print(f"{k}: {v}")
  return summary
