"""Shared utilities for the toy experiments: config variants, module loading, output.

The experiments are packages under `experiments/`, run from the repository root:

    python -m experiments.<slug>.run --config=experiments/<slug>/config.py:full
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional

import ml_collections
import numpy as np


def parse_arg(arg: Optional[str], **spec: Any) -> ml_collections.ConfigDict:
  """Parses `"fast"` / `"full"` / `"full,seeds=8"` into a ConfigDict.

  Like big_vision's `parse_arg`: `spec` gives the defaults (and thereby the
  types); a bare word sets `variant`, `key=value` overrides a default.
  """
  out = ml_collections.ConfigDict(dict(spec))
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    if "=" not in token:
      out.variant = token
      continue
    key, value = token.split("=", 1)
    if key not in spec:
      raise KeyError(f"config arg {key!r} is unknown; known keys: {sorted(spec)}")
    default = spec[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  if "variant" in spec and out.variant not in ("fast", "full"):
    raise ValueError(f"config variant must be 'fast' or 'full', got {out.variant!r}")
  return out


def load_module(path: str, name: str):
  """Imports a python file by path (as ml_collections loads a `--config` file)."""
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def config_from_flag(argv=None) -> ml_collections.ConfigDict:
  """Parses `--config=path/config.py:variant` and returns `get_config(variant)`."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  parser.add_argument("--out", default=None, help="results JSON path")
  args = parser.parse_args(argv)
  path, _, arg = args.config.partition(":")
  cfg = load_module(path, "exp_config").get_config(arg or None)
  return cfg, args.out


def mean_std(x) -> Dict[str, float]:
  x = np.asarray(x, dtype=np.float64)
  return {"mean": float(x.mean()), "std": float(x.std()), "n": int(x.size)}


def fmt(ms: Mapping[str, float], digits: int = 3) -> str:
  return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, "tolist"):
    return x.tolist()
  return x


def write_json(results: Mapping[str, Any], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(_jsonable(dict(results)), f, indent=1)


def print_table(header, rows) -> str:
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
  text = "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                   + [line(r) for r in rows])
  print(text)
  return text


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_fig(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=70)


def main(run_module_file: str, run: Callable, report: Callable) -> None:
  """Shared `__main__`: config flag -> run -> table + JSON + plot next to run.py.

  A config with a non-empty `tag` writes `plot_<tag>.png` and `results_<variant>_<tag>.json`.
  """
  cfg, out = config_from_flag()
  here = os.path.dirname(os.path.abspath(run_module_file))
  tag = f"_{cfg.tag}" if cfg.get("tag") else ""  # a named set-up keeps its own outputs
  results = run(cfg)
  report(results, cfg, os.path.join(here, f"plot{tag}.png"))
  write_json(results, out or os.path.join(here, f"results_{cfg.get('variant', 'run')}{tag}.json"))


def load_experiment(slug: str, arg: str = "fast"):
  """Returns `(config, run_module)` for experiments/<slug>: `get_config(arg)` and its `run`."""
  config = importlib.import_module(f"experiments.{slug}.config").get_config(arg)
  return config, importlib.import_module(f"experiments.{slug}.run")
