"""Files a run writes survive a kill: metrics lines and the reference log-prob cache."""

import os
import subprocess
import sys
import textwrap

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


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """A CLI run's writer leaves torch unloaded (its import costs seconds per process) and a
  later `import torch` still works."""
  code = textwrap.dedent(f"""
      import importlib.util, os, sys
      from rlhf_jax.train.metrics_io import MetricsWriter
      w = MetricsWriter({str(tmp_path)!r}, total_steps=1, progress=False)
      w.write(1, {{"loss": 0.5}})
      w.close()
      assert "torch" not in sys.modules, "torch was imported"
      assert os.listdir(os.path.join({str(tmp_path)!r}, "tb")), "no event file"
      if importlib.util.find_spec("torch") is not None:
        import torch
        assert torch.zeros(1).shape == (1,)
      """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]


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
