"""Host-side metric output: progress bar, JSONL, TensorBoard events, PNG curves."""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np


def _drop_partial_last_line(path: str) -> None:
  """Truncates a last line without its newline (a write cut short by a kill)."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without torch where torch is not loaded yet.

  tensorboardX imports torch (about 3 s) only to accept torch tensors as values; the loops
  log floats. While it is imported, `torch` is marked missing so that its `import torch`
  fails fast; the mark is removed afterwards, so a later `import torch` works as usual.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Writes metrics to `<workdir>/metrics.jsonl`, TensorBoard and a progress bar.

  `plot(keys)` draws the recorded curves to `<workdir>/<name>.png`. In a multi-process
  run only process 0 writes (`primary`); the others keep the history in memory only.
  Rows written with `seed=i` (a seed sweep) carry `"seed": i`, go to TensorBoard as run
  `tb/seed_<i>`, and are drawn as the mean ± std over seeds.
  """

  def __init__(self, workdir: str, *, total_steps: int, desc: str = "train",
               show: Sequence[str] = ("reward_mean", "kl"), progress: bool = True,
               primary: Optional[bool] = None):
    self.workdir = workdir
    self.history: List[Dict[str, float]] = []
    self._show = tuple(show)
    if primary is None:
      import jax  # pylint: disable=g-import-not-at-top
      primary = jax.process_index() == 0
    self.primary = primary
    self._jsonl = self._tb = self._bar = None
    if not primary:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_partial_last_line(path)
    self._jsonl = open(path, "a", encoding="utf-8")
    SummaryWriter = _summary_writer_class()  # pylint: disable=invalid-name
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    self._tb_seed: Dict[int, object] = {}
    self._summary_writer = SummaryWriter
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, desc=desc, dynamic_ncols=True)

  def _tb_for(self, seed: Optional[int]):
    if seed is None:
      return self._tb
    if seed not in self._tb_seed:
      self._tb_seed[seed] = self._summary_writer(os.path.join(self.workdir, "tb", f"seed_{seed}"))
    return self._tb_seed[seed]

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "",
            seed: Optional[int] = None) -> None:
    row = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
    row["step"] = int(step)
    if seed is not None:
      row["seed"] = int(seed)
    self.history.append(row)
    if not self.primary:
      return
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    tb = self._tb_for(seed)
    for k, v in row.items():
      if k not in ("step", "seed"):
        tb.add_scalar(k, v, step)
    if self._bar is not None and not prefix and seed in (None, 0):
      self._bar.set_postfix({k: f"{row[k]:.3f}" for k in self._show if k in row})
      self._bar.update(1)

  def plot(self, keys: Sequence[str], name: str = "curves") -> Optional[str]:
    """Draws each key against step into one PNG; returns its path."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    keys = [k for k in keys if any(k in r for r in self.history)]
    if not keys or not self.primary:
      return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
      by_step: Dict[int, List[float]] = {}
      for r in self.history:
        if k in r:
          by_step.setdefault(r["step"], []).append(r[k])
      x = sorted(by_step)
      mean = np.array([np.mean(by_step[s]) for s in x])
      ax.plot(x, mean, marker="." if len(x) < 30 else None)
      if any(len(v) > 1 for v in by_step.values()):  # several seeds: mean ± std
        std = np.array([np.std(by_step[s]) for s in x])
        ax.fill_between(x, mean - std, mean + std, alpha=0.3)
      ax.set_title(k)
      ax.set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(self.workdir, f"{name}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
      for tb in self._tb_seed.values():
        tb.close()
      self._jsonl.close()
