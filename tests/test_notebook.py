"""notebooks/evaluate.ipynb runs top to bottom (nbclient), so it cannot rot: with no
checkpoint it trains a tiny model, evaluates synthetic videos and shows both plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "evaluate.ipynb"


def test_evaluate_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the timeline and the SAA frame strip
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "r1@0.5" in text and "refusal_accuracy" in text and "frame times (s):" in text
    assert (tmp_path / "runs" / "notebook" / "eval" / "predictions.jsonl").exists()
    metrics = json.loads((tmp_path / "runs" / "notebook" / "eval" / "metrics.json").read_text())
    assert metrics["num_queries"] == 8 and metrics["num_failed"] == 0
