"""`python -m facelab.gallery PATH [PATH ...]`: (re)build the page (index.html) of a run, a sweep or a study folder.

A run folder (config.yaml, metrics.json, gallery.json) gets its run page (facelab.io.gallery.render_run); a multirun
folder (.jobs/ or multirun.yaml), or a folder of runs (a study's cells), gets a sweep page (facelab.sweeps.write_page).
Everything comes from the folder itself, so a copied folder renders the same page. Prints each page's path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facelab.io.errors import InputError
from facelab.io.gallery import DESCRIPTION, render_run
from facelab.sweeps import RECORDS, job_records, write_page


def build(path: str | Path) -> Path:
    """Write the page of the run, sweep or study folder `path`; returns its path."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder")
    if (path / RECORDS).is_dir() or (path / "multirun.yaml").is_file():
        return write_page(path)
    if any((path / name).is_file() for name in ("config.yaml", "metrics.json", DESCRIPTION)):
        return render_run(path)
    if job_records(path):
        return write_page(path, title=f"facelab runs: {path.name}")
    raise InputError(f"{path}: no run here (no config.yaml, metrics.json or {DESCRIPTION}), nor runs below it")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m facelab.gallery", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a run, sweep or study folder")
    args = parser.parse_args(argv)
    for path in args.paths:
        try:
            print(build(path))
        except InputError as err:
            print(f"facelab: error: {err}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
