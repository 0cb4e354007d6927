"""benchmarks/lora_memory.py: the LoRA GRPO step holds one copy of the base weights (its
arguments are inference's plus adapters and their optimiser state); the script writes its
table and JSON."""

from __future__ import annotations

import json

from benchmarks import lora_memory


def test_lora_step_holds_one_copy_of_the_base_and_the_script_writes_json(tmp_path, capsys):
  out = tmp_path / "lora.json"
  rows = lora_memory.main(["--size=tiny", "--remat=full", "--vocab-chunks=0", "--no-full",
                           f"--out={out}"])
  by = {r["program"]: r for r in rows}
  assert set(by) == {"inference", "lora"}
  for r in rows:
    assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                               - r["alias_bytes"]) > 0
  base = by["inference"]["argument_bytes"]
  # The base once (frozen weights and reference), rank-8 adapters and their Adam moments;
  # a second copy of the weights would double it.
  assert base < by["lora"]["argument_bytes"] < 1.25 * base
  assert by["lora"]["ratio"] == by["lora"]["peak_bytes"] / by["inference"]["peak_bytes"]
  data = json.loads(out.read_text())
  assert data["meta"]["size"] == "tiny" and len(data["rows"]) == 2
  assert "ratio" in capsys.readouterr().out
