"""``examples/notebook.ipynb`` runs top to bottom in a Jupyter kernel of this very interpreter (a kernel spec written
to a temporary folder; nothing is registered globally), and its report renders as HTML.

The default test swaps the notebook's model-loading cell (tagged ``load``) for the tiny offline model of
``conftest.py`` on whichever TransformerLens generation is installed (a HookedTransformer where there is one, else a
TransformerBridge), with random token ids, and injects a parameter cell after the one tagged ``parameters`` (as
papermill does). The slow test runs the notebook as it is, on the real SmolLM2-135M (cached under the user cache
after its first load).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.ipynb"
TESTS = Path(__file__).resolve().parent
KERNEL = "tl-sparsity-test"

TINY_LOAD = """import sys
sys.path.insert(0, {tests!r})
import torch
from conftest import make_model
from tl_sparsity import SparsityCollector
from tl_sparsity.coding.cpu import cpu_options

torch.set_num_threads(1)   # tiny tensors: threads only cost on a shared CPU
model = make_model({kind!r}).eval()   # 2 layers, d_model 32, random weights, no tokenizer: random token ids
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(1, 200, (8, 33), generator=gen) for _ in range(2 * N_FORWARDS)]
options = cpu_options("cpu")"""


def _kernel_dir(tmp_path: Path) -> Path:
    """A Jupyter data folder holding one kernel spec that starts ``sys.executable`` (this test's interpreter)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tl_sparsity tests", "language": "python"}))
    return tmp_path / "jupyter"


def run_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parameters: str, load: str | None = None):
    """Execute the notebook with ``parameters`` injected after its parameter cell and, when given, ``load`` as the
    source of its ``load`` cell; returns the executed notebook. A cell that raises fails the test, naming it."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    at = next(i for i, t in enumerate(tags) if "parameters" in t)
    check = "import sys as _sys\n_sys.executable"  # the kernel's interpreter, checked below
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f"{parameters}\n{check}", metadata={"tags": ["injected"]}))
    if load is not None:
        next(c for c in nb.cells if "load" in c.metadata.get("tags", [])).source = load
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_dir(tmp_path)))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=900,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    injected = nb.cells[at + 1].outputs
    assert injected[-1]["data"]["text/plain"] == repr(sys.executable)
    return nb


def _outputs(nb, needle: str) -> list[dict]:
    """The outputs of the first code cell whose source contains ``needle``."""
    return next(c for c in nb.cells if c.cell_type == "code" and needle in c.source).outputs


def check_executed(nb, hooks: list[str]) -> None:
    """No cell errored; both reports render as HTML tables naming their hooks; the page and the plot are there."""
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    three = _outputs(nb, "col.report()")[-1]["data"]["text/html"]
    started = _outputs(nb, "report = mlp.report()")[-1]["data"]["text/html"]
    for html, site in ((three, "hook_resid_post"), (started, "hook_mlp_out")):
        assert "<table" in html and "normalized_loss" in html
        assert all(f"blocks.{h}.{site}" in html for h in hooks)
    page = _outputs(nb, "HTML(report.to_html())")[-1]["data"]["text/html"]
    assert page.startswith("<!doctype html>") and "<h3>metadata</h3>" in page
    assert "image/png" in _outputs(nb, "report.plot()")[-1]["data"]


def test_notebook_runs_on_the_tiny_offline_model(tmp_path, monkeypatch):
    from tl_sparsity.tl.models import _has_hooked

    kind = "hooked" if _has_hooked() else "bridge"
    nb = run_notebook(tmp_path, monkeypatch, "LAYERS = None\nN_FORWARDS = 4",
                      TINY_LOAD.format(tests=str(TESTS), kind=kind))
    check_executed(nb, hooks=["0", "1"])
    assert "SparsityCollector(2 hooks, started, tokens=" in _outputs(nb, "model(tokens)")[-1]["data"]["text/plain"]


@pytest.mark.slow
def test_notebook_runs_on_smollm2(tmp_path, monkeypatch):
    nb = run_notebook(tmp_path, monkeypatch, "LAYERS = [0, 29]\nN_FORWARDS = 2")
    check_executed(nb, hooks=["0", "29"])
