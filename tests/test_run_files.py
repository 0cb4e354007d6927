"""Files a run writes survive a kill: metrics lines and the reference log-prob cache."""

import os

import numpy as np

from rlhf_jax.train import offline_data
from rlhf_jax.train.metrics_io import MetricsWriter


def test_metrics_writer_drops_a_partial_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"loss": 1.0, "step": 1}\n{"loss": 0.')  # killed mid-write
  w = MetricsWriter(str(tmp_path), total_steps=1, progress=False)
  w.write(2, {"loss": 0.5})
  w.close()
  lines = path.read_text().splitlines()
  assert lines == ['{"loss": 1.0, "step": 1}', '{"loss": 0.5, "step": 2}']


def _build(path, calls):
  source = [1.0, 2.0, 3.0]

  def ref_fn(batch):
    calls.append(1)
    return {"ref_logps": batch["x"] * 2}
  return offline_data.RefTable.build(
      str(path), source, lambda r, i: {"x": r},
      lambda exs: {"x": np.asarray([e["x"] for e in exs], np.float32)}, ref_fn, batch_size=2)


def test_reference_cache_is_written_atomically_and_recomputed_when_corrupt(tmp_path):
  path = tmp_path / "ref.safetensors"
  calls = []
  table = _build(path, calls)
  np.testing.assert_array_equal(table.arrays["ref_logps"], [2.0, 4.0, 6.0])
  assert len(calls) == 2 and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  _build(path, calls)  # reused: no new reference passes
  assert len(calls) == 2
  path.write_bytes(path.read_bytes()[:10])  # truncated on disk
  table = _build(path, calls)
  assert len(calls) == 4
  np.testing.assert_array_equal(table.arrays["ref_logps"], [2.0, 4.0, 6.0])
