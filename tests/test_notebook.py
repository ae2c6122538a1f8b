"""The report notebook (``notebooks/recommendations_report.ipynb``) runs headless, end to end.

The test builds a small simulated campaign in real Delta tables (the helpers of
``test_report.py``), registers a Jupyter kernel for this interpreter (the project's .venv) in a
temp folder (the kernel gets this process's environment plus the spec's variables), and
executes every cell with nbclient; the notebook finds the tables through its environment-variable
parameters. A failing cell fails the test with the cell's traceback.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from ipykernel.kernelspec import install
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from pyspark.sql import SparkSession
from test_report import build_campaign_tables

from jobs.report import REPORT_FILES

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "recommendations_report.ipynb"
KERNEL = "carousel-notebook-test"
CELL_TIMEOUT_S = 600


def kernel_manager(prefix: Path, env: dict[str, str]) -> KernelManager:
    """A kernel manager for a kernel spec of this interpreter, with ``env``, under ``prefix``."""
    install(kernel_name=KERNEL, prefix=str(prefix), env=env, display_name="carousel tests")
    specs = KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def test_report_notebook_runs_headless(spark: SparkSession, tmp_path: Path) -> None:
    root = tmp_path / "data"
    build_campaign_tables(spark, root, uplift=1.0, n_users=600)
    reports = tmp_path / "reports"
    overrides = [
        f"reporting.output_dir={reports}",
        "spark.driver_memory=1g",
        "spark.shuffle_partitions=2",
        "spark.conf.spark.ui.enabled=false",
    ]
    env = {
        "CAROUSEL_STORAGE_ROOT": str(root),
        "CAROUSEL_NOTEBOOK_SET": ";".join(overrides),
        "CAROUSEL_NOTEBOOK_MASTER": "local[2]",
    }
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        km=kernel_manager(tmp_path / "jupyter", env),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    for name in REPORT_FILES:
        assert (reports / "latest" / name).is_file(), name
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "purchase_rate" in text and "responses_attributed" in text
    assert "What user" in "\n".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2


def test_parameters_cell_is_tagged() -> None:
    """Papermill-style tools and the test rely on the parameters living in one tagged cell."""
    cell = nbformat.read(NOTEBOOK, as_version=4).cells[1]
    assert "parameters" in cell.metadata.get("tags", [])
    assert "CAROUSEL_STORAGE_ROOT" in cell.source
