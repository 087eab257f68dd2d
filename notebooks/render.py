"""Execute the notebooks with their full settings into ``docs/notebooks/``, so that readers see the figures.

The notebooks in this folder stay without outputs (``tests/test_notebooks.py`` checks that, and executes them with
tiny settings); the executed copies are what the docs link to. Needs no network: digits is bundled.

    .venv/bin/python notebooks/render.py            # all three, a few minutes on a laptop CPU
    .venv/bin/python notebooks/render.py 01_quickstart.ipynb
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "notebooks"


def render(name: str) -> Path:
    """Execute ``notebooks/<name>`` (a kernel on this interpreter, working folder ``docs/notebooks``) and write it
    to ``docs/notebooks/<name>``; returns that path."""
    nb = nbformat.read(HERE / name, as_version=4)
    OUT.mkdir(parents=True, exist_ok=True)
    # The DGC_NB_* variables would shrink the runs to the tests' tiny settings; this checkout's dgc_pyro comes first.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGC_NB_") and k != "MPLBACKEND"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    # The digits MLPs run fastest on one thread, many times so on a busy machine (docs/cli.md, --threads).
    env.setdefault("OMP_NUM_THREADS", "1")
    client = NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(OUT)}})
    client.execute(env=env)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    target = OUT / name
    nbformat.write(nb, target)
    return target


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))
    for name in names:
        start = time.perf_counter()
        print(f"{render(name)}: {time.perf_counter() - start:.0f} s", flush=True)
