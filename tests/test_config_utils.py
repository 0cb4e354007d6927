"""Tests for rlhf_jax.config_utils."""

from __future__ import annotations

import ml_collections
import pytest

from rlhf_jax import config_utils as U

SCHEMA = {
    "batch_size": 8,
    "group_size": 4,
    "learning_rate": 1e-4,
    "use_remat": False,
    "name": "run",
    "reward_model": None,          # anything
    "seed": (int, type(None)),     # explicit types
    "model": {"hidden_size": 64, "num_layers": 2},
}


def test_valid_config_merges_defaults():
  out = U.validate_config({"batch_size": 16, "learning_rate": 3, "model": {"num_layers": 4}},
                          SCHEMA)
  assert out["batch_size"] == 16 and out["learning_rate"] == 3
  assert out["group_size"] == 4 and out["model"] == {"hidden_size": 64, "num_layers": 4}
  assert "seed" not in out  # type-only entries have no default
  cfg = ml_collections.ConfigDict({"seed": None, "reward_model": [1, 2]})
  U.validate_config(cfg, SCHEMA)
  with pytest.raises(TypeError, match="'seed': expected int, got NoneType"):
    U.validate_config(cfg, ml_collections.ConfigDict({"seed": 0, "reward_model": None}))


def test_unknown_key_suggests_closest():
  with pytest.raises(KeyError, match=r"unknown config key 'learning_rte'.*Did you mean 'learning_rate'"):
    U.validate_config({"learning_rte": 1e-3}, SCHEMA)
  with pytest.raises(KeyError, match=r"'model.hiden_size'.*Did you mean 'model.hidden_size'"):
    U.validate_config({"model": {"hiden_size": 3}}, SCHEMA)
  with pytest.raises(KeyError, match=r"unknown config key 'zzz'\. Known keys"):
    U.validate_config({"zzz": 1}, SCHEMA)


@pytest.mark.parametrize("key,value,expected", [
    ("batch_size", 8.0, "int"),
    ("batch_size", True, "int"),          # bool is not an int here
    ("learning_rate", "1e-4", "float or int"),
    ("use_remat", 1, "bool"),
    ("seed", 1.5, "int or None"),
    ("name", None, "str"),
])
def test_wrong_type_names_key_expected_got(key, value, expected):
  with pytest.raises(TypeError) as e:
    U.validate_config({key: value}, SCHEMA)
  msg = str(e.value)
  assert repr(key) in msg and f"expected {expected}" in msg
  assert f"got {type(value).__name__}" in msg


def test_section_type_and_missing():
  with pytest.raises(TypeError, match="'model': expected a dict"):
    U.validate_config({"model": 3}, SCHEMA)
  with pytest.raises(KeyError, match="missing config keys: .*'group_size'"):
    U.validate_config({"batch_size": 8}, {"batch_size": 8, "group_size": 2},
                      allow_missing=False)


def test_require_divisible():
  U.require_divisible({"batch_size": 8, "group_size": 4}, "batch_size", "group_size")
  with pytest.raises(ValueError) as e:
    U.require_divisible({"batch_size": 10, "group_size": 4}, "batch_size", "group_size")
  msg = str(e.value)
  assert "'batch_size'=10" in msg and "'group_size'=4" in msg and "8 or 12" in msg
  with pytest.raises(ValueError, match="'rollout.n'=3.*'group_size'=2"):
    U.require_divisible({"rollout": {"n": 3}, "group_size": 2}, "rollout.n", "group_size")
  with pytest.raises(ValueError, match="'group_size' must be a positive int"):
    U.require_divisible({"batch_size": 8, "group_size": 0}, "batch_size", "group_size")
  with pytest.raises(KeyError, match="'group_size' is missing"):
    U.require_divisible({"batch_size": 8}, "batch_size", "group_size")


def test_other_requirements():
  cfg = {"lr": 0.0, "n": 3, "loss": "dpo", "a": 5, "b": 4}
  U.require_positive(cfg, "n")
  U.require_positive(cfg, "lr", allow_zero=True)
  with pytest.raises(ValueError, match="'lr'=0.0 must be > 0"):
    U.require_positive(cfg, "n", "lr")
  with pytest.raises(ValueError, match="'loss'='dpo' must be one of.*Did you mean 'dpo_'"):
    U.require_in(cfg, "loss", ["ipo", "dpo_"])
  with pytest.raises(ValueError, match="'a'=5 must be <= 'b'=4"):
    U.require_le(cfg, "a", "b")


def test_override_adds_a_key_the_loop_schema_lists():
  """`--config.sampling.scan_layers=False` works on a config that leaves the key out (the
  demo's): the online schema lists it, so the override adds it with the schema's type."""
  from rlhf_jax import demo  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import config_schema  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  assert "scan_layers" not in c.sampling and "unroll_layers" not in c.model
  schema = config_schema.schema_of(c)
  U.apply_overrides(c, [("sampling.scan_layers", "False"), ("model.unroll_layers", "None"),
                        ("model.vocab_chunk", "4096"), ("sampling.temperature", "0.5")],
                    schema)
  assert c.sampling.scan_layers is False and c.model.unroll_layers is None
  assert c.model.vocab_chunk == 4096 and c.sampling.temperature == 0.5
  config_schema.check(c, "online")
  with pytest.raises(ValueError, match=r"--config\.sampling\.scan_layers=maybe: expected true"):
    U.apply_overrides(c, [("sampling.scan_layers", "maybe")], schema)
  # Neither the config nor the schema (optim is validated by its builder): the named error.
  for key in ("sampling.scan_layer", "optim.b2", "trian.steps", "sampling.top_k.x"):
    with pytest.raises(ValueError, match=rf"--config\.{key}: the config does not define"):
      U.apply_overrides(c, [(key, "1")], schema)
  # Without the schema a key the config leaves out stays an error.
  with pytest.raises(ValueError, match=r"does not define 'compact_stages'"):
    U.apply_overrides(demo.get_config(), [("sampling.compact_stages", "1")])
  assert config_schema.schema_of(ml_collections.ConfigDict({"paradigm": "sft"})) is \
      config_schema.SCHEMAS["offline"]
