"""End-to-end offline training through `rlhf_jax.train.run.run` on the synthetic preference
task: SFT, DPO, KTO and RM-BT reach the accuracies their experiment configs state.

The shared config and runner live in `offline_testlib`.
"""

from __future__ import annotations

import json

import numpy as np

from offline_testlib import config as _config  # tests/offline_testlib.py
from offline_testlib import run_config as _run


def test_dpo_fast_reaches_stated_accuracy(tmp_path):
  # The docstring of experiments/dpo_synthetic.py states >= 0.9 for this run.
  s = _run(_config("preference", tmp_path, "dpo", loss_kwargs=dict(beta=0.1)))
  assert s["eval_before"]["implicit_reward_accuracy"] < 0.6
  assert s["eval_after"]["implicit_reward_accuracy"] >= 0.9
  assert s["eval_after"]["loss"] < s["eval_before"]["loss"] - 0.2
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_loss = [r["loss"] for r in rows if "loss" in r and "eval/loss" not in r]
  assert np.mean(train_loss[-5:]) < np.mean(train_loss[:5])


def test_rm_bt_fast_reaches_090(tmp_path):
  s = _run(_config("reward_model", tmp_path, "bt"))
  assert s["eval_after"]["accuracy"] >= 0.9
  assert s["eval_after"]["loss"] < s["eval_before"]["loss"]


def test_sft_nll_decreases(tmp_path):
  s = _run(_config("sft", tmp_path))
  assert s["eval_after"]["nll"] < s["eval_before"]["nll"] - 1.0


def test_kto_unpaired_trains(tmp_path):
  s = _run(_config("preference", tmp_path, "kto", loss_kwargs=dict(beta=0.1)))
  assert s["eval_after"]["implicit_reward_accuracy"] >= 0.85


