"""Tests for rlhf_jax.checkpoint: roundtrip, retention, corruption, reshard."""

from __future__ import annotations

import errno
import glob
import os
import re
import signal
import subprocess
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import checkpoint as C
from rlhf_jax import sharding as S
from rlhf_jax.train.runner import Runner

CONFIG = {"model": {"hidden_size": 8, "num_layers": 2}, "lr": 1e-3,
          "run": {"name": "t", "betas": (0.9, 0.99)}}
TX = optax.adam(1e-2)
# Only guards against a hang (a save takes well under a second here); never a speed check.
HANG_GUARD_S = 120


def make_state(seed: int = 0):
  k = jax.random.split(jax.random.key(seed), 3)
  params = {"w": jax.random.normal(k[0], (8, 4)), "b": jax.random.normal(k[1], (4,))}
  opt = TX.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt = TX.update(grads, opt, params)  # non-trivial moments and count
  return {"params": params, "opt": opt, "ref": jax.tree.map(lambda x: x * 2, params),
          "rng": k[2], "step": jnp.asarray(seed, jnp.int32)}


def assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)

  def eq(x, y):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jnp.issubdtype(y.dtype, jax.dtypes.prng_key)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  jax.tree.map(eq, a, b)


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_roundtrip_exact_state_data_config(tmp_path):
  ck = C.Checkpointer(tmp_path, max_to_keep=3, async_save=False)
  state = make_state(1)
  data_state = {"next_index": 17, "epoch": 2, "blob": b"\x00\x01grain"}
  assert ck.save(5, state, data_state=data_state, config=CONFIG)
  assert ck.latest_step() == 5
  out, ds, cfg, step = ck.restore(abstract(make_state(0)))
  assert step == 5
  assert_tree_equal(out, state)
  assert isinstance(out["opt"][0], optax.ScaleByAdamState)
  assert ds == data_state
  assert cfg == C.to_json_dict(CONFIG)
  assert cfg["run"]["betas"] == [0.9, 0.99]
  # Restored key is a usable typed key giving the same draws.
  np.testing.assert_array_equal(jax.random.normal(out["rng"], (3,)),
                                jax.random.normal(state["rng"], (3,)))
  # Without a target the raw tree comes back, keys rewrapped.
  raw, _, _, _ = ck.restore(None)
  assert jnp.issubdtype(raw["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(raw["params"]["w"], state["params"]["w"])
  # ConfigDict configs are stored as their JSON dict.
  ck.save(6, state, config=ml_collections.ConfigDict(CONFIG))
  assert ck.restore(abstract(state))[2] == cfg
  # Saving the same step again is a no-op, not an error.
  assert not ck.save(5, state, data_state=data_state, config=CONFIG, force=True)


def test_intervals_and_keep_k(tmp_path):
  ck = C.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2, async_save=False)
  state = make_state()
  saved = [s for s in range(1, 9) if ck.save(s, state, data_state={}, config=CONFIG)]
  assert saved == [2, 4, 6, 8]
  assert ck.all_steps() == [6, 8]
  assert sorted(os.listdir(tmp_path)) == ["6", "8"]
  assert ck.save(9, state, config=CONFIG, force=True)
  assert ck.all_steps() == [8, 9]
  timed = C.Checkpointer(tmp_path / "m", save_interval_steps=1000,
                         save_interval_minutes=0.0, async_save=False)
  assert timed.save(3, state, config=CONFIG)  # due by time, not by step


def _data_files(step_dir):
  return [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
          if os.path.isfile(f) and os.sep + "d" + os.sep in f]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_metadata"])
def test_corruption_detected_and_fallback(tmp_path, damage):
  ck = C.Checkpointer(tmp_path, max_to_keep=3, async_save=False)
  s1, s2 = make_state(1), make_state(2)
  ck.save(1, s1, data_state={"i": 1}, config=CONFIG)
  ck.save(2, s2, data_state={"i": 2}, config=CONFIG)
  d2 = ck.step_dir(2)
  if damage == "delete_metadata":
    os.remove(os.path.join(d2, "_CHECKPOINT_METADATA"))
  else:
    for f in _data_files(d2):
      with open(f, "rb") as fh:
        data = fh.read()
      with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2] if damage == "truncate" else
                 bytes(b ^ 0xFF for b in data))
  if damage != "delete_metadata":
    with pytest.raises(C.CheckpointError, match="checkpoint step 2.*(truncated|sha256)"):
      ck.restore(abstract(s1), step=2)
  with pytest.warns(RuntimeWarning, match="checkpoint step 2"):
    out, ds, _, step = ck.restore_latest_valid(abstract(s1))
  assert step == 1 and ds == {"i": 1}
  assert_tree_equal(out, s1)


# Orbax leaves an unawaited read coroutine behind when a read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("manifest", [True, False])
def test_resumed_run_saves_again_over_a_corrupted_step(tmp_path, manifest):
  # A run that fell back past a corrupted step 2 must be able to save step 2 again; otherwise
  # every later resume falls back to step 1 and loses the resumed run's progress.
  ck = C.Checkpointer(tmp_path, max_to_keep=None, async_save=False)
  ck.save(1, make_state(1), data_state={"i": 1}, config=CONFIG)
  ck.save(2, make_state(2), data_state={"i": 2}, config=CONFIG)
  if not manifest:  # then step 2 is incomplete, whatever its data
    os.remove(os.path.join(ck.step_dir(2), C.INTEGRITY_FILE))
  for f in _data_files(ck.step_dir(2)):
    os.truncate(f, os.path.getsize(f) // 2)
  ck = C.Checkpointer(tmp_path, max_to_keep=None, async_save=False)  # the resumed run
  with pytest.warns(RuntimeWarning, match="checkpoint step 2"):
    assert ck.restore_latest_valid(abstract(make_state()))[3] == 1
  assert ck.save(2, make_state(7), data_state={"i": 7}, config=CONFIG) is True
  ck.save(3, make_state(3), data_state={"i": 3}, config=CONFIG)
  kind = "corrupted" if manifest else "incomplete"
  aside = [n for n in os.listdir(tmp_path) if n.startswith(f"2.{kind}-")]
  assert len(aside) == 1  # kept on disk, renamed
  ck = C.Checkpointer(tmp_path, max_to_keep=None, async_save=False)
  out, ds, _, step = ck.restore(abstract(make_state()), step=2)
  assert step == 2 and ds == {"i": 7}
  assert_tree_equal(out, make_state(7))
  assert ck.restore_latest_valid(abstract(make_state()))[3] == 3


def test_saving_an_intact_existing_step_is_a_no_op(tmp_path):
  ck = C.Checkpointer(tmp_path, async_save=False)
  ck.save(1, make_state(1), config=CONFIG)
  ck = C.Checkpointer(tmp_path, async_save=False)
  assert ck.save(1, make_state(5), config=CONFIG) is False
  assert_tree_equal(ck.restore(abstract(make_state()), step=1)[0], make_state(1))


def wide_state(seed: int):
  """Weights large enough to be stored outside Orbax's checksummed b-tree nodes."""
  return {"w": jax.random.normal(jax.random.key(seed), (64, 64)),
          "step": jnp.asarray(seed, jnp.int32)}


def flip_one_bit(path):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x10
    f.seek(0)
    f.write(bytes(data))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_step_without_manifest_is_incomplete_and_a_bit_flip_in_it_changes_nothing(
    tmp_path, async_save):
  ck = C.Checkpointer(tmp_path, max_to_keep=None, async_save=async_save)
  ck.save(1, wide_state(1), data_state={"i": 1}, config=CONFIG)
  ck.save(2, wide_state(2), data_state={"i": 2}, config=CONFIG)
  ck.wait()
  d2 = ck.step_dir(2)
  os.remove(os.path.join(d2, C.INTEGRITY_FILE))
  flip_one_bit(max(_data_files(d2), key=os.path.getsize))  # Orbax's own read misses this
  ck = C.Checkpointer(tmp_path, max_to_keep=None, async_save=async_save)  # the resumed run
  assert ck.all_steps() == [1] and ck.latest_step() == 1
  with pytest.raises(C.CheckpointError,
                     match="checkpoint step 2 .*incomplete: integrity manifest .* missing"):
    ck.restore(abstract(wide_state(0)), step=2)
  with pytest.warns(RuntimeWarning, match="checkpoint step 2 .*incomplete .*integrity manifest"):
    out, ds, _, step = ck.restore_latest_valid(abstract(wide_state(0)))
  assert step == 1 and ds == {"i": 1}
  assert_tree_equal(out, wide_state(1))  # the run continues from step 1, unchanged
  with pytest.warns(RuntimeWarning, match="step 2 .*incomplete .*moved to"):
    assert ck.save(2, wide_state(7), data_state={"i": 7}, config=CONFIG)
  ck.wait()
  assert len([n for n in os.listdir(tmp_path) if n.startswith("2.incomplete-")]) == 1
  out, ds, _, step = C.Checkpointer(tmp_path, async_save=False).restore(abstract(wide_state(0)))
  assert step == 2 and ds == {"i": 7}
  assert_tree_equal(out, wide_state(7))


def test_async_step_appears_with_its_manifest(tmp_path):
  # The manifest is inside Orbax's temporary directory before the rename that commits the
  # step: a process killed at any moment after the rename leaves a complete step.
  ck = C.Checkpointer(tmp_path, async_save=True, max_to_keep=None)
  ck.save(1, make_state(1), config=CONFIG)
  d1 = ck.step_dir(1)
  t0 = time.monotonic()
  while not os.path.isdir(d1):  # no wait(): as if the process died right after the commit
    assert time.monotonic() - t0 < HANG_GUARD_S, "the async save never committed"
    time.sleep(0.001)
  assert os.path.exists(os.path.join(d1, C.INTEGRITY_FILE))
  assert C.Checkpointer(tmp_path, async_save=False).latest_step() == 1
  ck.wait()
  assert_tree_equal(ck.restore(abstract(make_state()))[0], make_state(1))


def test_interrupted_save_is_never_latest(tmp_path):
  ck = C.Checkpointer(tmp_path, async_save=False)
  s1 = make_state(1)
  ck.save(1, s1, config=CONFIG)
  # A crash mid-save leaves Orbax's temporary directory, or (copy tools) a
  # step directory without its commit metadata.
  os.makedirs(tmp_path / "2.orbax-checkpoint-tmp-1234" / "state")
  os.makedirs(tmp_path / "3" / "state")
  ck2 = C.Checkpointer(tmp_path, async_save=False)
  assert ck2.all_steps() == [1]
  assert ck2.latest_step() == 1
  out, _, _, step = ck2.restore(abstract(s1))
  assert step == 1
  assert_tree_equal(out, s1)
  with pytest.raises(C.CheckpointError, match="step 3 .*_CHECKPOINT_METADATA"):
    ck2.restore(abstract(s1), step=3)
  # Resuming and saving the same step again sets the partial dir aside.
  with pytest.warns(RuntimeWarning, match="step 3 .*incomplete"):
    assert ck2.save(3, make_state(3), config=CONFIG)
  assert ck2.all_steps() == [1, 3]
  assert_tree_equal(ck2.restore(abstract(s1))[0], make_state(3))


def test_async_save_completes(tmp_path):
  ck = C.Checkpointer(tmp_path, async_save=True, max_to_keep=2)
  states = [make_state(i) for i in range(3)]
  for i, s in enumerate(states):
    ck.save(i + 1, s, data_state={"i": i}, config=CONFIG)
  ck.wait()
  assert ck.all_steps() == [2, 3]
  for s in (2, 3):  # manifests written once committed
    assert os.path.exists(os.path.join(ck.step_dir(s), C.INTEGRITY_FILE))
  out, ds, _, step = ck.restore(abstract(states[0]))
  assert step == 3 and ds == {"i": 2}
  assert_tree_equal(out, states[2])
  ck.close()


def test_restore_single_device_checkpoint_onto_8_device_mesh(tmp_path):
  state = jax.device_put(make_state(3), jax.devices()[0])
  assert len(state["params"]["w"].sharding.device_set) == 1
  ck = C.Checkpointer(tmp_path, async_save=False)
  ck.save(7, state, config=CONFIG)
  mesh = S.make_mesh(2, 2, 2)
  repl = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: repl, abstract(state))
  shardings["params"] = {"w": NamedSharding(mesh, P("fsdp", "tensor")),
                         "b": NamedSharding(mesh, P("tensor"))}
  out, _, _, _ = ck.restore(abstract(state), shardings=shardings)
  assert out["params"]["w"].sharding == shardings["params"]["w"]
  assert len(out["params"]["w"].sharding.device_set) == 8
  assert {sh.data.shape for sh in out["params"]["w"].addressable_shards} == {(4, 2)}
  assert_tree_equal(out, state)
  # And the concrete-target form: shardings taken from the target's arrays.
  target = jax.device_put(make_state(0), shardings)
  out2, _, _, _ = ck.restore(target)
  assert out2["params"]["b"].sharding == shardings["params"]["b"]
  assert_tree_equal(out2, state)


@flax.struct.dataclass
class _Old:
  params: dict
  rng: jax.Array
  step: jax.Array


@flax.struct.dataclass
class _New:  # a field added to the train state after the checkpoint was written
  params: dict
  rng: jax.Array
  step: jax.Array
  added: Any = None


def test_checkpoint_from_before_an_added_state_field(tmp_path):
  """An added field that this run leaves empty restores from an older checkpoint (state
  equal, the field None); one that this run fills is an error naming the field."""
  s = make_state(3)
  old = _Old(params=s["params"], rng=s["rng"], step=s["step"])
  ck = C.Checkpointer(tmp_path, async_save=False)
  assert ck.save(4, old, config=CONFIG)
  out, _, _, step = ck.restore(abstract(_New(params=s["params"], rng=s["rng"],
                                              step=s["step"])))
  assert step == 4 and isinstance(out, _New) and out.added is None
  assert_tree_equal((out.params, out.rng, out.step), (old.params, old.rng, old.step))
  filled = _New(params=s["params"], rng=s["rng"], step=s["step"], added=jnp.zeros(2))
  with pytest.raises(C.CheckpointError, match=r"without the state field\(s\) \['added'\]"):
    ck.restore(abstract(filled))
  # the fallback path reports the same and leaves the files alone
  with pytest.raises(C.CheckpointError, match="added"):
    ck.restore_latest_valid(abstract(filled))
  assert ck.all_steps() == [4]


def test_config_mismatch_names_keys(tmp_path):
  ck = C.Checkpointer(tmp_path, async_save=False)
  ck.save(1, make_state(), config=CONFIG)
  other = {**CONFIG, "model": {"hidden_size": 16, "num_layers": 2, "vocab": 5},
           "lr": 5.0}
  with pytest.raises(ValueError) as e:
    ck.restore(abstract(make_state()), config=other)
  msg = str(e.value)
  assert "model.hidden_size: checkpoint=8 current=16" in msg
  assert "model.vocab: checkpoint=<absent> current=5" in msg
  assert "lr" not in msg  # learning rate may change on resume
  # Matching on more keys is opt-in.
  with pytest.raises(ValueError, match="lr: checkpoint=0.001 current=5.0"):
    C.check_config_compatible(CONFIG, {**CONFIG, "lr": 5.0}, must_match=("lr",))
  ck.restore(abstract(make_state()), config={**CONFIG, "lr": 5.0})


def test_config_mismatch_is_named_before_the_state_mismatch_it_causes(tmp_path):
  ck = C.Checkpointer(tmp_path, async_save=False)
  ck.save(1, make_state(), config=CONFIG)
  wider = abstract(make_state())
  wider["params"]["w"] = jax.ShapeDtypeStruct((3, 3), jnp.float32)  # a wider model's weights
  other = {**CONFIG, "model": {**CONFIG["model"], "hidden_size": 3}}
  with pytest.raises(ValueError, match="model.hidden_size: checkpoint=8 current=3"):
    ck.restore(wider, config=other)
  with pytest.raises(ValueError, match="model.hidden_size"):  # no fallback to older steps
    ck.restore_latest_valid(wider, config=other)
  with pytest.raises(C.CheckpointError, match="checkpoint step 1 .*could not be restored"):
    ck.restore(wider, config=CONFIG)  # same config, different tree: the state's own error


def test_restore_errors(tmp_path):
  ck = C.Checkpointer(tmp_path, async_save=False)
  with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
    ck.restore(abstract(make_state()))
  with pytest.raises(FileNotFoundError):
    ck.restore_latest_valid(abstract(make_state()))
  with pytest.raises(ValueError, match="save_interval_steps"):
    C.Checkpointer(tmp_path, save_interval_steps=0)
  ck.save(1, make_state(), config=CONFIG)
  wrong = abstract(make_state())
  wrong["params"]["w"] = jax.ShapeDtypeStruct((3, 3), jnp.float32)
  with pytest.raises(C.CheckpointError, match="checkpoint step 1"):
    ck.restore(wrong)


# ------------------------------------------------------------------ write failures


def _fail_manifest_writes(monkeypatch, code):
  """Makes the manifest's final write fail with `code` (as a full or read-only disk does)."""
  replace = os.replace

  def failing(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == C.INTEGRITY_FILE:
      raise OSError(code, os.strerror(code), os.fspath(dst))
    return replace(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "replace", failing)


WRITE_FAILURES = {errno.ENOSPC: r"no space left on device \(ENOSPC\)\. Fix: free space",
                  errno.EROFS: r"the filesystem is read-only \(EROFS\)\. Fix: remount"}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("code", sorted(WRITE_FAILURES), ids=errno.errorcode.get)
def test_failed_write_is_named_and_previous_step_stays_loadable(tmp_path, monkeypatch,
                                                                 code, async_save):
  ck = C.Checkpointer(tmp_path, max_to_keep=1, async_save=async_save)
  ck.save(1, make_state(1), data_state={"i": 1}, config=CONFIG)
  ck.wait()
  _fail_manifest_writes(monkeypatch, code)
  with pytest.raises(C.CheckpointWriteError,
                     match=f"cannot write checkpoint step 2 to {re.escape(str(tmp_path))}: "
                           f"{WRITE_FAILURES[code]}.*newest complete checkpoint \\(step 1\\) "
                           "is unchanged") as e:
    ck.save(2, make_state(2), data_state={"i": 2}, config=CONFIG)
    ck.wait()  # an async save's failure is raised here at the latest
  assert (e.value.directory, e.value.step, e.value.errno) == (str(tmp_path), 2, code)
  monkeypatch.undo()
  # max_to_keep=1 deleted nothing: old steps go only once a newer one is complete.
  assert sorted(os.listdir(tmp_path)) == ["1"]
  out, ds, _, step = C.Checkpointer(tmp_path, async_save=False).restore_latest_valid(
      abstract(make_state()))
  assert step == 1 and ds == {"i": 1}
  assert_tree_equal(out, make_state(1))


def test_run_stops_with_the_write_error(tmp_path, monkeypatch):
  old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    c = ml_collections.ConfigDict(dict(workdir=str(tmp_path), resume="auto",
                                       checkpoint=dict(every_steps=1, async_save=False)))
    run = Runner(c, make_state(0))
    assert not run.after_step(1, make_state(1))
    _fail_manifest_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(C.CheckpointWriteError, match="step 2 .*no space left on device"):
      run.after_step(2, make_state(2))
    monkeypatch.undo()
    assert Runner(c, make_state(0)).start_step == 1
  finally:
    for s, h in old.items():
      signal.signal(s, h)


@pytest.fixture
def small_fs(tmp_path):
  """A real 1 MiB tmpfs (needs permission to mount; skipped where there is none)."""
  mnt = tmp_path / "fs"
  mnt.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                     capture_output=True, text=True, check=False)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def big_state(seed: int):
  return {"w": jax.random.normal(jax.random.key(seed), (400, 400))}  # 640 kB, incompressible


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_full_disk_is_named_and_previous_step_stays_loadable(small_fs, async_save):
  ck = C.Checkpointer(small_fs / "ck", max_to_keep=1, async_save=async_save)
  ck.save(1, big_state(1), config=CONFIG)
  ck.wait()
  with pytest.raises(C.CheckpointWriteError,
                     match=r"cannot write checkpoint step 2 to .*/fs/ck: no space left on "
                           r"device \(ENOSPC\).*\(step 1\) is unchanged") as e:
    ck.save(2, big_state(2), config=CONFIG)  # a second step does not fit
    ck.wait()
  assert e.value.errno == errno.ENOSPC
  assert sorted(os.listdir(small_fs / "ck")) == ["1"]  # the partial write was removed
  out, _, _, step = C.Checkpointer(small_fs / "ck", async_save=False).restore_latest_valid(
      abstract(big_state(0)))
  assert step == 1
  assert_tree_equal(out, big_state(1))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_read_only_disk_is_named_and_previous_step_stays_loadable(small_fs, async_save):
  ck = C.Checkpointer(small_fs / "ck", max_to_keep=1, async_save=async_save)
  ck.save(1, make_state(1), config=CONFIG)
  ck.wait()
  subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
  with pytest.raises(C.CheckpointWriteError,
                     match=r"cannot write checkpoint step 2 to .*/fs/ck: the filesystem is "
                           r"read-only \(EROFS\). Fix: remount it read-write") as e:
    ck.save(2, make_state(2), config=CONFIG)
    ck.wait()
  assert e.value.errno == errno.EROFS
  out, _, _, step = C.Checkpointer(small_fs / "ck", async_save=False).restore_latest_valid(
      abstract(make_state()))
  assert step == 1
  assert_tree_equal(out, make_state(1))


def test_preemption_handler_records_signal():
  old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    flag = C.install_preemption_handler()
    flag.clear()
    assert not C.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.should_stop() and C.should_stop()
    assert flag.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):  # second Ctrl-C aborts
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    C._FLAG.clear()
    for s, h in old.items():
      signal.signal(s, h)
