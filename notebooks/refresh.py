"""Re-execute notebooks in the quick profile and store their outputs, ready for nbval.

    python notebooks/refresh.py notebooks/05_reproduce_switch.ipynb   # one, or several
    python notebooks/refresh.py                                       # the whole series

Run it after editing a notebook, then `python -m pytest notebooks/<it>.ipynb` to check it. Outputs
that Panel widgets write (their JavaScript and document JSON, megabytes, different on every run)
are dropped: those cells are marked NBVAL_IGNORE_OUTPUT, so nbval only checks that they run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
WIDGET_MIME = ("application/vnd.holoviews_load.v0+json", "application/vnd.holoviews_exec.v0+json",
               "application/vnd.bokehjs_load.v0+json", "application/vnd.bokehjs_exec.v0+json",
               "application/javascript")


def _is_widget_output(output: dict) -> bool:
    return any(mime in output.get("data", {}) for mime in WIDGET_MIME)


def refresh(path: Path, timeout: int = 1800) -> None:
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("WORKBENCH_PROFILE", "quick")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not _is_widget_output(o)]
            cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    for p in paths:
        refresh(p)
