"""Synthetic tasks: determinism, disjoint splits, exact verifiers, label-flip rate."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_jax.data import synthetic
from rlhf_jax.data.tokenizer import CharTokenizer


@pytest.mark.parametrize("name", sorted(synthetic.TASKS))
def test_deterministic_and_disjoint_splits(name):
  task = synthetic.make_task(name)
  a = task.generate(40, seed=3)
  assert a == task.generate(40, seed=3)
  assert a != task.generate(40, seed=4)
  test = task.generate(40, seed=3, split="test")
  assert not {e["prompt"] for e in a} & {e["prompt"] for e in test}
  tok = CharTokenizer()
  for e in a + test:  # every text is in the char vocabulary
    for k in ("prompt", "completion", "chosen", "rejected"):
      if k in e:
        tok.encode(e[k])


def test_arithmetic_verifier_exact():
  for op, fn in (("+", lambda a, b: a + b), ("-", lambda a, b: a - b),
                 ("*", lambda a, b: a * b)):
    task = synthetic.ArithmeticTask(num_digits=4, op=op)
    for e in task.generate(20, seed=0):
      a, b = (int(x) for x in e["prompt"][:-1].split(op, 1))
      assert 1000 <= a <= 9999 and 1000 <= b <= 9999
      truth = fn(a, b)
      assert task.score(e["prompt"], str(truth)) == 1.0
      assert task.score(e["prompt"], f" {truth}\n") == 1.0
      assert task.score(e["prompt"], str(truth + 1)) == 0.0
      assert task.score(e["prompt"], f"{truth}0") == 0.0
      assert task.score(e["prompt"], f"{truth} apples") == 0.0
      assert task.score(e["prompt"], "") == 0.0
  with pytest.raises(ValueError, match="arithmetic prompt"):
    task.score("hello", "1")
  with pytest.raises(ValueError, match="op"):
    synthetic.ArithmeticTask(op="^")


def test_countdown_verifier():
  task = synthetic.CountdownTask(num_numbers=4)
  for e in task.generate(20, seed=1):
    assert task.score(e["prompt"], e["completion"]) == 1.0
    assert task.score(e["prompt"], e["completion"] + "=" + e["answer"]) == 1.0
  p = "make 24 from 3 4 6 1:"
  assert task.score(p, "(6-3+1)*(4+1)") == 0.0  # 1 used twice
  assert task.score(p, "6*4*1") == 0.0  # 3 unused
  assert task.score(p, "(6-1-3)*4*3") == 0.0  # 3 used twice
  assert task.score(p, "6/(1-3/4)") == 1.0  # exact: 6 / (1/4)
  assert task.score(p, "6/(1-3/4) = 24") == 1.0
  assert task.score(p, "6*4*(3-1)/2") == 0.0
  assert task.score(p, "(3+1)*6*4/4") == 0.0
  assert task.score(p, "6*(3+1)*4/4") == 0.0
  assert task.score(p, "(1+3)*6") == 0.0
  assert task.score("make 24 from 3 4 6:", "6*(3+4)-18") == 0.0  # extra literal 18
  assert task.score("make 18 from 3 4 6:", "(4-3)*6*3") == 0.0  # 3 twice
  assert task.score("make 3 from 3 4 6:", "3*(6-4)") == 0.0  # 6
  assert task.score("make 6 from 3 4 6:", "3*(6-4)") == 1.0
  assert task.score("make 8 from 3 4 6:", "6/3*4") == 1.0  # exact rational arithmetic
  assert task.score("make 8 from 3 4 6:", "__import__('os')") == 0.0
  assert task.score("make 8 from 3 4 6:", "6**3+4") == 0.0
  assert task.score("make 8 from 3 4 6:", "6/(4-4)+3") == 0.0


def test_preference_true_reward_and_flip_rate():
  task = synthetic.PreferenceTask(alphabet="abc", target="a", length_penalty=0.25)
  for e in task.generate(50, seed=0):
    for side in ("chosen", "rejected"):
      y = e[side]
      assert e[f"{side}_reward"] == pytest.approx(sum(c == "a" for c in y) - 0.25 * len(y))
      assert task.score(e["prompt"], y) == e[f"{side}_reward"]
    assert e["chosen_reward"] > e["rejected_reward"] and not e["flipped"]
  noisy = synthetic.PreferenceTask(flip_rate=0.3).generate(2000, seed=0)
  flips = np.array([e["chosen_reward"] < e["rejected_reward"] for e in noisy])
  assert flips.tolist() == [e["flipped"] for e in noisy]
  assert abs(flips.mean() - 0.3) < 0.04
  with pytest.raises(ValueError, match="flip_rate"):
    synthetic.PreferenceTask(flip_rate=1.5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="split"):
    synthetic.ArithmeticTask().generate(2, split="valid")
  with pytest.raises(ValueError, match="unknown synthetic task"):
    synthetic.make_task("sudoku")
