import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from vlm.app.run import train

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


COMPRESSION = NOTEBOOK.parent / "compression.ipynb"


def test_compression_notebook_plots_several_eval_runs(tiny_checkpoint, data_dir, tmp_path, monkeypatch):
    from vlm.app.run import evaluate_checkpoint
    from vlm.config import compose

    runs = []
    for name, lengths in (("short", "[16,32]"), ("long", "[32,64,96]")):
        out = tmp_path / name
        overrides = [
            f"ckpt_path={tiny_checkpoint}",
            "benchmark=synthetic_compression",
            f"benchmark.lengths={lengths}",
        ]
        overrides += [
            "benchmark.samples_per_length=2",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={out}",
            "logger=csv",
        ]
        evaluate_checkpoint(compose("eval", overrides))
        runs.append(str(out))
    monkeypatch.setenv("VLM_EVAL_DIRS", ":".join(runs))
    notebook = nbformat.read(COMPRESSION, as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(COMPRESSION.parent)}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # one figure, both runs on it
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(tables) == 2 and tables[1].count("</tr>") == 1 + 3  # header + the long run's 3 lengths
    assert "2 eval run(s)" in "".join(o.get("text", "") for o in outputs)
