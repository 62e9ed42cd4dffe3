"""Converting the authors' released checkpoints into facelab/diffusers folders.

`python -m facelab.convert SRC DEST [--format auto|guided_diffusion|ddim|ldm|codiff|hclf] [--config PRESET|YAML]`.

Every format is a module (FORMATS, imported lazily, so one missing module leaves the others working) exposing
  PRESETS: {preset name: the original's flags},
  detect(state) -> bool | str: whether a state dict is in this format (or the name of the format, for a module that
    serves several),
  convert(state, dest, config, fmt) -> None: write a diffusers-layout folder (unet/, scheduler/, ...) into `dest`.
`convert_file` reads SRC (facelab.convert.reading.load_state: never runs pickled code), picks the format, resolves
the config, converts into a fresh temporary folder next to DEST and renames it into place only when everything
succeeded (so a failure writes nothing, and an existing DEST is never overwritten). It adds recipe.json (the source's
sha256, format, original flags and noise schedule; merged over any recipe.json the converter wrote) and
model_index.json (unless the converter wrote one).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import torch
import yaml

from facelab.io.checkpoints import write_model_index
from facelab.io.errors import InputError

FORMATS = {"guided_diffusion": "facelab.convert.guided_diffusion", "ddim": "facelab.convert.ddim",
           "ldm": "facelab.convert.compvis", "codiff": "facelab.convert.compvis", "hclf": "facelab.convert.hclf"}


def format_module(fmt: str) -> ModuleType:
    """The converter module of format `fmt`."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: unknown format (known: auto, {', '.join(FORMATS)})")
    try:
        return importlib.import_module(FORMATS[fmt])
    except ModuleNotFoundError as err:
        if err.name != FORMATS[fmt]:
            raise
        raise InputError(f"--format {fmt}: its converter ({FORMATS[fmt]}) is not available") from None


def _available() -> dict[str, ModuleType]:
    found = {}
    for fmt in FORMATS:
        try:
            found[fmt] = format_module(fmt)
        except InputError:
            continue
    return found


def presets() -> dict[str, str]:
    """{preset name: its format} over every available converter."""
    return {name: fmt for fmt, module in _available().items() for name in module.PRESETS}


def detect_format(state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> str:
    """The format whose `detect` accepts `state` (the first in FORMATS order); a module serving several formats may
    return the format's name from `detect` instead of True."""
    for fmt, module in _available().items():
        found = module.detect(state)
        if found:
            return found if isinstance(found, str) and found in FORMATS else fmt
    sample = ", ".join(list(state)[:4])
    raise InputError(f"{source}: unknown checkpoint format (keys {sample}, ...); known formats: "
                     f"{', '.join(FORMATS)} (give --format if it is one of them)")


def resolve_config(config: str | Path | dict | None, fmt: str) -> tuple[dict, str | None]:
    """(the original's flags, the preset name or None) from a preset name, a YAML file or a dict."""
    module = format_module(fmt)
    if isinstance(config, dict):
        return dict(config), None
    if config is None:
        raise InputError(f"--config is needed for format {fmt}: a preset ({', '.join(module.PRESETS) or 'none'}) "
                         "or the original's YAML")
    if str(config) in module.PRESETS:
        return dict(module.PRESETS[str(config)]), str(config)
    path = Path(config).expanduser()
    if not path.is_file():
        others = presets()
        hint = f" (preset {config} belongs to format {others[str(config)]})" if str(config) in others else ""
        raise InputError(f"--config {config}: not a preset of format {fmt} ({', '.join(module.PRESETS) or 'none'})"
                         f" nor a YAML file{hint}")
    try:
        flags = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(flags, dict):
        raise InputError(f"--config {path}: expected a mapping of the original's flags")
    return flags, None


def auto_config(state: dict[str, torch.Tensor], fmt: str, source: str | Path) -> tuple[dict, str]:
    """(flags, name) of the one preset of `fmt` that fits `state` (shapes checked without building weights)."""
    module = format_module(fmt)
    if not module.PRESETS or not hasattr(module, "fits"):
        raise InputError(f"{source}: give --config for format {fmt} (a preset or the original's YAML)")
    problems = {name: module.fits(state, flags) for name, flags in module.PRESETS.items()}
    fitting = [name for name, problem in problems.items() if problem is None]
    if len(fitting) == 1:
        return dict(module.PRESETS[fitting[0]]), fitting[0]
    if fitting:
        raise InputError(f"{source}: several presets fit ({', '.join(fitting)}); choose one with --config")
    name, problem = next(iter(problems.items()))
    raise InputError(f"{source}: no {fmt} preset fits it (give the original's YAML with --config); preset {name}: "
                     f"{problem}")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _schedule(dest: Path) -> dict | None:
    for config in (dest / "scheduler" / "scheduler_config.json", dest / "scheduler_config.json"):
        if config.is_file():
            return json.loads(config.read_text())
    return None


def convert_file(src: str | Path, dest: str | Path, fmt: str = "auto", config: str | Path | dict | None = None,
                 ema: bool = False, digest: str | None = None) -> Path:
    """Convert checkpoint `src` into the new folder `dest` (module docstring); returns dest."""
    from facelab.convert.reading import load_state

    src, dest = Path(src).expanduser(), Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest}: already exists; choose a new output folder (nothing is overwritten)")
    state = load_state(src, ema=ema)
    fmt = detect_format(state, src) if fmt == "auto" else fmt
    module = format_module(fmt)
    flags, preset = resolve_config(config, fmt) if config is not None else auto_config(state, fmt, src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            module.convert(state, tmp, flags, fmt)
        except InputError as err:
            raise InputError(f"{src}: --config {preset or config}: {err}") from None
        recipe = {"format": fmt, "preset": preset, "source": str(src), "sha256": digest or sha256(src), "ema": ema,
                  "config": flags, "schedule": _schedule(tmp)}
        written = tmp / "recipe.json"
        if written.is_file():
            recipe.update(json.loads(written.read_text()))
        written.write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        if not (tmp / "model_index.json").is_file():
            write_model_index(tmp)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def cache_dir() -> Path:
    """Where `converted` keeps on-the-fly conversions: $FACELAB_CACHE, else $XDG_CACHE_HOME/facelab or
    ~/.cache/facelab, sub-folder converted/."""
    root = os.environ.get("FACELAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "facelab"
    return Path(root).expanduser() / "converted"


def converted(src: str | Path, config: str | None = None, fmt: str = "auto") -> Path:
    """The converted folder of checkpoint `src` (preset or YAML `config`, None: the preset that fits), made once and
    cached under cache_dir() by the file's sha256; a cached folder is reused, never overwritten."""
    src = Path(src).expanduser()
    if not src.is_file():
        raise InputError(f"{src}: no such checkpoint file")
    digest = sha256(src)
    tag = "auto" if config is None else re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(config)).name)
    if config is not None and Path(str(config)).expanduser().is_file():  # a YAML: its contents name the entry too
        tag += "-" + sha256(Path(str(config)).expanduser())[:8]
    folder = cache_dir() / f"{digest[:16]}-{tag}"

    def ready() -> bool:
        recipe = folder / "recipe.json"
        return recipe.is_file() and json.loads(recipe.read_text()).get("sha256") == digest

    if ready():
        return folder
    if folder.exists():
        raise InputError(f"{folder}: a cache folder without a matching recipe.json (an interrupted conversion?); "
                         "remove it to convert again")
    try:
        return convert_file(src, folder, fmt, config, digest=digest)
    except OSError:  # another process finished the same conversion first
        if ready():
            return folder
        raise
