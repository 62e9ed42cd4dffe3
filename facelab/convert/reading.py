"""Reading the authors' checkpoints (.pt/.pth/.ckpt/.safetensors) into a flat {name: tensor} dict, never running
pickled code.

Plain weight files go through `torch.load(weights_only=True)`. PyTorch-Lightning `.ckpt` files also pickle callback
and config objects (ModelCheckpoint, OmegaConf hyper-parameters, numpy scalars), which `weights_only` refuses; those
are read by `RestrictedUnpickler`, which rebuilds tensors (`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`,
`HalfStorage`, ... records) and plain containers (dict, list, tuple, collections.OrderedDict, set, numbers, strings)
itself and replaces every other object by an inert `Skipped` placeholder: nothing is imported and no pickled callable
is ever called. A pickle that names a code-running callable (os/posix.system, builtins.exec/eval/getattr/__import__,
functools.partial, operator.attrgetter/methodcaller, subprocess, ...; Python 2 names are mapped first, so
`__builtin__.eval` and `commands.Popen` count) is refused outright. `load_state` then picks the model's weights out
of the container (a Lightning `state_dict`, a ddim `[model, optimizer, ..., ema]` list, an `ema` sub-dict) and strips
a DataParallel `module.` prefix.
"""
from __future__ import annotations

import _compat_pickle
import builtins
import collections
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError

# module roots whose callables can run code: a pickle naming one is refused, not skipped
DANGEROUS = {"builtins", "__builtin__", "os", "posix", "nt", "subprocess", "sys", "importlib", "runpy", "shutil",
             "socket", "pickle", "_pickle", "marshal", "types", "code", "codeop", "pty", "ctypes", "webbrowser",
             "operator", "functools", "inspect", "pydoc", "platform", "multiprocessing", "asyncio", "signal",
             "torch.hub", "torch.jit", "torch._ops", "torch.ops",
             "numpy.testing", "timeit", "exec", "eval"}
SAFE_BUILTINS = {"set", "frozenset", "complex", "slice"}  # rebuilt for real
# builtins named as types (OmegaConf's metadata: object_type=dict) or that could build huge objects from a size
# (bytearray(10**12), set(range(...))): kept as placeholders, never called
INERT_BUILTINS = {"dict", "list", "tuple", "int", "float", "str", "bool", "bytes", "bytearray", "range", "object"}
TORCH_DTYPES = {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
                   "ComplexDoubleStorage": torch.complex128}
EMA_KEYS = ("ema", "model_ema", "ema_state_dict", "ema_model", "state_dict_ema")


class Skipped:
    """An object the checkpoint pickled that is not a tensor or plain container (a Lightning callback, a config
    class, ...): it absorbs whatever the pickle does to it and does nothing."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __repr__(self):
        return f"<skipped {self.name}>"


def _rebuild_tensor(storage, offset, size, stride, *_):
    untyped, dtype = storage
    return torch.empty(0, dtype=dtype).set_(untyped, offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's data.pkl, allowing only tensor rebuilding and plain containers."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.skipped: set[str] = set()
        self.storages: dict[str, tuple] = {}  # views of one storage share it

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as pickle's own find_class maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "builtins" and name in SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == "torch" and (name in _STORAGE_DTYPES or name in TORCH_DTYPES):
            return _STORAGE_DTYPES.get(name) or getattr(torch, name)
        root = module.split(".")[0]
        if not (module == "builtins" and name in INERT_BUILTINS) and (
                root in DANGEROUS or module in DANGEROUS or name in ("eval", "exec", "system", "__import__")):
            raise InputError(f"{self.path}: refused, the pickle would call {module}.{name} when loaded "
                             "(a checkpoint that runs code); nothing was executed")
        self.skipped.add(f"{module}.{name}")
        return type(name, (Skipped,), {"name": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InputError(f"{self.path}: unsupported storage record {pid!r:.60}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"{self.path}: unsupported storage type {dtype!r:.60}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            need = numel * torch.empty(0, dtype=dtype).element_size()
            if len(raw) < need:
                raise InputError(f"{self.path}: storage {key} is truncated ({len(raw)} of {need} bytes)")
            storage = torch.UntypedStorage.from_buffer(raw[:need], dtype=torch.uint8) if need else \
                torch.UntypedStorage(0)
            self.storages[key] = (storage, dtype)
        return self.storages[key]


def restricted_load(path: Path):
    """The object a torch zip checkpoint pickles, with non-tensor objects replaced by `Skipped` placeholders."""
    try:
        archive = zipfile.ZipFile(path)
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
    except (zipfile.BadZipFile, StopIteration, OSError):
        raise InputError(f"{path}: refused, it needs code to load and is not a torch zip checkpoint that can be "
                         "read without running it") from None
    prefix = pkl[: -len("data.pkl")]
    with archive, archive.open(pkl) as f:
        try:
            return RestrictedUnpickler(f, archive, prefix, path).load()
        except InputError:
            raise
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError,
                RuntimeError, struct.error, zipfile.BadZipFile) as err:
            raise InputError(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None


def read_file(path: str | Path):
    """The raw object a checkpoint file holds: a dict of tensors for safetensors; whatever was pickled otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: not a readable checkpoint (the file is empty)")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise InputError(f"{path}: not a readable safetensors file, truncated or corrupt "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    try:
        return load_checkpoint(path)
    except InputError as err:  # empty, truncated, not torch: the plain loader's line stands
        if "not a plain weights file" not in str(err) or not zipfile.is_zipfile(path):
            raise
    return restricted_load(path)


def _tensors(obj) -> dict[str, torch.Tensor] | None:
    """obj's tensor entries (dicts only), None when it is not a dict holding any."""
    if not isinstance(obj, dict):
        return None
    found = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return found or None


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _lightning_ema(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """CompVis' LitEma keeps `model.X.Y` as `model_ema.XY` (dots removed): the state with those swapped in."""
    ema = {k[len("model_ema."):]: v for k, v in state.items() if k.startswith("model_ema.")}
    if not any(k not in ("decay", "num_updates") for k in ema):
        return None
    swapped = {}
    for key, value in state.items():
        if key.startswith("model_ema."):
            continue
        short = key[len("model."):].replace(".", "") if key.startswith("model.") else None
        swapped[key] = ema.get(short, value) if short is not None else value
    return swapped


def load_state(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights a checkpoint holds, as a flat {name: tensor} dict.

    Understands a plain state dict, a Lightning `{"state_dict": ...}`, a ddim `[model, optimizer, epoch, step, ema]`
    list and `{"model": ..., "ema": ...}`-style dicts. ema=True takes the EMA weights instead, and refuses a file
    without them.
    """
    path = Path(path)
    raw = read_file(path)
    model = ema_state = None
    if isinstance(raw, list | tuple):  # ermongroup/ddim training checkpoints: [model, optimizer, epoch, step, (ema)]
        dicts = [_tensors(item) for item in raw]
        model = dicts[0] if dicts else None
        ema_state = dicts[-1] if len(dicts) >= 5 else None
    elif isinstance(raw, dict):
        if _tensors(raw.get("state_dict")):  # Lightning
            model = _tensors(raw["state_dict"])
            ema_state = _lightning_ema(model)
            model = {k: v for k, v in model.items() if not k.startswith("model_ema.")}
        else:
            model = _tensors(raw.get("model")) or _tensors(raw.get("model_state_dict")) or _tensors(raw)
        ema_state = ema_state or next((_tensors(raw[k]) for k in EMA_KEYS if _tensors(raw.get(k))), None)
    if not model:
        raise InputError(f"{path}: holds no model weights (no tensors in it, its `state_dict` or `model` entry)")
    if ema:
        if not ema_state:
            raise InputError(f"{path}: has no EMA weights (no `ema`/`model_ema` entry); convert without --ema to use "
                             "the plain weights")
        return _strip(ema_state)
    return _strip(model)
