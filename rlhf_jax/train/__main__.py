"""Command line: `python -m rlhf_jax.train --config=experiments/<name>.py[:arg] --config.key=value`.

The config's `paradigm` picks the loop: "online" (the fused RL step) or one of the
offline paradigms "sft", "preference", "reward_model".
"""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

from rlhf_jax import config_utils

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with `:arg`.", lock_config=True)


def _schema_of(config):
  from rlhf_jax.train import config_schema  # pylint: disable=g-import-not-at-top
  return config_schema.schema_of(config)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rlhf_jax.train import run  # pylint: disable=g-import-not-at-top
  run.run(_CONFIG.value)


if __name__ == "__main__":
  config_utils.run_app(lambda: main, schema_of=_schema_of)
