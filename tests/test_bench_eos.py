"""benchmarks/eos_lengths.py: the forced-EOS wrapper stops exactly the rows it should, where
it should, and the script writes its table and JSON."""

from __future__ import annotations

import json
import sys

from bench_testlib import run_script  # tests/bench_testlib.py
import jax
import numpy as np

from benchmarks import eos_lengths, grpo_vs_peers
from rlhf_jax import models
from rlhf_jax.sampling import sample


def test_half_the_rows_stop_at_a_quarter_of_the_budget_with_and_without_compaction():
  hf = dict(grpo_vs_peers.hf_config("tiny"), max_position_embeddings=128)
  model = models.from_config(hf)
  params = model.init(jax.random.PRNGKey(0))
  ids, mask = eos_lengths.prompts(hf["vocab_size"], eos_lengths.PROMPT_LEN)
  t = 16
  configs = eos_lengths.workloads(t)
  outs = {}
  for name in ("EOS half at T/4, compact 0", "EOS half at T/4, compact 1"):
    config, _ = configs[name]
    stop = eos_lengths.StopEarly(model, eos_lengths.EOS, eos_lengths.PROMPT_LEN // 2 + t // 4)
    outs[name] = jax.jit(lambda p, s=stop, c=config: sample(s, p, ids, mask,
                                                            jax.random.PRNGKey(1), c))(params)
  g = eos_lengths.GROUP
  for out in outs.values():
    lengths = np.asarray(out.lengths)
    np.testing.assert_array_equal(lengths[:g], t)  # the full prompt's rows never stop
    np.testing.assert_array_equal(lengths[g:], t // 4 + 1)  # EOS is new token t/4
    np.testing.assert_array_equal(np.asarray(out.finished), np.arange(2 * g) >= g)
    comp = np.asarray(out.completion_ids)
    assert np.all(comp[g:, t // 4] == eos_lengths.EOS)
    assert not np.any(comp[:g] == eos_lengths.EOS) and not np.any(comp[g:, :t // 4] == 1)
  a, b = outs.values()
  np.testing.assert_array_equal(np.asarray(a.completion_ids), np.asarray(b.completion_ids))


def test_script_writes_table_and_json(tmp_path):
  out = tmp_path / "eos.json"
  proc = run_script([sys.executable, "-m", "benchmarks.eos_lengths", "--size=tiny",
                     "--new-tokens=16", "--repeats=1", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  rows = {r["workload"]: r for r in data["rows"]}
  assert rows["no EOS"]["tokens"] == 16 * 16 and rows["no EOS"]["vs_no_eos"] == 1.0
  assert rows["EOS half at T/4, compact 1"]["tokens"] == 8 * 16 + 8 * 5
  assert rows["all stop at T/4"]["tokens"] == 16 * 5
  mem = data["meta"]["memory"]
  assert [m["new_tokens"] for m in mem] == [16, 32, 64]
  assert "vs no EOS" in proc.stdout
