"""Offline preference records relabelled before training (`config.data.relabel`).

"ra_dpo": RA-DPO's reward-augmented data. Each pair (x, y_w, y_l) with scores (r_w, r_l)
becomes two pairs conditioned on a goal score written before the prompt,

    (goal(r_w) + x): y_w ≻ y_l    and    (goal(r_l) + x): y_l ≻ y_w,

(`losses.preference_online.ra_dpo_relabel`), and any direct alignment loss (DPO) trains on
them. goal(r) is `config.data.goal_template` formatted with `goal=r`. At inference the
prompt carries the highest goal.

Reward-Augmented Data Enhances Direct Preference Alignment of LLMs (Zhang et al., 2024).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses as losses_lib

RELABELS = ("ra_dpo",)
GOAL_TEMPLATE = "(score {goal:g}) "
SCORE_KEYS = ("chosen_reward", "rejected_reward")


def check(relabel, template: str, paradigm: str) -> None:
  """Raises ValueError naming `data.relabel` / `data.goal_template` and the fix."""
  if relabel in (None, ""):
    return
  if relabel not in RELABELS:
    raise ValueError(f"data.relabel={relabel!r} is unknown; use one of {list(RELABELS)} or "
                     "None")
  if paradigm != "preference":
    raise ValueError(f"data.relabel={relabel!r} relabels preference pairs; paradigm is "
                     f"{paradigm!r}: use paradigm 'preference' or remove data.relabel")
  try:
    ok = "{goal" in template and template.format(goal=1.0) != template.format(goal=0.0)
  except (KeyError, IndexError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"data.goal_template={template!r} must contain '{{goal}}' (e.g. "
                     f"{GOAL_TEMPLATE!r}): the goal score is written there")


def ra_dpo(records: Sequence[Mapping], template: str = GOAL_TEMPLATE, *,
           what: str = "training") -> list:
  """The 2B goal-conditioned pairs of B scored records: [0, B) prefer the chosen response
  under its own score as the goal, [B, 2B) the rejected one under its score."""
  for i, r in enumerate(records):
    missing = [k for k in SCORE_KEYS if k not in r]
    if missing:
      raise ValueError(f"data.relabel='ra_dpo' conditions each pair on its responses' scores: "
                       f"{what} record {i} has no {missing[0]!r}; add 'chosen_reward' and "
                       "'rejected_reward' to every record")
  if not records:
    return []
  scores = {k: jnp.asarray([float(r[k]) for r in records], jnp.float32) for k in SCORE_KEYS}
  out = losses_lib.get("ra_dpo_relabel")(scores["chosen_reward"], scores["rejected_reward"])
  goals, chosen, rejected, source = (np.asarray(x) for x in out)
  sides = ("chosen", "rejected")
  pairs = []
  for g, c, rj, s in zip(goals, chosen, rejected, source):
    rec = records[int(s)]
    pairs.append(dict(rec, prompt=template.format(goal=float(g)) + rec["prompt"],
                      chosen=rec[sides[c]], rejected=rec[sides[rj]],
                      chosen_reward=rec[f"{sides[c]}_reward"],
                      rejected_reward=rec[f"{sides[rj]}_reward"]))
  return pairs
