"""Tokenisation of records into examples and fixed-shape numpy batches.

Per-example functions (`make_*_example_fn`) turn one record into unpadded int lists and
apply the truncation policy; collate functions pad to static shapes:

* prompts (RL):  `prompt_ids`, `prompt_mask` [B, P], left-padded.
* SFT:           `input_ids`, `attention_mask`, `loss_mask`, `segment_ids`, `positions` [B, T],
                 right-padded (or packed, see `Packer`).
* preference:    `chosen_ids`, `chosen_mask`, `chosen_loss_mask`, and the same for
                 `rejected_*` [B, T]: prompt + response concatenated, right-padded, loss
                 mask on the response only.

Truncation policies: "error" (default; a clear error naming the example and lengths),
"truncate_left" (drop the oldest prompt tokens), "truncate_right" (drop the last tokens),
"skip" (raise `SkipExample`, counted by the iterator). A response is always cut from the
right under either truncate policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.tokenizer import Tokenizer, pad_sequences

TRUNCATION_POLICIES = ("error", "truncate_left", "truncate_right", "skip")
Example = dict[str, Any]


class SkipExample(Exception):
  """Raised by an example function when the policy is "skip"; the iterator counts it."""


def check_policy(truncation: str) -> None:
  if truncation not in TRUNCATION_POLICIES:
    raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")


def _describe(index: Any, record: Mapping[str, Any]) -> str:
  prompt = record.get("prompt", record.get("messages", ""))
  return f"example {index} (prompt {str(prompt)!r:.50})"


def passthrough_fields(record: Mapping[str, Any], keys: Sequence[str], index: Any) -> dict:
  """{key: record[key]} for the passthrough `keys`; a missing one is a KeyError naming the
  example, the field and the config setting that asked for it."""
  missing = [k for k in keys if k not in record]
  if missing:
    raise KeyError(f"{_describe(index, record)} has no field {missing[0]!r}, one of the "
                   f"fields {tuple(keys)} passed through to the batch (config.data.passthrough, "
                   f"or the regression targets of a reward head or loss); add it to every "
                   f"record (this one has {sorted(record)}) or stop passing it through")
  return {k: record[k] for k in keys}


def fit(ids: list[int], limit: int, *, truncation: str, what: str, where: str,
        fix: str) -> list[int]:
  """Applies the truncation policy to `ids` of `what` (e.g. "prompt") against `limit`."""
  if len(ids) <= limit:
    return ids
  if truncation == "truncate_left":
    return ids[len(ids) - limit:]
  if truncation == "truncate_right":
    return ids[:limit]
  msg = f"{where}: {what} has {len(ids)} tokens > {fix}"
  if truncation == "skip":
    raise SkipExample(msg)
  raise ValueError(f"{msg}; raise the limit or pass truncation='truncate_left', "
                   "'truncate_right' or 'skip'")


def _as_messages(x, role: str):
  return x if isinstance(x, list) else [{"role": role, "content": x}]


def _use_chat(chat: bool | str, *values) -> bool:
  if chat == "auto":
    return any(isinstance(v, list) for v in values)
  return bool(chat)


def encode_prompt(tok: Tokenizer, prompt, *, chat: bool | str = "auto",
                  add_bos: bool = False) -> list[int]:
  """Prompt ids: chat prompts rendered with the generation prompt, text encoded directly."""
  if _use_chat(chat, prompt):
    text = tok.apply_chat_template(_as_messages(prompt, "user"), add_generation_prompt=True)
    return tok.encode(text)
  if not isinstance(prompt, str):
    raise ValueError(f"prompt must be str or a list of chat messages, got {type(prompt).__name__}")
  return tok.encode(prompt, add_bos=add_bos)


def encode_prompt_response(tok: Tokenizer, prompt, response, *, chat: bool | str = "auto",
                           add_bos: bool = False,
                           append_eos: bool = True) -> tuple[list[int], list[int], list[int]]:
  """(prompt_ids, response_ids, response_loss_mask) for one prompt/response pair.

  Chat: the conversation prompt + assistant response is rendered once; the response starts
  at the last assistant turn; its loss mask is that turn's span (content + end-of-turn).
  Text: response ids follow the prompt ids, plus eos if `append_eos`; loss mask all ones.
  """
  if _use_chat(chat, prompt, response):
    messages = _as_messages(prompt, "user") + _as_messages(response, "assistant")
    ids, amask = tok.encode_chat(messages)
    if not any(amask):
      raise ValueError("the chat template marked no assistant tokens for this response")
    start = len(amask) - 1
    while start > 0 and not (amask[start - 1] == 0 and amask[start] == 1):
      start -= 1
    return ids[:start], ids[start:], amask[start:]
  if not isinstance(prompt, str) or not isinstance(response, str):
    raise ValueError("prompt and response must both be str (or chat message lists)")
  resp = tok.encode(response) + ([tok.eos_id] if append_eos else [])
  return tok.encode(prompt, add_bos=add_bos), resp, [1] * len(resp)


def make_prompt_example_fn(tok: Tokenizer, *, max_prompt_length: int, truncation: str = "error",
                           chat: bool | str = "auto", add_bos: bool = False,
                           passthrough: Sequence[str] = ("prompt", "answer")) -> Callable:
  """record -> {"prompt_ids", **passthrough} for RL prompts."""
  check_policy(truncation)

  def fn(record, index):
    ids = fit(encode_prompt(tok, record["prompt"], chat=chat, add_bos=add_bos),
              max_prompt_length, truncation=truncation, what="prompt",
              where=_describe(index, record), fix=f"max_prompt_length={max_prompt_length}")
    return {"prompt_ids": ids, **{k: record[k] for k in passthrough if k in record}}
  return fn


def make_sft_example_fn(tok: Tokenizer, *, max_length: int, truncation: str = "error",
                        chat: bool | str = "auto", add_bos: bool = False,
                        append_eos: bool = True,
                        passthrough: Sequence[str] = ()) -> Callable:
  """record ({"messages"} or {"prompt", "completion"}) -> {"input_ids", "loss_mask"}.

  For `messages`, every assistant turn is in the loss; for prompt/completion, the completion.
  A KTO record's `label` can be kept with passthrough=("label",).
  """
  check_policy(truncation)

  def fn(record, index):
    if "messages" in record:
      ids, loss = tok.encode_chat(record["messages"])
    else:
      p, r, m = encode_prompt_response(tok, record["prompt"], record["completion"], chat=chat,
                                       add_bos=add_bos, append_eos=append_eos)
      ids, loss = p + r, [0] * len(p) + m
    where = _describe(index, record)
    if len(ids) > max_length:
      keep = fit(list(range(len(ids))), max_length, truncation=truncation, what="sequence",
                 where=where, fix=f"max_length={max_length}")
      ids, loss = [ids[i] for i in keep], [loss[i] for i in keep]
    return {"input_ids": ids, "loss_mask": loss, **passthrough_fields(record, passthrough, index)}
  return fn


def make_response_encoder(tok: Tokenizer, *, max_prompt_length: int, max_length: int,
                          truncation: str = "error", chat: bool | str = "auto",
                          add_bos: bool = False, append_eos: bool = True) -> Callable:
  """`encode(prompt, response, what, where) -> (ids, loss_mask)`: prompt + response fitted
  to `max_prompt_length` / `max_length` under the `truncation` policy."""
  check_policy(truncation)
  if max_prompt_length >= max_length:
    raise ValueError(f"max_prompt_length={max_prompt_length} must be < max_length={max_length}")

  def encode(prompt, response, what: str, where: str):
    p, r, m = encode_prompt_response(tok, prompt, response, chat=chat, add_bos=add_bos,
                                     append_eos=append_eos)
    p = fit(p, max_prompt_length, truncation=truncation, what="prompt", where=where,
            fix=f"max_prompt_length={max_prompt_length}")
    budget = max_length - len(p)
    if len(r) > budget:
      policy = "truncate_right" if truncation.startswith("truncate") else truncation
      r = fit(r, budget, truncation=policy, what=what, where=where,
              fix=f"max_length={max_length} - prompt {len(p)}")
      m = m[:len(r)]
    return p + r, [0] * len(p) + m
  return encode


def make_preference_example_fn(tok: Tokenizer, *, passthrough: Sequence[str] = (),
                               **kwargs) -> Callable:
  """record {"prompt", "chosen", "rejected"} -> {"chosen_ids", "chosen_loss_mask", ...}.

  kwargs: `make_response_encoder`'s (max_prompt_length, max_length, truncation, chat, ...).
  """
  encode = make_response_encoder(tok, **kwargs)

  def fn(record, index):
    where = _describe(index, record)
    out = passthrough_fields(record, passthrough, index)
    for side in ("chosen", "rejected"):
      out[f"{side}_ids"], out[f"{side}_loss_mask"] = encode(
          record["prompt"], record[side], f"{side} response", where)
    return out
  return fn


def _stack_passthrough(examples, keys) -> dict[str, Any]:
  out = {}
  for k in keys:
    vals = [ex[k] for ex in examples]
    numeric = all(isinstance(v, (bool, int, float, np.number)) for v in vals)
    out[k] = np.asarray(vals, dtype=np.float32) if numeric else vals
  return out


def _extra_keys(examples, known) -> list[str]:
  return [k for k in examples[0] if k not in known]


def collate_prompts(examples: Sequence[Example], *, pad_id: int,
                    max_prompt_length: int) -> dict[str, Any]:
  """Left-pads prompts to `prompt_ids`, `prompt_mask` [B, P]; passthrough fields kept."""
  ids, mask = pad_sequences([e["prompt_ids"] for e in examples], length=max_prompt_length,
                            pad_id=pad_id, padding_side="left")
  extra = _stack_passthrough(examples, _extra_keys(examples, {"prompt_ids"}))
  return {"prompt_ids": ids, "prompt_mask": mask, **extra}


def _pad_right(seqs, length, pad):
  return pad_sequences(seqs, length=length, pad_id=pad, padding_side="right")


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= `longest` (buckets: sorted allowed sequence lengths)."""
  for b in sorted(buckets):
    if b >= longest:
      return b
  raise ValueError(f"longest sequence {longest} exceeds the largest bucket {max(buckets)}; "
                   "add a bucket >= max_length")


def collate_sft(examples: Sequence[Example], *, pad_id: int, max_length: int,
                buckets: Sequence[int] | None = None) -> dict[str, Any]:
  """Right-pads to `input_ids`, `attention_mask`, `loss_mask`, `segment_ids`, `positions`.

  T = max_length, or with `buckets` the smallest bucket holding the longest example (fewer
  padded tokens, a handful of static shapes to compile).
  """
  if buckets:
    max_length = bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
  ids, mask = _pad_right([e["input_ids"] for e in examples], max_length, pad_id)
  loss, _ = _pad_right([e["loss_mask"] for e in examples], max_length, 0)
  positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  extra = _stack_passthrough(examples, _extra_keys(examples, {"input_ids", "loss_mask"}))
  return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss, "segment_ids": mask.copy(),
          "positions": positions, **extra}


def collate_preference(examples: Sequence[Example], *, pad_id: int,
                       max_length: int) -> dict[str, Any]:
  """Right-pads chosen/rejected to `{side}_ids`, `{side}_mask`, `{side}_loss_mask` [B, T]."""
  out = {}
  for side in ("chosen", "rejected"):
    out[f"{side}_ids"], out[f"{side}_mask"] = _pad_right(
        [e[f"{side}_ids"] for e in examples], max_length, pad_id)
    out[f"{side}_loss_mask"], _ = _pad_right(
        [e[f"{side}_loss_mask"] for e in examples], max_length, 0)
  known = {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("ids", "loss_mask")}
  out.update(_stack_passthrough(examples, _extra_keys(examples, known)))
  return out


def segment_attention_mask(segment_ids: np.ndarray, *, causal: bool = True) -> np.ndarray:
  """[B, T] segment ids -> [B, T, T] bool: query i may attend key j iff both are in the same
  non-zero segment (and j <= i when causal). Packed examples never see each other."""
  seg = np.asarray(segment_ids)
  allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
  if causal:
    t = seg.shape[1]
    allowed &= np.tril(np.ones((t, t), dtype=bool))[None]
  return allowed


class Batcher:
  """Collects `batch_size` examples, then collates them. `add` returns False when full."""

  def __init__(self, batch_size: int, collate: Callable[[list[Example]], dict[str, Any]]):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size, self._collate, self._examples = batch_size, collate, []

  def add(self, example: Example) -> bool:
    if len(self._examples) >= self.batch_size:
      return False
    self._examples.append(example)
    return True

  def full(self) -> bool:
    return len(self._examples) >= self.batch_size

  def empty(self) -> bool:
    return not self._examples

  def emit(self) -> dict[str, Any]:
    batch, self._examples = self._collate(self._examples), []
    return batch


class Packer:
  """Packs SFT examples greedily, in order, into `batch_size` rows of `max_length` tokens.

  Output [B, T]: `input_ids`, `loss_mask`, `attention_mask`, `segment_ids` (1, 2, ... per
  example in a row, 0 on padding; attend only where segment ids are equal) and `positions`
  (restarting at 0 for each example).
  """

  def __init__(self, batch_size: int, *, max_length: int, pad_id: int):
    self.batch_size, self.max_length, self.pad_id = batch_size, max_length, pad_id
    self._rows: list[list[Example]] = []

  def _used(self, row) -> int:
    return sum(len(e["input_ids"]) for e in row)

  def add(self, example: Example) -> bool:
    n = len(example["input_ids"])
    if n > self.max_length:
      raise ValueError(f"packed example has {n} tokens > max_length={self.max_length}")
    if self._rows and self._used(self._rows[-1]) + n <= self.max_length:
      self._rows[-1].append(example)
      return True
    if len(self._rows) < self.batch_size:
      self._rows.append([example])
      return True
    return False

  def full(self) -> bool:
    return len(self._rows) >= self.batch_size and self._used(self._rows[-1]) >= self.max_length

  def empty(self) -> bool:
    return not self._rows

  def emit(self) -> dict[str, Any]:
    shape = (self.batch_size, self.max_length)
    ids = np.full(shape, self.pad_id, np.int32)
    loss, seg, pos = (np.zeros(shape, np.int32) for _ in range(3))
    for b, row in enumerate(self._rows):
      t = 0
      for s, ex in enumerate(row, start=1):
        n = len(ex["input_ids"])
        ids[b, t:t + n] = ex["input_ids"]
        loss[b, t:t + n] = ex["loss_mask"]
        seg[b, t:t + n] = s
        pos[b, t:t + n] = np.arange(n)
        t += n
    self._rows = []
    return {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "loss_mask": loss,
            "segment_ids": seg, "positions": pos}
