"""Local JSONL datasets in the common formats, validated line by line.

Formats (one JSON object per line; extra fields are kept):

| format       | required fields                                   |
|--------------|---------------------------------------------------|
| `preference` | `prompt`, `chosen`, `rejected`                    |
| `messages`   | `messages` (list of {role, content})              |
| `sft`        | `prompt`, `completion`                            |
| `kto`        | `prompt`, `completion`, `label` (bool)            |
| `rl`         | `prompt`, `answer` (str, or a number kept as str) |

`prompt`, `chosen`, `rejected` and `completion` may be a string or a list of chat messages.
Every error names the file, the 1-based line number and the field. Files are UTF-8 (a
byte-order mark is ignored); a line that is not valid UTF-8 is an invalid line like
malformed JSON (skipped with `skip_invalid=True`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from rlhf_jax.data import chat as chat_lib

_TEXT_OR_CHAT = "text_or_chat"
_CHAT = "chat"
_BOOL = "bool"
_ANSWER = "answer"
_RANKED = "ranked"

FORMATS: dict[str, dict[str, str]] = {
    "preference": {"prompt": _TEXT_OR_CHAT, "chosen": _TEXT_OR_CHAT, "rejected": _TEXT_OR_CHAT},
    "ranked": {"prompt": _TEXT_OR_CHAT, "responses": _RANKED},
    "messages": {"messages": _CHAT},
    "sft": {"prompt": _TEXT_OR_CHAT, "completion": _TEXT_OR_CHAT},
    "kto": {"prompt": _TEXT_OR_CHAT, "completion": _TEXT_OR_CHAT, "label": _BOOL},
    "rl": {"prompt": _TEXT_OR_CHAT, "answer": _ANSWER},
}


class DataFormatError(ValueError):
  """A dataset record is malformed; the message names file, line and field."""


class JsonlDataset(NamedTuple):
  """Validated records plus what was skipped (`skipped`: list of (line, reason))."""
  records: list[dict[str, Any]]
  path: str
  format: str
  skipped: list[tuple[int, str]]

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.records[i]


def infer_format(record: Mapping[str, Any]) -> str:
  """Guesses the format from the keys of one record (most specific first)."""
  for name in ("preference", "ranked", "kto", "rl", "sft", "messages"):
    if all(k in record for k in FORMATS[name]):
      return name
  raise DataFormatError(f"cannot infer the dataset format from fields {sorted(record)}; "
                        f"expected the fields of one of {describe_formats()}")


def describe_formats() -> str:
  return "; ".join(f"{n}: {', '.join(f)}" for n, f in FORMATS.items())


def _check_value(kind: str, value: Any, field: str) -> Any:
  """Returns the (normalised) value or raises DataFormatError naming `field`."""
  if kind == _TEXT_OR_CHAT:
    if isinstance(value, str):
      return value
    if isinstance(value, list):
      chat_lib.validate_messages(value, where=f"field '{field}'")
      return value
    raise DataFormatError(f"field '{field}': expected str or list of chat messages, got "
                          f"{type(value).__name__}")
  if kind == _CHAT:
    if not isinstance(value, list):
      raise DataFormatError(f"field '{field}': expected a list of chat messages, got "
                            f"{type(value).__name__}")
    chat_lib.validate_messages(value, where=f"field '{field}'")
    return value
  if kind == _BOOL:
    if isinstance(value, bool):
      return value
    if isinstance(value, int) and value in (0, 1):
      return bool(value)
    raise DataFormatError(f"field '{field}': expected true/false, got {value!r:.40}")
  if kind == _RANKED:
    if not isinstance(value, list) or len(value) < 2:
      raise DataFormatError(f"field '{field}': expected a list of >= 2 responses (best first), "
                            f"got {value!r:.60}")
    return [_check_value(_TEXT_OR_CHAT, v, f"{field}[{i}]") for i, v in enumerate(value)]
  if kind == _ANSWER:
    if isinstance(value, str):
      return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return str(value)
    raise DataFormatError(f"field '{field}': expected str or number, got {type(value).__name__}")
  raise AssertionError(kind)


def validate_record(record: Any, fmt: str) -> dict[str, Any]:
  """Checks one record against `FORMATS[fmt]`; returns a normalised copy."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
  if not isinstance(record, dict):
    raise DataFormatError(f"expected a JSON object, got {type(record).__name__}")
  out = dict(record)
  for field, kind in FORMATS[fmt].items():
    if field not in record:
      raise DataFormatError(f"missing field '{field}' (format {fmt!r} needs "
                            f"{', '.join(FORMATS[fmt])})")
    try:
      out[field] = _check_value(kind, record[field], field)
    except DataFormatError:
      raise
    except ValueError as e:  # from chat validation
      raise DataFormatError(str(e)) from None
  return out


# pylint: disable-next=redefined-builtin
def json_lines(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed JSON value) of each non-blank line of a UTF-8 JSONL file (a
  leading byte-order mark is ignored); a line that is not UTF-8 or not JSON yields a
  `DataFormatError` saying what is wrong in place of the value."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield lineno, DataFormatError(f"not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at "
                                      f"column {e.start + 1}); re-encode the file as UTF-8")
        continue
      if lineno == 1:
        line = line.removeprefix("\ufeff")
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        yield lineno, DataFormatError(f"malformed JSON ({e.msg} at column {e.colno})")


def load_jsonl(path: str | os.PathLike, *, format: str = "auto",
               skip_invalid: bool = False,
               max_examples: int | None = None) -> JsonlDataset:
  """Reads and validates a JSONL file.

  Args:
    path: the file.
    format: one of `FORMATS`, or "auto" to infer it from the first valid record.
    skip_invalid: skip malformed lines (counted in `skipped`, logged once) instead of
      raising `DataFormatError`.
    max_examples: stop after this many valid records.

  Blank lines are ignored. An empty result raises `DataFormatError`.
  """
  path = os.fspath(path)
  if format != "auto" and format not in FORMATS:
    raise ValueError(f"unknown format {format!r}; choose 'auto' or one of {sorted(FORMATS)}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"JSONL dataset {path!r} does not exist")
  if os.path.isdir(path):
    raise IsADirectoryError(f"JSONL dataset {path!r} is a directory; pass the path of a "
                            ".jsonl file (one JSON object per line)")
  records, skipped = [], []
  fmt = None if format == "auto" else format
  for lineno, record in json_lines(path):
    try:
      if isinstance(record, DataFormatError):
        raise record
      if fmt is None:
        if not isinstance(record, dict):
          raise DataFormatError(f"expected a JSON object, got {type(record).__name__}")
        fmt = infer_format(record)
      records.append(validate_record(record, fmt))
    except DataFormatError as e:
      if not skip_invalid:
        raise DataFormatError(f"{path}:{lineno}: {e} (pass skip_invalid=True to skip "
                              "invalid lines)") from None
      skipped.append((lineno, str(e)))
    if max_examples is not None and len(records) >= max_examples:
      break
  if skipped:
    logging.warning("%s: skipped %d invalid line(s); first: line %d: %s", path, len(skipped),
                    *skipped[0])
  if not records:
    raise DataFormatError(f"{path}: no valid records (empty dataset"
                          + (f"; {len(skipped)} invalid line(s) skipped)" if skipped else ")"))
  return JsonlDataset(records=records, path=path, format=fmt or format, skipped=skipped)


def write_jsonl(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
  """Writes records one JSON object per line (for tests and synthetic-data export)."""
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
