"""RA-DPO's relabelled records (`data.relabel="ra_dpo"`) and their named errors; the offline
DPO loop on them runs in tests/test_catalogue.py (row RA-DPO)."""

from __future__ import annotations

import json
import os

import pytest

from offline_testlib import config, pairs
from rlhf_jax.train import offline_loop, relabel


def test_each_scored_pair_becomes_two_goal_conditioned_pairs():
  recs = [dict(prompt="x0", chosen="a", rejected="b", chosen_reward=0.75, rejected_reward=-1.5,
               extra=7),
          dict(prompt="x1", chosen="c", rejected="d", chosen_reward=2.0, rejected_reward=0.25)]
  out = relabel.ra_dpo(recs, "<{goal:g}> ")
  assert out == [
      dict(prompt="<0.75> x0", chosen="a", rejected="b", chosen_reward=0.75,
           rejected_reward=-1.5, extra=7),
      dict(prompt="<2> x1", chosen="c", rejected="d", chosen_reward=2.0, rejected_reward=0.25),
      dict(prompt="<-1.5> x0", chosen="b", rejected="a", chosen_reward=-1.5,
           rejected_reward=0.75, extra=7),
      dict(prompt="<0.25> x1", chosen="d", rejected="c", chosen_reward=0.25,
           rejected_reward=2.0)]
  assert recs[0]["prompt"] == "x0"  # the input is not changed


def test_synthetic_pairs_relabel_with_the_default_template():
  recs = pairs(3)
  out = relabel.ra_dpo(recs)
  assert len(out) == 6
  for i, r in enumerate(recs):
    assert out[i]["prompt"] == f"(score {r['chosen_reward']:g}) {r['prompt']}"
    assert (out[i + 3]["chosen"], out[i + 3]["rejected"]) == (r["rejected"], r["chosen"])


@pytest.mark.parametrize("keys,match", [
    ({"data.relabel": "radpo"}, r"data\.relabel='radpo' is unknown"),
    ({"data.relabel": "ra_dpo", "data.goal_template": "score: "}, r"data\.goal_template"),
])
def test_bad_relabel_configs_are_named_before_anything_is_written(tmp_path, keys, match):
  c = config("preference", tmp_path / "w", "dpo")
  for k, v in keys.items():
    section, key = k.split(".")
    c[section][key] = v
  with pytest.raises(ValueError, match=match):
    offline_loop.train(c)
  assert not os.path.exists(tmp_path / "w")


def test_relabel_of_a_reward_model_run_is_named(tmp_path):
  c = config("reward_model", tmp_path / "w", "bt")
  c.data.relabel = "ra_dpo"
  with pytest.raises(ValueError, match="paradigm 'preference'"):
    offline_loop.train(c)
  assert not os.path.exists(tmp_path / "w")


def test_records_without_scores_are_named(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(dict(prompt=f"p{i}", chosen="a", rejected="b")) + "\n"
                          for i in range(8)))
  c = config("preference", tmp_path / "w", "dpo")
  c.data.source, c.data.path, c.data.relabel = "jsonl", str(path), "ra_dpo"
  with pytest.raises(ValueError, match=r"training record 0 has no 'chosen_reward'"):
    offline_loop.train(c)
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("helper", ["ra_dpo_relabel", "rso_sample", "spo_rewards"])
def test_relabelling_and_sampling_helpers_are_not_losses(tmp_path, helper):
  c = config("preference", tmp_path / "w", "dpo")
  c.loss = helper
  with pytest.raises(ValueError, match=rf"config\.loss='{helper}' is not a 'preference' loss"):
    offline_loop.train(c)
  assert not os.path.exists(tmp_path / "w")
  from rlhf_jax.train.rl_config import RLSettings  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=rf"rl\.preference_loss='{helper}' is not a preference"):
    RLSettings.from_config(dict(objective="preference", preference_loss=helper, group_size=4))
