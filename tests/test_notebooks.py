"""The notebooks run top to bottom (tiny settings) and are committed without outputs."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NAMES = [p.name for p in NOTEBOOKS]

# Tiny settings read by every notebook's parameter cell.
TINY_ENV = {
    "DGC_NB_EPOCHS": "1",
    "DGC_NB_NUM_SAMPLES": "3",
    "DGC_NB_MAX_TEST": "100",
    "DGC_NB_NUM_DRAWS": "30",  # PSIS needs at least 25 draws
    "DGC_NB_NUM_EXAMPLES": "40",
    "MPLBACKEND": "Agg",
    # Tiny networks are fastest on one thread, and the machine is shared.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def test_the_expected_notebooks_exist():
    assert NAMES == [
        "01_quickstart.ipynb",
        "02_custom_model.ipynb",
        "03_posterior_diagnostics.ipynb",
        "04_mechanisms.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code"
    for cell in code:
        assert cell.outputs == [], f"{path.name}: a code cell has committed outputs"
        assert cell.execution_count is None, f"{path.name}: a code cell has an execution count"
    # The first code cell is the parameter cell and reads the tiny settings from the environment.
    params = code[0]
    assert "parameters" in params.metadata.get("tags", [])
    assert 'os.environ.get("DGC_NB_EPOCHS"' in params.source


HOOKS = {"on_fit_start", "on_batch_end", "on_train_epoch_end", "on_epoch_end", "on_state", "on_exception", "on_fit_end"}


def _code(path):
    """The notebook's code cells, parsed as one module."""
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    return ast.parse("\n".join(cells))


def _calls(tree, name):
    """Calls of the function ``name`` (a bare name or an attribute), e.g. ``fit(...)`` or ``experiment.fit(...)``."""
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)
    ]


def _classes(tree, base):
    """Classes that subclass ``base`` (by name)."""
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef)
        and any(getattr(b, "id", None) == base or getattr(b, "attr", None) == base for b in n.bases)
    ]


def test_notebook_02_shows_a_custom_model_and_a_custom_callback():
    """Issue 20: notebook 02 writes a model on top of DGC and a callback of its own, and fits the one with the other."""
    tree = _code(NOTEBOOKS[NAMES.index("02_custom_model.ipynb")])
    models = _classes(tree, "DGC")
    assert models, "notebook 02 defines no subclass of DGC"
    assert any(
        isinstance(f, ast.FunctionDef) and f.name in ("prior", "likelihood", "label_logits", "encode", "model", "guide")
        for m in models
        for f in m.body
    ), "notebook 02's DGC subclass overrides none of the model's building blocks"
    callbacks = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef) and any(isinstance(f, ast.FunctionDef) and f.name in HOOKS for f in n.body)
    ]
    assert callbacks, "notebook 02 defines no callback class (a class with one of the training loop's hooks)"
    fits = [c for c in _calls(tree, "fit") if any(k.arg == "callbacks" for k in c.keywords)]
    assert fits, "notebook 02 does not pass callbacks= to fit"
    # What the callback recorded is used after the fit: some attribute of the callback object is read.
    names = {
        t.id
        for c in fits
        for k in c.keywords
        if k.arg == "callbacks"
        for t in ast.walk(k.value)
        if isinstance(t, ast.Name)
    }
    assert any(isinstance(n, ast.Attribute) and getattr(n.value, "id", None) in names for n in ast.walk(tree)), (
        "notebook 02 never reads what its callback recorded"
    )


def _keywords(tree):
    """Every ``name=constant`` keyword argument in the notebook, as (name, value) pairs."""
    return {
        (n.arg, n.value.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.keyword) and isinstance(n.value, ast.Constant)
    }


def test_notebook_04_fits_each_of_the_five_mechanisms():
    """Issue 21: a notebook section per mechanism, each set as its recipe option."""
    tree = _code(NOTEBOOKS[NAMES.index("04_mechanisms.ipynb")])
    keywords = _keywords(tree)
    assert ("latent_prior", "class_conditional") in keywords
    assert ("perturbation_start", 0.7) in keywords
    assert ("perturbation_noise", "head") in keywords
    assert ("objective", "iwae-cf") in keywords
    assert any(k.arg == "retrain_head_epochs" for k in ast.walk(tree) if isinstance(k, ast.keyword))
    assert ("swag_start", 0.7) in keywords
    assert any(k.arg == "swag" for c in _calls(tree, "score") for k in c.keywords)


@pytest.mark.parametrize(
    "path",
    [p for p in NOTEBOOKS if p.name != "02_custom_model.ipynb"],
    ids=[n for n in NAMES if n != "02_custom_model.ipynb"],
)
def test_notebooks_train_with_the_one_run_sequence(path):
    """Issue 20: a notebook that trains the standard DGC uses experiment.train (seed, build, fit), not its own copy."""
    tree = _code(path)
    assert _calls(tree, "train"), f"{path.name} does not call experiment.train"
    assert not _calls(tree, "fit"), f"{path.name} calls fit directly; use experiment.train(recipe, split, seed=...)"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One kernel on this interpreter (the venv's) for all notebooks, with the tiny settings.

    A kernelspec naming ``sys.executable`` makes the interpreter certain, whatever other ``python3``
    kernels are installed. The notebooks share the kernel process only to pay the imports (torch,
    Pyro, ArviZ: many seconds on a shared machine) once: each notebook starts from a namespace cleared
    with ``%reset -f``, so it still runs top to bottom on its own definitions.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    root = tmp_path_factory.mktemp("kernels")
    (root / "dgc-test").mkdir()
    (root / "dgc-test" / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "dgc_pyro test kernel",
                "language": "python",
            }
        )
    )
    workdir = tmp_path_factory.mktemp("notebook-cwd")
    km = KernelManager(kernel_name="dgc-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(root)]))
    km.start_kernel(env={**os.environ, **TINY_ENV}, cwd=str(workdir))
    yield km
    km.shutdown_kernel(now=True)


RESET = 'import matplotlib.pyplot as _plt\n_plt.close("all")\n%reset -f'


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_executes(path, kernel):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(RESET))
    nb.cells.append(
        nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.environ['DGC_NB_EPOCHS'])")
    )
    NotebookClient(nb, km=kernel, timeout=180).execute()
    # Every cell ran without error, on this interpreter, with the tiny settings.
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    # No "TqdmWarning: IProgress not found" (pyro.infer imports tqdm.auto; ipywidgets is not a dependency).
    assert not [o for c in code for o in c.outputs if "IProgress" in o.get("text", "")]
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).split()
    assert Path(printed[0]) == Path(sys.executable) and printed[1] == TINY_ENV["DGC_NB_EPOCHS"]
    # The committed file is untouched by the run.
    assert all(c.outputs == [] for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_the_executed_copy_in_docs_matches_and_shows_its_figures(path):
    """docs/notebooks/ holds each notebook executed with its full settings (``notebooks/render.py``), so readers
    see the figures; its code must be the notebook's own, or the copy is stale."""
    executed = nbformat.read(path.parents[1] / "docs" / "notebooks" / path.name, as_version=4)
    source = [c.source for c in nbformat.read(path, as_version=4).cells]
    assert [c.source for c in executed.cells] == source, f"re-run: python notebooks/render.py {path.name}"
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error" or o.get("name") == "stderr"]
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
