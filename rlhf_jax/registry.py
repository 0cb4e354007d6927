"""A tiny name -> function registry used by configs (losses, advantages, rewards)."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional


class Registry:
  """Maps names to functions, optionally tagged with a family.

  `get` raises a `KeyError` that lists the known names, so a typo in a config
  says what would have been accepted.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._fns: Dict[str, Callable] = {}
    self._family: Dict[str, str] = {}

  def register(self, name: str, family: str = "") -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
      if name in self._fns and self._fns[name] is not fn:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._fns[name] = fn
      self._family[name] = family
      return fn
    return deco

  def get(self, name: str) -> Callable:
    try:
      return self._fns[name]
    except KeyError:
      raise KeyError(
          f"unknown {self.kind} {name!r}; known {self.kind}s: "
          f"{', '.join(sorted(self._fns))}") from None

  def names(self, family: Optional[str] = None) -> Iterable[str]:
    return sorted(n for n in self._fns if family is None or self._family[n] == family)

  def family(self, name: str) -> str:
    self.get(name)
    return self._family[name]

  def __contains__(self, name: str) -> bool:
    return name in self._fns
