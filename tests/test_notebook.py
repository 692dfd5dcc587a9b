import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from vlm.training.run import train

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_run.ipynb"


def test_notebook_opens_a_run(make_cfg, tmp_path, monkeypatch):
    train(make_cfg("trainer.max_steps=4", "trainer.val_check_interval=2", "benchmark.limit=8"))
    monkeypatch.setenv("VLM_RUN_DIR", str(tmp_path / "run"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # curves and predictions
    assert os.environ["VLM_RUN_DIR"] in "".join(o.get("text", "") for o in outputs)
