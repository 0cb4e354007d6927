"""Seed sweeps in one compiled program: N independent runs of the online step, `vmap`ped.

    config.seeds = 4        # or --config.seeds=4

Run i is the run `--config.seed=<config.seed + i>` would make: its own data order (and
synthetic data / held-out split), SFT warm-up and sampling keys; the model's random init
follows `model.init_seed` as in a single run. The N train states are stacked on a leading
axis and ONE jitted `vmap` of the update steps them all (purejaxrl style), so the per-seed
metrics equal N single-seed runs (tested to 1e-5) at a fraction of their wall time.
`metrics.jsonl` rows carry `seed`; TensorBoard gets one run per seed (`tb/seed_<i>`); the
plot draws the mean ± std over seeds.

With `config.mesh` the seeds run side by side on the devices: the seed axis goes over the
mesh's "data" axis (its size must divide `config.seeds`), and within a seed the state is
placed by the logical-axis rules over "fsdp" x "tensor" and the prompts over "fsdp"
(`mesh_placement`). The seeds never communicate, so each "data" slice of the mesh steps
its own seeds.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.train import placement as placement_lib


def num_seeds(config) -> int:
  """`config.seeds` (default 1), checked."""
  n = config.get("seeds", 1)
  n = 1 if n is None else n
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f"config.seeds={n!r}: the number of seeds to run in one program must be an "
                     "integer >= 1 (1: a single run)")
  if n > 1 and config.get("mesh"):
    mesh = placement_lib.mesh_of(config)
    data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    if n % data:
      raise ValueError(f"config.seeds={n} with config.mesh={dict(mesh.shape)}: the seeds go over "
                       f"the mesh's data axis, whose size {data} must divide config.seeds; set "
                       f"config.seeds to a multiple of {data} or change config.mesh")
    rows = int(config.train.prompts_per_step)
    if rows % fsdp:
      raise ValueError(f"train.prompts_per_step={rows} is not divisible by the mesh's fsdp = "
                       f"{fsdp} devices, over which each seed's prompts go (config.seeds={n}, "
                       f"config.mesh={dict(mesh.shape)}); set it to a multiple of {fsdp}")
  return n


def seed_config(config, i: int):
  """A copy of the config for seed i (seed = config.seed + i)."""
  c = copy.deepcopy(config)
  c.seed = int(config.seed) + i
  return c


def stack(trees: Sequence[Any]):
  """Stacks pytrees on a new leading (seed) axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, i: int):
  """Seed i's slice of a stacked pytree."""
  return jax.tree.map(lambda x: x[i], tree)


def vmapped(update_fn, *, donate: bool = True, out_shardings=None):
  """`jit(vmap(update))` over (state, batch, rng), all with a leading seed axis."""
  return jax.jit(jax.vmap(update_fn), donate_argnums=(0,) if donate else (),
                 out_shardings=out_shardings)


# Within a seed, prompts (logical "batch") go over fsdp only: the seeds hold "data".
SEED_RULES = tuple((name, "fsdp") if name == "batch" else (name, axis)
                   for name, axis in sharding_lib.DEFAULT_RULES)


def mesh_placement(mesh, state):
  """(put_state, put_batch, out_shardings) for stacked seeds on `mesh` (`config.mesh`).

  Each leaf's sharding is "data" on the seed axis followed by the spec the logical-axis
  rules (`SEED_RULES`) give one seed's leaf; batch fields [N, B, ...] go over
  ("data", "fsdp").
  """
  one = jax.eval_shape(lambda s: unstack(s, 0), state)
  inner = placement_lib.state_shardings(one, mesh, SEED_RULES)
  shardings = jax.tree.map(lambda sh: NamedSharding(mesh, P("data", *sh.spec)), inner)

  put_batch = lambda batch: placement_lib.global_batch(  # noqa: E731
      batch, lambda v: NamedSharding(mesh, P("data", "fsdp") if v.ndim > 1 else P("data")))
  return (lambda st: jax.device_put(st, shardings)), put_batch, (shardings, None)


class StackedBatches:
  """N per-seed batch iterators as one iterator of stacked batches [N, ...] with one
  checkpointable state (a list of the per-seed iterator states).

  `offsets[i]` is added to seed i's `record_index`, so that host rewards look records up in
  one table holding every seed's records (`concat_records`).
  """

  def __init__(self, iterators: Sequence[Any], offsets: Sequence[int]):
    self.iterators = list(iterators)
    self.offsets = list(offsets)

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    parts = [next(it) for it in self.iterators]
    for p, off in zip(parts, self.offsets):
      if "record_index" in p:
        p["record_index"] = p["record_index"] + np.int32(off)
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]
            if isinstance(parts[0][k], np.ndarray) and parts[0][k].dtype != object}

  def get_state(self) -> Dict[str, List[Mapping[str, int]]]:
    return {"seeds": [it.get_state() for it in self.iterators]}

  def set_state(self, state: Mapping[str, Any]) -> None:
    states = state.get("seeds")
    if not isinstance(states, list) or len(states) != len(self.iterators):
      raise ValueError(f"the checkpoint's data state is for {len(states or [])} seeds, this run "
                       f"has {len(self.iterators)}; resume with the same config.seeds")
    for it, s in zip(self.iterators, states):
      it.set_state(s)


def concat_records(tables: Sequence[Sequence[dict]]):
  """(one table of every seed's records, the offset of each seed's first record)."""
  offsets = np.cumsum([0] + [len(t) for t in tables[:-1]]).tolist()
  return [r for t in tables for r in t], offsets


def per_seed(metrics: Mapping[str, Any], n: int) -> List[Dict[str, float]]:
  """Splits stacked host metrics {k: [N]} into N rows of floats."""
  return [{k: float(np.asarray(v).reshape(n, -1)[i, 0]) for k, v in metrics.items()}
          for i in range(n)]
