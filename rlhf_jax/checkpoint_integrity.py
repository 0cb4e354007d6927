"""Integrity of checkpoint step directories (see `rlhf_jax.checkpoint`).

A step directory is complete when Orbax committed it (`_CHECKPOINT_METADATA`) and it
holds the integrity manifest `rlhf_integrity.json` (size and sha256 of every data
file). The manifest is written into Orbax's temporary directory after all items are
finalised and before Orbax renames that directory to `<step>`, so it is part of the
atomic commit: a `<step>` directory without it was not written by a finished save
(or was copied or edited since) and is never restored.

Also here: the errors, and the diagnosis of a failed write (full disk, read-only or
unwritable directory) into an error that names the directory, the cause and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

FORMAT_VERSION = 1
INTEGRITY_FILE = "rlhf_integrity.json"
ITEMS = ("state", "data_state", "config", "meta")
ORBAX_METADATA = "_CHECKPOINT_METADATA"
# Written by Orbax's commit itself, after the manifest: not listed in it.
_COMMIT_RECORDS = (ORBAX_METADATA, "commit_success.txt")

METADATA_MISSING = f"{ORBAX_METADATA} missing"
MANIFEST_MISSING = f"integrity manifest {INTEGRITY_FILE} missing"


class CheckpointError(RuntimeError):
  """A checkpoint step is missing, incomplete or corrupted."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint step could not be written (full disk, read-only directory, ...).

  Attributes: `directory` (the checkpoint directory), `step` (the step being
  written, None outside a save), `errno` (the OS error number when known).
  """

  def __init__(self, message: str, *, directory: str, step: int | None,
               errno_: int | None):
    super().__init__(message)
    self.directory = directory
    self.step = step
    self.errno = errno_


# ------------------------------------------------------------------ manifest


def _hash_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _list_files(step_dir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != INTEGRITY_FILE and rel not in _COMMIT_RECORDS and not rel.endswith(".tmp"):
        out.append(rel)
  return sorted(out)


def write_integrity(step_dir: str, *, checksum: bool = True) -> None:
  """Writes size (+ sha256) of every data file of a finalised step, atomically."""
  files = {}
  for rel in _list_files(step_dir):
    p = os.path.join(step_dir, rel)
    files[rel] = {"size": os.path.getsize(p),
                  "sha256": _hash_file(p) if checksum else None}
  tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": FORMAT_VERSION, "files": files}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))


def step_status(step_dir: str) -> str | None:
  """None for a complete step directory, else why it is incomplete."""
  if not os.path.exists(os.path.join(step_dir, ORBAX_METADATA)):
    return METADATA_MISSING
  if not os.path.exists(os.path.join(step_dir, INTEGRITY_FILE)):
    return MANIFEST_MISSING
  return None


def scan_steps(workdir: str) -> dict[int, str | None]:
  """{step: None (complete) or why incomplete} for every `<step>` directory.

  Orbax's temporary directories and steps set aside are not digits and not listed."""
  names = os.listdir(workdir) if os.path.isdir(workdir) else []
  return {int(n): step_status(os.path.join(workdir, n)) for n in names if n.isdigit()}


def verify_step_dir(step_dir: str, step: int, *, checksum: bool = True) -> None:
  """Raises CheckpointError naming the step and the problem, if any."""
  if not os.path.isdir(step_dir):
    raise CheckpointError(f"checkpoint step {step}: directory {step_dir} does not exist.")
  if not os.path.exists(os.path.join(step_dir, ORBAX_METADATA)):
    raise CheckpointError(f"checkpoint step {step} at {step_dir} is incomplete: "
                          f"{ORBAX_METADATA} is missing (save did not finish).")
  for item in ITEMS:
    if not os.path.isdir(os.path.join(step_dir, item)):
      raise CheckpointError(f"checkpoint step {step} at {step_dir} is incomplete: "
                            f"item directory {item!r} is missing.")
  manifest = os.path.join(step_dir, INTEGRITY_FILE)
  if not os.path.exists(manifest):
    raise CheckpointError(
        f"checkpoint step {step} at {step_dir} is incomplete: {MANIFEST_MISSING} (the "
        "save did not finish, or the directory was copied or edited without it); its "
        "files cannot be checked, so it is not restored.")
  try:
    with open(manifest) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint step {step}: integrity manifest {manifest} "
                          f"is unreadable ({e}).") from e
  for rel, info in files.items():
    p = os.path.join(step_dir, rel)
    if not os.path.exists(p):
      raise CheckpointError(f"checkpoint step {step}: file {rel} is missing.")
    size = os.path.getsize(p)
    if size != info["size"]:
      raise CheckpointError(f"checkpoint step {step}: file {rel} has {size} bytes, "
                            f"expected {info['size']} (truncated or overwritten).")
    if checksum and info.get("sha256") and _hash_file(p) != info["sha256"]:
      raise CheckpointError(f"checkpoint step {step}: file {rel} fails its sha256 "
                            "check (corrupted).")


# ------------------------------------------------------------------ write failures


_CAUSES = {  # errno: (cause, fix)
    errno.ENOSPC: ("no space left on device",
                   "free space on that filesystem, lower checkpoint.max_to_keep, or point "
                   "config.workdir at a filesystem with room"),
    errno.EDQUOT: ("disk quota exceeded",
                   "free space within the quota, raise the quota, or point config.workdir "
                   "elsewhere"),
    errno.EROFS: ("the filesystem is read-only",
                  "remount it read-write, or point config.workdir at a writable directory"),
    errno.EACCES: ("permission denied",
                   "make the directory writable by this user, or point config.workdir "
                   "elsewhere"),
    errno.EPERM: ("operation not permitted",
                  "check the directory's permissions and attributes (e.g. `lsattr`; "
                  "`chattr -i`), or point config.workdir elsewhere"),
    errno.EIO: ("input/output error", "check the disk and its mount"),
}


def _chain(exc: BaseException | None):
  seen = set()
  stack = [exc]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def os_errno(exc: BaseException | None) -> int | None:
  """The OS error number of a failed write, from the exception chain or its text.

  Tensorstore reports OS errors as e.g. ValueError("... No space left on device
  [os_error_code='28']")."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _CAUSES:
      return e.errno
  for e in _chain(exc):
    text = str(e)
    for n in _CAUSES:
      if os.strerror(n) in text or f"os_error_code='{n}'" in text:
        return n
  return None


def probe_errno(directory: str) -> int | None:
  """Why `directory` cannot take a write now (read-only, full, ...), if it cannot."""
  d = directory
  while d and not os.path.isdir(d):
    d = os.path.dirname(d)
  if not d:
    return None
  try:
    st = os.statvfs(d)
    if st.f_flag & os.ST_RDONLY:
      return errno.EROFS
    if st.f_bavail == 0:
      return errno.ENOSPC
  except OSError:
    pass
  probe = os.path.join(d, f".rlhf_write_probe.{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    return e.errno if e.errno in _CAUSES else None
  finally:
    try:
      os.remove(probe)
    except OSError:
      pass
  return None


def write_error(directory: str, step: int | None, exc: BaseException | None, *,
                previous: int | None, probe: bool = True) -> CheckpointWriteError | None:
  """A CheckpointWriteError naming directory, cause and fix; None when `exc` is not an
  OS write failure and `probe` is off (the caller re-raises `exc` as it is)."""
  n = os_errno(exc)
  if n is None and probe:
    n = probe_errno(directory)
  if n is None and not probe:
    return None
  what = "write checkpoint" + (f" step {step}" if step is not None else "s")
  if n is not None:
    cause, fix = _CAUSES[n]
    msg = f"cannot {what} to {directory}: {cause} ({errno.errorcode[n]}). Fix: {fix}."
  else:
    msg = (f"cannot {what} to {directory}: the save did not commit (cause unknown; see "
           "the error chained below and Orbax's log). Fix: check that the directory is "
           "writable and has free space.")
  if previous is not None:
    msg += (f" The newest complete checkpoint (step {previous}) is unchanged; a restart "
            "resumes from it.")
  else:
    msg += " No complete checkpoint exists in that directory yet."
  if exc is not None:
    msg += f"\n  {type(exc).__name__}: {str(exc)[:500]}"
  return CheckpointWriteError(msg, directory=directory, step=step, errno_=n)
