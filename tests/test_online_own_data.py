"""The online loop on a user's own prompt file and reward function, through the CLI, and
the named errors for bad data and rewards (raised before anything is written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from env_testlib import subprocess_env

from rlhf_jax import demo
from rlhf_jax.data import synthetic
from rlhf_jax.train import online_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_REWARD = textwrap.dedent("""
    import json, os

    def right_sum(prompts, completions, **fields):
      with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"prompts": prompts[:2], "fields": sorted(fields),
                            "source": fields["source"][:2], "n": len(completions)}) + "\\n")
      return [float(c.strip() == a) for c, a in zip(completions, fields["answer"])]

    def wrong_length(prompts, completions, **fields):
      return [0.0]

    def not_finite(prompts, completions, **fields):
      return [float("nan")] * len(completions)

    def raises(prompts, completions, **fields):
      raise RuntimeError("my reward broke")
""")


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("own_data")
  task = synthetic.ArithmeticTask(num_digits=2, op="+")
  for split, n in (("train", 64), ("test", 16)):
    _write_jsonl(d / f"{split}.jsonl", [{"question": e["prompt"], "answer": e["answer"],
                                         "source": f"{split}-{i}"}
                                        for i, e in enumerate(task.generate(n, split=split))])
  (d / "user_rewards.py").write_text(USER_REWARD)
  return d


def test_cli_trains_on_a_jsonl_file_with_a_python_reward_from_outside_the_package(files):
  log = files / "calls.jsonl"
  task = {"name": "jsonl", "path": str(files / "train.jsonl"),
          "eval_path": str(files / "test.jsonl"), "prompt_key": "question",
          "answer_key": "answer"}
  rewards = ("exact_match", {"name": "python", "fn": "user_rewards:right_sum", "weight": 0.5})
  cmd = [sys.executable, "-m", "rlhf_jax.train", "--config=experiments/grpo_arithmetic.py:runlocal",
         f"--config.task={task!r}", f"--config.rewards={rewards!r}",
         f"--config.workdir={files / 'run'}", "--config.sampling.top_p=0.95"]
  env = subprocess_env(PYTHONPATH=str(files), REWARD_LOG=str(log))
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "accuracy_after" in out.stdout
  rows = [json.loads(line) for line in open(files / "run" / "metrics.jsonl")]
  steps = [r for r in rows if "reward_mean" in r]
  assert len(steps) == 3
  for name in ("exact_match", "python"):
    assert f"reward/{name}_mean" in steps[-1] and f"reward/{name}_std" in steps[-1]
  # the trained reward is exact_match + 0.5 * python (the entry's weight)
  for r in steps:
    assert r["reward_mean"] == pytest.approx(
        r["reward/exact_match_mean"] + 0.5 * r["reward/python_mean"], abs=1e-5)
  assert max(r["reward/python_mean"] for r in steps) > 0
  calls = [json.loads(line) for line in open(log)]
  # one probe call before training (2 prompts), then one per step with N = 32 x G rows
  assert calls[0]["n"] == 2 and all(c["n"] == 32 * 8 for c in calls[1:])
  assert calls[-1]["fields"] == ["answer", "source"]
  assert all(s.startswith("train-") for s in calls[-1]["source"])
  assert any(e.endswith("=") for e in calls[-1]["prompts"])


def _config(files, tmp_path, **changes):
  c = demo.get_config("runlocal")
  c.workdir = str(tmp_path / "w")
  c.task = {"name": "jsonl", "path": str(files / "train.jsonl"),
            "eval_path": str(files / "test.jsonl"), "prompt_key": "question",
            "answer_key": "answer"}
  for k, v in changes.items():
    section, _, key = k.partition("__")
    if key:
      c[section][key] = v
    else:
      c[section] = v
  return c


def _bad_file(files, name, lines):
  path = files / name
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


CASES = [
    ("missing_file", lambda f: dict(task__path=str(f / "nope.jsonl")), r"nope\.jsonl"),
    ("missing_prompt_key", lambda f: dict(task__path=_bad_file(
        f, "nokey.jsonl", ['{"question": "1+2=", "answer": "3"}', '{"q": "1+1=", "answer": "2"}'])),
     r"nokey\.jsonl:2.*'question'"),
    ("empty_dataset", lambda f: dict(task__path=_bad_file(f, "empty.jsonl", [])), r"empty\.jsonl"),
    ("every_prompt_too_long", lambda f: dict(data__max_prompt_length=2),
     r"max_prompt_length"),
    ("unknown_reward", lambda f: dict(rewards=("exact_mtch",)),
     r"config\.rewards has unknown reward 'exact_mtch' \(did you mean 'exact_match'\?\)"),
    ("python_reward_does_not_import", lambda f: dict(
        rewards=({"name": "python", "fn": "no_such_module_x:score"},)),
     r"no_such_module_x:score.*does not import"),
    ("python_reward_wrong_length", lambda f: dict(
        rewards=({"name": "python", "fn": "user_rewards:wrong_length"},)),
     r"config\.rewards\[0\] \('python'\).*user_rewards:wrong_length.*1 values for 2"),
    ("python_reward_nan", lambda f: dict(
        rewards=({"name": "python", "fn": "user_rewards:not_finite"},)),
     r"config\.rewards\[0\] \('python'\).*user_rewards:not_finite.*nan"),
    ("python_reward_raises", lambda f: dict(
        rewards=({"name": "python", "fn": "user_rewards:raises"},)),
     r"config\.rewards\[0\] \('python'\).*my reward broke"),
    ("unknown_task_key", lambda f: dict(task={"name": "jsonl", "pth": "x"}), r"task\.pth"),
    ("treg_prompt_past_the_positions", lambda f: dict(
        rl__objective="preference", rl__preference_loss="treg",
        rl__token_reward_prompts=("x" * 60, "y")), r"rl\.token_reward_prompts \(60 tokens\)"),
    ("reference_answer_past_the_positions", lambda f: dict(
        reward_shaping=("reference_logprob",), sampling__max_new_tokens=30),
     r"reward_shaping 'reference_logprob'.*positions"),
]


@pytest.mark.parametrize("name,changes,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_data_and_rewards_are_named_before_anything_is_written(name, changes, msg, files,
                                                                   tmp_path, monkeypatch):
  del name
  monkeypatch.syspath_prepend(str(files))
  monkeypatch.setenv("REWARD_LOG", str(tmp_path / "log.jsonl"))
  c = _config(files, tmp_path, **changes(files))
  with pytest.raises((ValueError, FileNotFoundError, OSError), match=msg):
    online_loop.train(c)
  assert not os.path.exists(c.workdir) or not os.listdir(c.workdir)
