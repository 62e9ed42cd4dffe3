"""python -m facelab.convert SRC DEST [--format auto|...] [--config PRESET|YAML] [--ema]: see facelab.convert."""
from __future__ import annotations

import argparse
import sys

from facelab.convert import FORMATS, convert_file, presets
from facelab.io.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelab.convert",
                                     description="Convert an author's released checkpoint into a facelab/diffusers "
                                                 "folder (with recipe.json and model_index.json).")
    parser.add_argument("src", help="the checkpoint: .pt, .pth, .ckpt or .safetensors")
    parser.add_argument("dest", help="the new output folder (never overwritten)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                        help="the checkpoint's format (auto: detect from its keys)")
    parser.add_argument("--config", default=None,
                        help=f"a preset ({', '.join(presets()) or 'none'}) or the original's YAML config")
    parser.add_argument("--ema", action="store_true", help="convert the EMA weights (refused if the file has none)")
    args = parser.parse_args(argv)
    try:
        dest = convert_file(args.src, args.dest, args.format, args.config, ema=args.ema)
    except InputError as err:
        print(f"facelab: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
