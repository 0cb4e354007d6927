"""Config validation: unknown keys, wrong types, incompatible settings.

A schema is a (nested) dict — or ml_collections.ConfigDict — whose values are
either defaults (the expected type is the default's type; None accepts any
value) or types / tuples of types. Dotted names address nested keys.

  validate_config(config, {"lr": 1e-4, "model": {"hidden_size": 64}})
  require_divisible(config, "batch_size", "group_size")
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Callable, Mapping, Sequence

_MISSING = object()


def _as_dict(x) -> Any:
  if hasattr(x, "to_dict"):
    return x.to_dict()
  return x


def _type_name(t) -> str:
  if isinstance(t, tuple):
    return " or ".join(_type_name(a) for a in t)
  return "None" if t is type(None) else getattr(t, "__name__", str(t))


def _expected_types(spec) -> tuple | None:
  """Types allowed by a schema entry; None means anything."""
  if spec is None:
    return None
  if isinstance(spec, type):
    return (spec,)
  if isinstance(spec, tuple) and spec and all(isinstance(t, type) for t in spec):
    return spec
  if isinstance(spec, bool):
    return (bool,)
  if isinstance(spec, int):
    return (int,)
  if isinstance(spec, float):
    return (float, int)
  if isinstance(spec, (list, tuple)):
    return (list, tuple)
  return (type(spec),)


def _type_ok(value, types: tuple) -> bool:
  if isinstance(value, bool) and bool not in types:
    return False  # bool is an int subclass; do not accept it for int/float
  if float in types and isinstance(value, int) and not isinstance(value, bool):
    return True
  return isinstance(value, types)


def validate_config(config: Mapping | Any, schema_or_defaults: Mapping | Any, *,
                    allow_missing: bool = True, _prefix: str = "") -> dict:
  """Checks keys and types of `config` against a schema; returns merged dict.

  Raises:
    KeyError: for an unknown key, naming it and suggesting the closest known.
    TypeError: for a wrong type, naming the key, expected and got.
    KeyError: for a missing key when `allow_missing` is False.

  Returns:
    A plain dict: schema defaults (non-type entries) overridden by `config`.
  """
  config = _as_dict(config)
  schema = _as_dict(schema_or_defaults)
  if not isinstance(config, Mapping):
    raise TypeError(f"config{' ' + _prefix.rstrip('.') if _prefix else ''} must "
                    f"be a dict/ConfigDict, got {type(config).__name__}.")
  known = list(schema)
  out: dict = {}
  for k, spec in schema.items():
    if not isinstance(spec, type) and not (isinstance(spec, tuple) and spec and
                                           all(isinstance(t, type) for t in spec)):
      out[k] = spec
  for k, v in config.items():
    name = _prefix + str(k)
    if k not in schema:
      close = difflib.get_close_matches(str(k), [str(x) for x in known], n=1, cutoff=0.6)
      hint = f" Did you mean {_prefix + close[0]!r}?" if close else ""
      raise KeyError(f"unknown config key {name!r}.{hint} Known keys: "
                     f"{sorted(_prefix + str(x) for x in known)}.")
    spec = _as_dict(schema[k])
    if isinstance(spec, Mapping):
      if not isinstance(_as_dict(v), Mapping):
        raise TypeError(f"config key {name!r}: expected a dict (section), "
                        f"got {type(v).__name__} {v!r}.")
      out[k] = validate_config(v, spec, allow_missing=allow_missing,
                               _prefix=name + ".")
      continue
    types = _expected_types(spec)
    if types is not None and not _type_ok(v, types):
      raise TypeError(f"config key {name!r}: expected {_type_name(types)}, "
                      f"got {type(v).__name__} {v!r}.")
    out[k] = v
  if not allow_missing:
    missing = [_prefix + str(k) for k in schema if k not in config]
    if missing:
      raise KeyError(f"missing config keys: {missing}; set them explicitly.")
  return out


def get_key(config: Mapping | Any, key: str, default=_MISSING):
  """Reads a dotted key; KeyError names the key when absent and no default."""
  cur = _as_dict(config)
  for part in key.split("."):
    cur = _as_dict(cur)
    if not isinstance(cur, Mapping) or part not in cur:
      if default is _MISSING:
        raise KeyError(f"config key {key!r} is missing; set it.")
      return default
    cur = cur[part]
  return cur


def require_divisible(config: Mapping | Any, numerator: str, denominator: str) -> None:
  """Raises ValueError unless config[numerator] % config[denominator] == 0."""
  a, b = get_key(config, numerator), get_key(config, denominator)
  if not isinstance(b, int) or b <= 0:
    raise ValueError(f"config key {denominator!r} must be a positive int, got {b!r}.")
  if a % b:
    lo, hi = (a // b) * b, (a // b + 1) * b
    fixes = f"{hi}" if lo == 0 else f"{lo} or {hi}"
    raise ValueError(
        f"config {numerator!r}={a} must be divisible by {denominator!r}={b}; "
        f"set {numerator} to a multiple of {b} (e.g. {fixes}) or change {denominator}.")


def require_positive(config: Mapping | Any, *keys: str, allow_zero: bool = False) -> None:
  """Raises ValueError naming each key whose value is not > 0 (or >= 0)."""
  for key in keys:
    v = get_key(config, key)
    if v is None or (v < 0 if allow_zero else v <= 0):
      bound = ">= 0" if allow_zero else "> 0"
      raise ValueError(f"config key {key!r}={v!r} must be {bound}.")


def require_in(config: Mapping | Any, key: str, choices: Sequence) -> None:
  """Raises ValueError when config[key] is not one of `choices`."""
  v = get_key(config, key)
  if v not in choices:
    close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"config key {key!r}={v!r} must be one of {list(choices)}.{hint}")


def require_le(config: Mapping | Any, smaller: str, larger: str) -> None:
  """Raises ValueError unless config[smaller] <= config[larger]."""
  a, b = get_key(config, smaller), get_key(config, larger)
  if a > b:
    raise ValueError(f"config {smaller!r}={a} must be <= {larger!r}={b}; "
                     f"lower {smaller} or raise {larger}.")


def optional_blocks(config, *names: str) -> None:
  """Adds each of `names` to `config` as an unset (None) block that the command line can
  set whole, e.g. `--config.mesh="{'data': -1, 'fsdp': 2}"`, and a config file can set to
  a dict (an ml_collections placeholder: a plain `None` field cannot be overridden)."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  for name in names:
    if name not in config:
      config[name] = config_dict.placeholder(object)


def _closest(key: str, known) -> str:
  close = difflib.get_close_matches(key, [str(k) for k in known], n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def parse_override(text: str, current):
  """The value of `--config.<key>=text` for a key whose value is `current`.

  Strings stay strings; numbers, booleans, tuples and lists are parsed as such; a key that
  is None (or a placeholder) or a section (dict) takes any Python literal, e.g.
  `--config.sampling.top_p=0.9` or `--config.task="{'name': 'jsonl', 'path': 'x.jsonl'}"`.
  """
  import ast  # pylint: disable=g-import-not-at-top

  def literal():
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  if isinstance(current, bool):
    low = text.strip().lower()
    if low not in ("true", "false", "1", "0"):
      raise ValueError(f"expected true or false, got {text!r}")
    return low in ("true", "1")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  value = literal()
  if hasattr(current, "items") and not hasattr(value, "items"):
    raise ValueError(f"expected a dict for a config section, got {text!r}")
  if isinstance(current, (tuple, list)):
    if isinstance(value, str):
      value = (value,)
    return tuple(value) if isinstance(value, (tuple, list)) else value
  return value


def _schema_leaf(schema: Mapping | None, parts: Sequence[str]):
  """The type spec of the dotted key `parts` in a loop schema (nested dicts of key -> type or
  tuple of types), or None when the schema has no such leaf key."""
  node = schema
  for part in parts:
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return None if isinstance(node, Mapping) or node is None else node


def _stand_in(spec, text: str):
  """A value of the schema type `spec` for `parse_override` to parse `text` as."""
  types = spec if isinstance(spec, tuple) else (spec,)
  if text.strip() == "None" and type(None) in types:
    return None
  for t, v in ((bool, False), (int, 0), (float, 0.0), (str, "")):
    if t in types:
      return v
  return None


def apply_overrides(config, overrides: Sequence[tuple[str, str]],
                    schema: Mapping | None = None) -> None:
  """Sets each `(dotted key, text)` of the command line on `config` (see `parse_override`).

  `schema`: the loop's config schema (`rlhf_jax.train.config_schema`); a key the config file
  leaves out but the schema lists (e.g. `sampling.scan_layers`) is added, parsed as the
  schema's type, when its section is in the config.
  Raises ValueError naming the flag: a key neither defines (closest known key suggested),
  or a value that does not parse as the key's type.
  """
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  for key, text in overrides:
    flag = f"--config.{key}"
    node, parts = config, key.split(".")
    spec = None
    for i, part in enumerate(parts):
      known = list(node.keys()) if hasattr(node, "keys") else []
      if part not in known:
        spec = _schema_leaf(schema, parts) if i == len(parts) - 1 else None
        if spec is not None and hasattr(node, "keys"):
          break
        raise ValueError(f"{flag}: the config does not define {part!r}{_closest(part, known)}; "
                         "an override can only change a key the config file (or the loop's "
                         "schema) defines: check the spelling, or add the key to the config "
                         "file")
      if i < len(parts) - 1:
        node = node[part]
    last = parts[-1]
    current = node[last] if spec is None else _stand_in(spec, text)
    if spec is None and isinstance(node, config_dict.ConfigDict):
      field = node._fields.get(last)  # pylint: disable=protected-access
      if isinstance(field, config_dict.FieldReference):
        current = field.get()
    try:
      value = parse_override(text, current)
    except ValueError as e:
      raise ValueError(f"{flag}={text}: {e}") from None
    if isinstance(node, config_dict.ConfigDict):
      with node.unlocked(), node.ignore_type():
        node[last] = config_dict.ConfigDict(value) if isinstance(value, dict) else value
    else:
      node[last] = value


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(argv without `--config.<key>=value` arguments, [(key, value), ...] in order)."""
  rest, overrides = [], []
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      key, value = a[len("--config."):].split("=", 1)
      overrides.append((key, value))
    else:
      rest.append(a)
  return rest, overrides


def run_app(make_main, argv: Sequence[str] | None = None, schema_of=None) -> None:
  """`absl.app.run(make_main())` with `--config.<key>=value` overrides applied by
  `apply_overrides` (so keys whose default is None, and whole sections given as dicts, can be
  set); a key the config does not define, a value of the wrong type, or a config file that
  does not exist exits with a one-line error instead of a traceback.

  `make_main` defines the config flag (if not yet defined) and returns absl's `main`;
  `schema_of(config)`, when given, returns the loop schema for `apply_overrides`."""
  import re  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  argv, overrides = split_overrides(list(sys.argv if argv is None else argv))
  # ml_collections' config flags also read overrides from sys.argv when they are defined.
  sys.argv[:] = [a for a in sys.argv if not (a.startswith("--config.") and "=" in a)]
  for a in argv[1:]:
    if a.startswith("--config=") and a.endswith(".py") or a.startswith("--config=") and ".py:" in a:
      path = a[len("--config="):].split(":", 1)[0]
      if not os.path.isfile(path):
        sys.exit(f"--config={path}: no such config file (paths are relative to "
                 f"{os.getcwd()})")
  main = make_main()

  def main_with_overrides(args):
    if overrides:
      try:
        config = flags.FLAGS["config"].value
        apply_overrides(config, overrides, None if schema_of is None else schema_of(config))
      except ValueError as e:
        sys.exit(str(e))
    return main(args)
  try:
    app.run(main_with_overrides, argv=argv)
  except (AttributeError, KeyError) as e:
    if flags.FLAGS.is_parsed():  # raised by the run itself, not by the flag parser
      raise
    text = str(e).replace("\\n", " ").replace("\\'", "'")
    key = re.search(r"'([^'\\]+)'", text)
    key = key.group(1) if key else "?"
    hint = re.search(r'Did you mean "([^"]+)"', text)
    given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    flag = next((g for g in given if key in g.split(".")[1:]), "a --config.* override")
    sys.exit(f"{flag}: the config does not define {key!r}"
             + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
             + "; an override can only change a key the config file defines: check the "
             "spelling, or add the key to the config file")


def import_function(path: Any, key: str, hint: str = "") -> Callable:
  """"pkg.module:function" (or "pkg.module.function") -> the function.

  ValueError naming `key` (e.g. "config.env.tool") and the path: not a 'module:function'
  string, an import or attribute error (its type and message), or not callable; `hint` is
  appended to the import error.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  if not isinstance(path, str) or not path.strip():
    raise ValueError(f"{key} must be 'module:function', got {path!r}")
  module, sep, attr = path.partition(":")
  if not sep:
    module, _, attr = path.rpartition(".")
  if not module or not attr:
    raise ValueError(f"{key}={path!r} must be 'module:function'")
  try:
    obj = importlib.import_module(module)
    for part in attr.split("."):
      obj = getattr(obj, part)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{key}={path!r} does not import: {type(e).__name__}: {e}{hint}") from e
  if not callable(obj):
    raise ValueError(f"{key}={path!r} is a {type(obj).__name__}, not a function")
  return obj
