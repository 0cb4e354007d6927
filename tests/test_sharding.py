"""Tests for rlhf_jax.sharding on 8 fake CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharding as S

AXES = {
    "embed": {"table": ("vocab", "embed")},
    "layers": {"wq": ("layers", "embed", "heads", "head_dim"),
               "w_up": ("layers", "embed", "mlp"),
               "norm": ("layers", "norm")},
    "bias": (None,),
    "odd": (None,),
}


def init_params(rng):
  k = jax.random.split(rng, 4)
  return {
      "embed": {"table": jax.random.normal(k[0], (16, 8))},
      "layers": {"wq": jax.random.normal(k[1], (2, 8, 4, 3)),
                 "w_up": jax.random.normal(k[2], (2, 8, 6)),
                 "norm": jnp.ones((2, 8))},
      "bias": jax.random.normal(k[3], (6,)),
      "odd": jnp.arange(5.0),
  }


def test_make_mesh_shapes_and_errors():
  mesh = S.make_mesh(data=-1, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(S.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="data\\*fsdp\\*tensor"):
    S.make_mesh(data=2, fsdp=2, tensor=1)
  with pytest.raises(ValueError, match="only one axis"):
    S.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="not divisible"):
    S.make_mesh(data=-1, fsdp=3)


def test_spec_rules_drop_nondividing_axes():
  mesh = S.make_mesh(2, 2, 2)
  # 6 mlp units divide by tensor=2; embed 8 by fsdp=2.
  assert S.spec_for_shape(("layers", "embed", "mlp"), (2, 8, 6), mesh) == P(None, "fsdp", "tensor")
  # 5 is not divisible by 2: replicated along that dim.
  assert S.spec_for_shape(("vocab", "embed"), (5, 3), mesh) == P(None, None)
  # batch over (data, fsdp) needs 4 | dim; 2 only takes "data".
  assert S.spec_for_shape(("batch",), (8,), mesh) == P(("data", "fsdp"))
  assert S.spec_for_shape(("batch",), (2,), mesh) == P("data")
  with pytest.raises(KeyError, match="'bogus' has no sharding rule"):
    S.spec_for_shape(("bogus",), (4,), mesh, name="w")
  with pytest.raises(ValueError, match="one logical name"):
    S.spec_for_shape(("embed",), (4, 4), mesh)


def test_state_shardings_and_sharded_values_equal_unsharded():
  mesh = S.make_mesh(2, 2, 2)
  rng = jax.random.key(0)
  shardings, abstract = S.state_shardings(
      init_params, mesh, rng, logical_axes_fn=lambda _: AXES,
      overrides=((r"bias|odd", P("tensor")),))
  assert abstract["layers"]["wq"].shape == (2, 8, 4, 3)
  assert shardings["embed"]["table"].spec == P("tensor", "fsdp")
  assert shardings["layers"]["wq"].spec == P(None, "fsdp", "tensor", None)
  assert shardings["bias"].spec == P("tensor")
  assert shardings["odd"].spec == P(None)  # 5 does not divide by tensor=2
  ref = init_params(rng)
  sharded = jax.jit(init_params, out_shardings=shardings)(rng)
  assert sharded["embed"]["table"].sharding.spec == P("tensor", "fsdp")
  # The table is split into 4 distinct shards (tensor x fsdp).
  assert {s.data.shape for s in sharded["embed"]["table"].addressable_shards} == {(8, 4)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               ref, sharded)


def test_jit_with_out_shardings_matches_unsharded():
  mesh = S.make_mesh(2, 2, 2)
  params = init_params(jax.random.key(1))
  shardings = S.logical_to_sharding(AXES, mesh, shapes=params)
  p_sh = jax.device_put(params, shardings)
  x = np.random.RandomState(0).randn(8, 8).astype(np.float32)

  def f(p, x):
    h = x @ p["layers"]["w_up"][0]
    new = jax.tree.map(lambda a: a * 0.5, p)
    return new, jnp.sum(h ** 2)

  ref_p, ref_y = jax.jit(f)(params, x)
  with jax.set_mesh(mesh):
    step = jax.jit(f, out_shardings=(shardings, jax.sharding.NamedSharding(mesh, P())))
    out_p, out_y = step(p_sh, S.shard_batch(x, mesh))
  assert out_p["layers"]["w_up"].sharding.spec == P(None, "fsdp", "tensor")
  np.testing.assert_allclose(out_y, ref_y, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               ref_p, out_p)


def test_shard_batch_and_errors():
  mesh = S.make_mesh(2, 2, 2)
  batch = {"ids": np.arange(24).reshape(8, 3), "mask": np.ones((8, 3), bool)}
  out = S.shard_batch(batch, mesh)
  assert out["ids"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(out["ids"], batch["ids"])
  with pytest.raises(ValueError, match=r"'ids'.*batch size 6.*data\*fsdp = 4"):
    S.shard_batch({"ids": np.zeros((6, 3))}, mesh)


def test_process_slices_and_distributed_config(monkeypatch):
  assert S.process_batch_slice(8, process_index=1, process_count=4) == slice(2, 4)
  with pytest.raises(ValueError, match="global_batch_size=6"):
    S.process_batch_slice(6, process_index=0, process_count=4)
  for v in ("RLHF_COORDINATOR_ADDRESS", "RLHF_NUM_PROCESSES", "RLHF_PROCESS_ID"):
    monkeypatch.delenv(v, raising=False)
  assert S.init_distributed({}) is False
  with pytest.raises(ValueError, match="coordinator_address is missing"):
    S.init_distributed({"num_processes": 2, "process_id": 1})
  with pytest.raises(ValueError, match="also set num_processes"):
    S.init_distributed({"distributed": {"coordinator_address": "h:1"}})
  with pytest.raises(ValueError, match="process_id=3"):
    S.init_distributed({"coordinator_address": "h:1", "num_processes": 2, "process_id": 3})
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setenv("RLHF_COORDINATOR_ADDRESS", "host:1234")
  monkeypatch.setenv("RLHF_NUM_PROCESSES", "2")
  monkeypatch.setenv("RLHF_PROCESS_ID", "1")
  assert S.init_distributed(None) is True
  assert calls == [{"coordinator_address": "host:1234", "num_processes": 2, "process_id": 1}]
  # Single-process assembly of the process-local batch equals the input.
  mesh = S.make_mesh(2, 2, 2)
  g = S.global_batch_from_process_local({"x": np.arange(8.0)}, mesh)
  np.testing.assert_array_equal(g["x"], np.arange(8.0))


def test_init_distributed_auto_calls_initialize_without_arguments(monkeypatch):
  """`auto=True` (TPU VMs, Slurm, Open MPI) lets JAX discover the processes; an already
  initialised distributed system is left alone."""
  for v in ("RLHF_COORDINATOR_ADDRESS", "RLHF_NUM_PROCESSES", "RLHF_PROCESS_ID",
            "RLHF_DISTRIBUTED"):
    monkeypatch.delenv(v, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  assert S.init_distributed({"distributed": {"auto": True}}) is True
  assert calls == [{}]
  assert S.init_distributed({"auto": False}) is False and calls == [{}]
  monkeypatch.setenv("RLHF_DISTRIBUTED", "auto")
  assert S.init_distributed(None) is True and calls == [{}, {}]
  with pytest.raises(ValueError, match=r"auto=True discovers the processes.*'process_id'"):
    S.init_distributed({"auto": True, "process_id": 0})
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  assert S.init_distributed({"auto": True}) is False
  monkeypatch.delenv("RLHF_DISTRIBUTED")
  assert S.init_distributed({"coordinator_address": "h:1", "num_processes": 2,
                             "process_id": 0}) is False
  assert len(calls) == 2


def test_tiny_decoder_sharded_forward_matches_unsharded():
  M = pytest.importorskip("rlhf_jax.models")
  cfg = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32)
  model = M.from_config(cfg)
  mesh = S.make_mesh(2, 2, 2)
  rng = jax.random.key(0)
  shardings, _ = S.state_shardings(model.init, mesh, rng,
                                   logical_axes_fn=lambda p: M.logical_axes(model, p))
  params = model.init(rng)
  p_sh = jax.device_put(params, shardings)
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
  ids = np.random.RandomState(0).randint(0, 64, (4, 6))
  mask = np.ones((4, 6), np.int32)
  ref = jax.jit(model.apply)(params, ids, attention_mask=mask)
  with jax.set_mesh(mesh):
    out = jax.jit(model.apply)(p_sh, S.shard_batch(ids, mesh),
                               attention_mask=S.shard_batch(mask, mesh))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_global_batch_places_each_field_with_its_sharding():
  from jax.sharding import NamedSharding
  from rlhf_jax.train.placement import global_batch
  mesh = S.make_mesh(data=4, fsdp=2, tensor=1)
  batch = {"a": np.arange(32, dtype=np.int32).reshape(8, 4), "b": np.arange(8.0)}
  out = global_batch(batch, lambda v: NamedSharding(mesh, P("data", "fsdp") if v.ndim > 1
                                                    else P("data")))
  assert out["a"].sharding.spec == P("data", "fsdp") and out["b"].sharding.spec == P("data")
  for k, v in batch.items():
    np.testing.assert_array_equal(np.asarray(out[k]), v)
