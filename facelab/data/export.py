"""Export synthetic faces into real dataset layouts.

    python -m facelab.data.export --out data/CelebAMask-HQ --n 200 --size 64 --layouts celebahq celebamask dialog
"""
from __future__ import annotations

import argparse
import sys

from facelab.data.layouts import LAYOUTS, export
from facelab.data.synthetic import SyntheticFaces
from facelab.io.errors import InputError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output root (the layouts' folders are created inside)")
    parser.add_argument("--n", type=int, default=200, help="number of faces")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="synthetic face seed")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--attribute", default="Male", help="attribute of the class_folders layout")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        dataset = SyntheticFaces(size=args.size, length=args.n, seed=args.seed)
        root = export(dataset, args.out, args.layouts, attribute=args.attribute, overwrite=args.overwrite)
    except (InputError, FileExistsError) as err:
        sys.exit(f"facelab: error: {err}")
    print(f"wrote {args.n} faces as {', '.join(args.layouts)} to {root}")


if __name__ == "__main__":
    main()
