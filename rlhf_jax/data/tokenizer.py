"""Tokenizers: a Hugging Face `tokenizers` wrapper and a file-free character tokenizer.

Both satisfy the `Tokenizer` protocol: `encode`, `encode_with_offsets`, `decode`,
`encode_batch`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `chat_template`,
`apply_chat_template` and `encode_chat` (token ids + assistant-only loss mask).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rlhf_jax.data import chat as chat_lib

Offsets = list[tuple[int, int]]
PADDING_SIDES = ("left", "right")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                  "cls_token", "mask_token")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int
  chat_template: str | None

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ...

  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    ...

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    ...

  def encode_batch(self, texts: Sequence[str], **kwargs) -> dict[str, np.ndarray]:
    ...

  def apply_chat_template(self, messages, *, add_generation_prompt: bool = False,
                          **kwargs) -> str:
    ...

  def encode_chat(self, messages, **kwargs) -> tuple[list[int], list[int]]:
    ...


def pad_sequences(seqs: Sequence[Sequence[int]], *, length: int, pad_id: int,
                  padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
  """Pads int sequences to [B, length]; returns (ids int32, mask int32). Longer raises."""
  if padding_side not in PADDING_SIDES:
    raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
  ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(seqs), length), dtype=np.int32)
  for i, s in enumerate(seqs):
    n = len(s)
    if n > length:
      raise ValueError(f"sequence {i} has {n} tokens > length={length}; raise the length "
                       "or truncate first")
    sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
    ids[i, sl] = np.asarray(s, dtype=np.int32)
    mask[i, sl] = 1
  return ids, mask


class _Common:
  """Methods shared by both tokenizers (defined on top of encode/encode_with_offsets)."""

  chat_template: str | None = None
  pad_id: int
  bos_id: int | None
  eos_id: int

  def special_tokens_map(self) -> dict[str, str]:
    return {}

  def encode_batch(self, texts: Sequence[str], *, max_length: int | None = None,
                   padding_side: str = "right", truncation: bool = False,
                   add_bos: bool = False, add_eos: bool = False) -> dict[str, np.ndarray]:
    """Encodes and pads texts to {"input_ids", "attention_mask"} int32 [B, L].

    L = max_length if given, else the longest sequence. With `truncation=False` a longer
    sequence raises; with True it keeps the tokens nearest the padding-free side (left
    padding keeps the end, right padding keeps the start).
    """
    seqs = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
    length = max_length if max_length is not None else max([len(s) for s in seqs] + [1])
    if truncation:
      seqs = [s[-length:] if padding_side == "left" else s[:length] for s in seqs]
    ids, mask = pad_sequences(seqs, length=length, pad_id=self.pad_id,
                              padding_side=padding_side)
    return {"input_ids": ids, "attention_mask": mask}

  def _template(self, chat_template: str | None) -> str:
    template = chat_template or self.chat_template
    if not template:
      raise ValueError(f"{type(self).__name__} has no chat_template; pass chat_template=... "
                       "or set it in tokenizer_config.json")
    return template

  def apply_chat_template(self, messages, *, add_generation_prompt: bool = False,
                          chat_template: str | None = None, **kwargs) -> str:
    """Renders `messages` to text, exactly as transformers' `apply_chat_template`."""
    return chat_lib.render_chat(self._template(chat_template), messages,
                                add_generation_prompt=add_generation_prompt,
                                special_tokens=self.special_tokens_map(), **kwargs)[0]

  def encode_chat(self, messages, *, add_generation_prompt: bool = False,
                  chat_template: str | None = None,
                  **kwargs) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and a 0/1 mask that is 1 on assistant-turn tokens."""
    text, spans = chat_lib.render_chat(self._template(chat_template), messages,
                                       add_generation_prompt=add_generation_prompt,
                                       special_tokens=self.special_tokens_map(), **kwargs)
    ids, offsets = self.encode_with_offsets(text)
    return ids, chat_lib.spans_to_token_mask(offsets, spans)


def _token_content(value: Any) -> str | None:
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and "content" in value:  # serialised AddedToken
    return value["content"]
  raise ValueError(f"cannot read a special token from {value!r}")


class HFTokenizer(_Common):
  """A `tokenizers.Tokenizer` plus the special tokens and chat template of its config.

  Text is encoded without the post-processor's special tokens (as transformers does for
  chat-rendered text); `add_bos` / `add_eos` add them explicitly.
  """

  def __init__(self, tokenizer, *, chat_template: str | None = None,
               special_tokens: Mapping[str, str | None] | None = None):
    self._tok = tokenizer
    self.chat_template = chat_template
    self._special = {k: v for k, v in dict(special_tokens or {}).items() if v is not None}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True),
                          max(vocab.values(), default=-1) + 1)
    self.bos_id = self._id_of("bos_token")
    self.eos_id = self._id_of("eos_token")
    pad = self._id_of("pad_token")
    if self.eos_id is None:
      raise ValueError("tokenizer has no eos_token; set `eos_token` in tokenizer_config.json")
    self.pad_id = pad if pad is not None else self.eos_id

  def _id_of(self, name: str) -> int | None:
    token = self._special.get(name)
    if token is None:
      return None
    tid = self._tok.token_to_id(token)
    if tid is None:
      raise ValueError(f"{name}={token!r} from tokenizer_config.json is not in the vocabulary")
    return tid

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
    """Loads `tokenizer.json` and, if present, `tokenizer_config.json` / `chat_template.jinja`."""
    import tokenizers  # pylint: disable=import-outside-toplevel
    path = os.fspath(path)
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
      raise FileNotFoundError(f"no tokenizer.json in {path!r}")
    tok = tokenizers.Tokenizer.from_file(tok_file)
    config = {}
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_file):
      with open(cfg_file, encoding="utf-8") as f:
        config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
      named = {t["name"]: t["template"] for t in template}
      template = named.get("default", next(iter(named.values()), None))
    jinja_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        template = f.read()
    special = {k: _token_content(config.get(k)) for k in _SPECIAL_NAMES}
    return cls(tok, chat_template=template, special_tokens=special)

  def special_tokens_map(self) -> dict[str, str]:
    return dict(self._special)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return self._add_special(list(ids), add_bos, add_eos)

  def _add_special(self, ids, add_bos, add_eos):
    if add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token")
      ids = [self.bos_id] + ids
    return ids + [self.eos_id] if add_eos else ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    enc = self._tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [tuple(o) for o in enc.offsets]

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class CharTokenizer(_Common):
  """Character-level tokenizer over a fixed vocabulary; needs no files.

  Ids: 0 pad, 1 bos, 2 eos, then digits, operators/punctuation, a-z, A-Z, space, newline.
  An unknown character raises ValueError naming it.
  """

  PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
  CHARS = "0123456789+-*/=()<>.,:;?!_#" + "abcdefghijklmnopqrstuvwxyz" + \
      "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + " \n"

  def __init__(self, chat_template: str | None = None):
    self.chat_template = chat_template
    self._specials = [self.PAD, self.BOS, self.EOS]
    self._to_id = {c: i + len(self._specials) for i, c in enumerate(self.CHARS)}
    self._to_char = {i: c for c, i in self._to_id.items()}
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self.vocab_size = len(self._specials) + len(self.CHARS)

  def special_tokens_map(self) -> dict[str, str]:
    return {"pad_token": self.PAD, "bos_token": self.BOS, "eos_token": self.EOS}

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    return self.encode_with_offsets(text, add_bos=add_bos, add_eos=add_eos)[0]

  def encode_with_offsets(self, text: str, *, add_bos: bool = False,
                          add_eos: bool = False) -> tuple[list[int], Offsets]:
    ids, offsets, i = [], [], 0
    while i < len(text):
      special = next((s for s in self._specials if text.startswith(s, i)), None)
      if special is not None:
        ids.append(self._specials.index(special))
        offsets.append((i, i + len(special)))
        i += len(special)
        continue
      ch = text[i]
      if ch not in self._to_id:
        raise ValueError(f"CharTokenizer: character {ch!r} at position {i} of {text!r:.60} is "
                         f"not in the vocabulary {self.CHARS!r}")
      ids.append(self._to_id[ch])
      offsets.append((i, i + 1))
      i += 1
    if add_bos:
      ids, offsets = [self.bos_id] + ids, [(0, 0)] + offsets
    if add_eos:
      ids, offsets = ids + [self.eos_id], offsets + [(len(text), len(text))]
    return ids, offsets

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i < len(self._specials):
        if not skip_special_tokens:
          out.append(self._specials[i])
      elif i in self._to_char:
        out.append(self._to_char[i])
      else:
        raise ValueError(f"CharTokenizer: id {i} is outside the vocabulary [0, {self.vocab_size})")
    return "".join(out)


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Raises ValueError if the tokenizer can emit ids >= the model's embedding rows."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
        f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's embedding "
        f"vocab_size={vocab_size}: ids >= {vocab_size} would index out of range. Set the model "
        f"config's vocab_size to at least {tokenizer.vocab_size} (or use a matching tokenizer).")
