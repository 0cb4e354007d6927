"""Decode-batch compaction (`SamplingConfig.compact_stages`): every row's tokens and
log-probs equal the uncompacted sampler's, the program really decodes at halved batch sizes,
and the log-probs still equal the trainer's teacher-forced ones."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.sampling import SamplingConfig, sample
from tests.test_sampling import (LEFT_IDS, LEFT_MASK, MODEL, PARAMS, TINY_LLAMA,
                                 _teacher_logps, run)

# EOS id 1 of 16: rows stop at many different steps within 24 new tokens.
BASE = SamplingConfig(max_new_tokens=24, temperature=1.0, eos_ids=(1,), pad_id=0,
                      num_samples=3)


def _run(config, ids=LEFT_IDS, mask=LEFT_MASK, seed=0, **kw):
  return run(MODEL, PARAMS, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed), config,
             **kw)


def _assert_same(a, b):
  np.testing.assert_array_equal(np.asarray(a.completion_ids), np.asarray(b.completion_ids))
  np.testing.assert_array_equal(np.asarray(a.completion_mask), np.asarray(b.completion_mask))
  np.testing.assert_array_equal(np.asarray(a.finished), np.asarray(b.finished))
  np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
  np.testing.assert_allclose(np.asarray(a.logps), np.asarray(b.logps), atol=1e-5)
  np.testing.assert_allclose(np.asarray(a.sampling_logps), np.asarray(b.sampling_logps),
                             atol=1e-5)


@pytest.mark.parametrize("stages", [1, 2, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_compacted_rows_equal_the_full_batch(stages, seed):
  plain = _run(BASE, seed=seed)
  lengths = np.asarray(plain.lengths)
  # The case is informative: rows stop at different steps, some run to the budget.
  assert len(set(lengths.tolist())) >= 4 and lengths.max() == 24 and lengths.min() < 12
  _assert_same(_run(dataclasses.replace(BASE, compact_stages=stages), seed=seed), plain)


def test_odd_row_counts_and_top_k_top_p():
  config = dataclasses.replace(BASE, num_samples=1, temperature=0.8, top_k=6, top_p=0.9)
  ids, mask = LEFT_IDS[:3], LEFT_MASK[:3]  # 3 rows: stages of 3, 2 and 1 rows
  for seed in range(3):
    _assert_same(_run(dataclasses.replace(config, compact_stages=2), ids, mask, seed),
                 _run(config, ids, mask, seed))


def test_mixture_sampling_compacts_both_caches():
  ref = jax.tree.map(lambda x: x * 0.7, PARAMS)
  for seed in range(2):
    plain = _run(BASE, seed=seed, mixture=(ref, 0.4))
    _assert_same(_run(dataclasses.replace(BASE, compact_stages=2), seed=seed,
                      mixture=(ref, 0.4)), plain)


def test_logps_still_equal_the_trainer():
  out = _run(dataclasses.replace(BASE, compact_stages=3), seed=3)
  lp, _, _ = _teacher_logps(out)
  mask = np.asarray(out.completion_mask)
  np.testing.assert_allclose(np.where(mask, lp, 0.0), np.asarray(out.logps), atol=1e-5)


def _decode_batch_sizes(config) -> list:
  """The row counts of the decode loops in the program (from the while loops' carries)."""
  jaxpr = jax.make_jaxpr(lambda p, i, m, k: sample(MODEL, p, i, m, k, config))(
      PARAMS, jnp.asarray(LEFT_IDS), jnp.asarray(LEFT_MASK), jax.random.key(0))
  sizes = []
  for eqn in jaxpr.jaxpr.eqns:
    if eqn.primitive.name == "while":
      done = [v.aval.shape for v in eqn.outvars if v.aval.dtype == jnp.bool_ and
              len(v.aval.shape) == 1]
      sizes.append(done[0][0])
  return sizes


def test_each_stage_decodes_half_the_rows():
  assert _decode_batch_sizes(BASE) == [12]
  assert _decode_batch_sizes(dataclasses.replace(BASE, compact_stages=2)) == [12, 6, 3]
  assert _decode_batch_sizes(dataclasses.replace(BASE, compact_stages=9)) == [12, 6, 3, 2, 1]


@pytest.mark.parametrize("stages", [0, 2])
def test_scanned_layers_decode_the_same_tokens(stages):
  """`scan_layers`: the decode step scans over stacked layers (also through compaction,
  whose stacked cache has its rows on axis 1): same tokens and log-probs."""
  for seed in range(2):
    plain = _run(BASE, seed=seed)
    _assert_same(_run(dataclasses.replace(BASE, scan_layers=True, compact_stages=stages),
                      seed=seed), plain)


def test_scanned_layers_hold_one_layer_in_the_decode_loop():
  def decode_dots(config):
    jaxpr = jax.make_jaxpr(lambda p, i, m, k: sample(MODEL, p, i, m, k, config))(
        PARAMS, jnp.asarray(LEFT_IDS), jnp.asarray(LEFT_MASK), jax.random.key(0))
    loop = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"][-1]
    return str(loop.params["body_jaxpr"]).count("dot_general")
  unrolled, scanned = decode_dots(BASE), decode_dots(dataclasses.replace(BASE, scan_layers=True))
  assert TINY_LLAMA["num_hidden_layers"] == 2
  assert scanned < unrolled  # one layer's matmuls (inside a scan) instead of two layers'


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_compact_stages_is_named(bad):
  with pytest.raises(ValueError, match="compact_stages"):
    SamplingConfig(max_new_tokens=4, compact_stages=bad)
  with pytest.raises(ValueError, match="scan_layers"):
    SamplingConfig(max_new_tokens=4, scan_layers=2)
