"""EDM's network-pickle format (version 6): writing it, and importing it without running embedded code.

Format. An instance of a class decorated with `persistent_class` pickles as a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
meta = dict(type='class', version=6, module_src=<full source of the class's module>, class_name=<name>,
state=<the instance's __dict__>). Nested persistent modules are pickled the same way inside `state`. This is the
interface EDM, STF, AOT and GDD releases use, and EDM's own `generate.py` can read what we write.

Two ways to read such a pickle:
- `load_network_pickle` / `load_edm_training_state` (what this project uses): a restricted unpickler that accepts
  only tensors, numbers, containers and a whitelist of harmless globals. A persistent object becomes a
  `PickledObject` (class name + pickled state, no code); the outermost one is then rebuilt from OUR class of the
  same name (`PERSISTENT_CLASSES`) with its recorded constructor arguments, and its parameters and buffers are
  copied in by name. The embedded source is never executed.
  The whitelist (`_build_safe_globals`, `_resolve_safe_global`), and why each entry runs no code of the file's:
  containers and scalars (builtins set/frozenset/slice/complex/bytearray/bytes/object/dict/list/tuple/int/float/
  str/bool/range, collections.OrderedDict, EasyDict, torch.Size/device/dtype/layout/memory_format, numpy dtype and
  scalar) only build values, and what every call opcode may call with what is checked (`_check_call`: sized types
  from literal values only, no tensor type, no layer constructor); numpy.ndarray loads as a marker that only numpy's
  own `_reconstruct(ndarray, (0,), b'b')` accepts (called, it builds arrays over raw bytes), and an object array's
  list must have as many items as its shape (numpy reads a short one past its end); numpy's scalar() only with a
  plain dtype and exactly its bytes. BUILD, APPEND(S) and ADDITEMS call the type's own __setstate__/list/set methods,
  never what an instance answers (an EasyDict answers any attribute with its items); sets and number-keyed dicts are
  capped at 10,000 items (predictable hashes). Tensor views must lie inside their storage (torch's set_() would grow
  it), and a legacy storage may not declare more elements than its stream has bytes; copyreg._reconstructor
  is replaced by a version that only calls __new__/__init__ of classes that passed the whitelist; _codecs.encode is
  limited to latin1 (how protocols < 3 store bytes); torch._utils' tensor and parameter rebuilders build tensors
  from storages and refuse pickled backward hooks; torch._tensor._rebuild_from_type(_v2) only call one of those
  rebuilders, for a Tensor or a Parameter;
  numpy's _frombuffer refuses object dtypes (bytes read as pointers); a short list of plain torch.nn layers and
  containers is rebuilt without calling their constructors. The one entry that deserialises nested bytes,
  torch.storage._load_from_bytes, is replaced by `_safe_load_from_bytes`, which accepts only the legacy stream that
  Storage.__reduce__ writes and reads it through this same whitelist: torch.load would otherwise hand a TorchScript
  archive inside the bytes to torch.jit.load, whose compiled __setstate__ methods run (`check_torch_file`). The
  same check guards every torch.load of a training state.
- Plain `pickle.load`, which calls `_reconstruct_persistent_obj` below: EDM's behaviour, kept so that our pickles
  also load with plain pickle. When the embedded source is not one of the modules already imported here, it is
  EXECUTED. Use it on trusted files only.
"""

import codecs
import collections
import contextlib
import copy
import importlib
import inspect
import io
import itertools
import math
import os
import pickle
import pickletools
import reprlib
import struct
import sys
import tarfile
import types
import uuid
import warnings
import zipfile
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

import dnnlib
from dnnlib.util import EasyDict
from torch_utils import distributed as dist

_version = 6  # EDM's internal format version; pickles with another version are refused.
_decorators: set = set()  # Every class produced by persistent_class.
_import_hooks: list = []  # hook(meta) -> meta, applied to every persistent object being loaded (both paths).
_module_to_src_dict: dict = {}  # module -> source text
_src_to_module_dict: dict = {}  # source text -> module (our imported modules and, on the exec path, new ones)

# ---------------------------------------------------------------------------------------------------------------------
# Writing: the decorator.


def persistent_class(orig_class):
    """Class decorator: instances pickle in EDM's format v6, with the source of the defining module embedded.

    The constructor's arguments are recorded (deep-copied) as `_init_args` / `_init_kwargs` and exposed as
    `init_args` / `init_kwargs`, unless the instance sets `self._record_init_args = False` in its constructor.
    Classes used inside a persistent class that must survive pickling must be decorated too, and every decorated
    class must be defined at the top level of its module (the embedded source is looked up by class name).
    """
    if not isinstance(orig_class, type):
        raise TypeError(f"persistent_class expects a class, got {orig_class!r}")
    if is_persistent(orig_class):
        return orig_class
    # Capture the source at import time, so that a file edited during a long run cannot end up in a snapshot.
    module_src = _module_to_src(sys.modules.get(orig_class.__module__))

    class Decorator(orig_class):
        _orig_module_src = module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record_init_args = getattr(self, "_record_init_args", True)
            self._init_args = copy.deepcopy(args) if record_init_args else None
            self._init_kwargs = copy.deepcopy(kwargs) if record_init_args else None

        @property
        def init_args(self):
            if self._init_args is None:
                raise RuntimeError(f"{type(self).__name__} was built with _record_init_args=False")
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            if self._init_kwargs is None:
                raise RuntimeError(f"{type(self).__name__} was built with _record_init_args=False")
            return EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            # A persistent base class has already produced the meta; keep it (it named the same class).
            if fields[0] is not _reconstruct_persistent_obj:
                # The most derived persistent class (an undecorated subclass pickles as its persistent base).
                cls = next(c for c in type(self).__mro__ if c in _decorators)
                _check_reducible(cls)
                meta = dict(type="class", version=_version, module_src=cls._orig_module_src,
                            class_name=cls._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    # Let inspect.signature(cls) show the real constructor parameters.
    Decorator.__init__.__wrapped__ = orig_class.__init__
    Decorator.__init__.__doc__ = orig_class.__init__.__doc__
    _decorators.add(Decorator)
    return Decorator


def is_persistent(obj) -> bool:
    """True for a class made by `persistent_class` and for its instances."""
    try:
        if obj in _decorators:
            return True
    except TypeError:  # Unhashable objects.
        pass
    return type(obj) in _decorators


def import_hook(hook):
    """Register `hook(meta) -> meta`, called on the meta (an EasyDict: type, version, module_src, class_name, state)
    of every persistent object being loaded, on both the safe path and the plain-pickle path. Usable as a decorator."""
    if not callable(hook):
        raise TypeError(f"import_hook expects a callable, got {hook!r}")
    _import_hooks.append(hook)
    return hook


def _check_reducible(cls) -> None:
    name = cls._orig_class_name
    if cls._orig_module_src is None:
        raise pickle.PicklingError(
            f"cannot pickle {name}: the source of its module {cls.__module__!r} is not available "
            f"(persistent classes must be defined in a .py file)")
    module = sys.modules.get(cls.__module__)
    if module is None or not isinstance(getattr(module, name, None), type):
        raise pickle.PicklingError(
            f"cannot pickle {name}: persistent classes must be defined at the top level of their module "
            f"({cls.__module__!r} has no attribute {name!r}), because loaders look the class up by name")


def _module_to_src(module) -> str | None:
    """The module's full source text (cached), or None when it cannot be found."""
    if module is None:
        return None
    src = _module_to_src_dict.get(module)
    if src is None:
        try:
            src = inspect.getsource(module)
        except (OSError, TypeError):
            return None
        _module_to_src_dict[module] = src
        _src_to_module_dict.setdefault(src, module)
    return src


# ---------------------------------------------------------------------------------------------------------------------
# Reading, EDM's way (plain pickle). Runs embedded code unless the source is one of our loaded modules.


def _apply_import_hooks(meta) -> EasyDict:
    meta = EasyDict(meta)
    meta["state"] = EasyDict(meta.get("state") or {})
    for hook in _import_hooks:
        meta = hook(meta)
        if meta is None:
            raise RuntimeError(f"import hook {hook!r} returned None instead of the meta")
    return meta


def _reconstruct_persistent_obj(meta):
    """Called by plain `pickle` for every persistent object (EDM's unpickling entry point, same name and behaviour).

    SECURITY: when `meta['module_src']` is not the source of a module already imported in this process, the source
    is EXECUTED in a new module `_imported_module_<uuid>`, as EDM does. Only unpickle trusted files this way; this
    project's loaders (`load_network_pickle`, `load_edm_training_state`) never come here.
    """
    meta = _apply_import_hooks(meta)
    if meta.get("version") != _version:
        raise pickle.UnpicklingError(f"persistent object has format version {meta.get('version')!r}, "
                                     f"expected {_version}")
    if meta.get("type") != "class":
        raise pickle.UnpicklingError(f"persistent object has type {meta.get('type')!r}, expected 'class'")
    # By key, not attribute: an attribute lookup could reach a class attribute (see dnnlib.util.EasyDict).
    module = _src_to_module(meta["module_src"])
    orig_class = module.__dict__[meta["class_name"]]
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(dict(meta["state"]))
    else:
        obj.__dict__.update(meta["state"])
    return obj


def _src_to_module(src: str):
    """The module whose source is `src`: one already imported, else a new module made by EXECUTING `src`."""
    module = _src_to_module_dict.get(src)
    if module is None:
        module_name = "_imported_module_" + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        # Registered before exec, so that persistent_class inside the source finds its own source text.
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        try:
            exec(src, module.__dict__)  # noqa: S102 -- EDM's documented behaviour for trusted pickles.
        except BaseException:
            del sys.modules[module_name], _module_to_src_dict[module], _src_to_module_dict[src]
            raise
    return module


# ---------------------------------------------------------------------------------------------------------------------
# Reading, safely: the class registry.

# EDM class name -> our class (or its dotted name, imported on first use). Filled by registrations
# (`register_classes`, `register_module`) from the packages that define persistent classes: training/snapshots.py
# registers the networks, preconditioners, augmentation and losses; a plug-in registers its own module. Add entries
# (or pass extra_classes) to import pickles from other code bases that use other names. Layer classes are included
# because nested persistent objects are checked against the modules our rebuilt network contains at the same place.
PERSISTENT_CLASSES: dict[str, Any] = {}


def register_classes(classes, replace: bool = False) -> None:
    """Make persistent classes importable by `load_network_pickle` under their EDM class names.

    `classes`: an iterable of persistent classes (registered under their own names) or a dict {pickled class name:
    class or dotted name} (aliases for other code bases). A name taken by another class is an error unless `replace`.
    """
    items = classes.items() if isinstance(classes, dict) else ((cls._orig_class_name, cls) for cls in classes)
    for name, cls in items:
        if not isinstance(cls, str) and not is_persistent(cls):
            raise TypeError(f"register_classes: {cls!r} is not a persistent class")
        current = PERSISTENT_CLASSES.get(name)
        if current is not None and current is not cls and not replace:
            raise ValueError(f"register_classes: the name {name!r} is already registered for {current!r}")
        PERSISTENT_CLASSES[name] = cls


def register_module(module) -> list[str]:
    """Register every persistent class defined at the top level of `module`; returns their names."""
    classes = [obj for name, obj in vars(module).items()
               if isinstance(obj, type) and is_persistent(obj) and obj.__module__ == module.__name__
               and obj._orig_class_name == name]
    register_classes(classes)
    return [cls._orig_class_name for cls in classes]


def unregistered_classes(module: torch.nn.Module) -> list[str]:
    """Names of the persistent classes in `module` (itself and its submodules) that `load_network_pickle` would not
    resolve with PERSISTENT_CLASSES: what a snapshot writer checks, so that a run does not write pickles that no
    reader of this code base can import."""
    missing = []
    for sub in module.modules():
        cls = type(sub)
        if not is_persistent(cls):
            continue
        entry = PERSISTENT_CLASSES.get(cls._orig_class_name)
        if entry is None or (not isinstance(entry, str) and entry is not cls):
            if cls._orig_class_name not in missing:
                missing.append(cls._orig_class_name)
    return missing


class NetworkPickleError(pickle.UnpicklingError):
    """A network pickle could not be imported safely (unsafe global, unknown class, tensors that do not match)."""


def _resolve_class(class_name: str, classes: dict, source: str) -> type:
    entry = classes.get(class_name)
    if entry is None:
        raise NetworkPickleError(
            f"{source}: the pickle holds a persistent object of class {_shown(class_name)}, which has no counterpart "
            f"here. Known classes: {', '.join(sorted(classes))}. A class of this code base is registered by its module "
            f"(persistence.register_module in training/snapshots.py, docs/design.md §6): load through "
            f"training.snapshots, or import it first when calling torch_utils.persistence directly; one of ours under "
            f"another name by torch_utils.persistence.register_classes or extra_classes.")
    if isinstance(entry, str):
        try:
            entry = dnnlib.util.get_obj_by_name(entry)
        except ImportError as err:
            raise NetworkPickleError(f"{source}: class {class_name!r} maps to {classes[class_name]!r}, "
                                     f"which cannot be imported: {err}") from err
    if not isinstance(entry, type):
        raise NetworkPickleError(f"{source}: class {class_name!r} maps to {entry!r}, which is not a class")
    return entry


class PickledObject:
    """What the safe importer makes of a persistent object: EDM class name and pickled state; no code is run."""

    def __init__(self, class_name: str, state: dict, module_src: str | None = None):
        self.class_name = class_name
        self.state = state
        self.module_src = module_src

    def __repr__(self) -> str:
        return f"PickledObject({self.class_name!r})"


# ---------------------------------------------------------------------------------------------------------------------
# Reading, safely: the restricted unpickler.


def _shown(value) -> str:
    """A value from a file, for a message: a bounded repr (a file's shared containers would print 2**depth times)."""
    return _ARGUMENTS_REPR.repr(value)


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Pickle protocols < 3 store bytes as _codecs.encode(text, 'latin1'); nothing else is needed.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {_shown(encoding)} (only latin1 is "
                                     f"expected)")
    return codecs.encode(obj, "latin1", errors)


def _safe_reconstructor(cls, base, state):
    """copyreg._reconstructor (protocols 0 and 1) for classes that already passed find_class."""
    if not (isinstance(cls, type) and isinstance(base, type) and issubclass(cls, base)):
        raise pickle.UnpicklingError(f"malformed copyreg._reconstructor call ({_shown(cls)}, {_shown(base)})")
    if base is object:
        return object.__new__(cls)
    _check_call(base, (state,), "call")
    obj = base.__new__(cls, state)
    if base.__init__ != object.__init__:
        base.__init__(obj, state)
    return obj


class UnsafeTorchFileError(pickle.UnpicklingError):
    """A torch file in a format whose loader can run code (TorchScript archive, legacy tar archive)."""


_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # First pickle of torch's legacy (non-zip, non-tar) format.


def _is_tar_archive(f) -> bool:
    """What torch.load's legacy loader tests first: whether the file opens as a tar archive (then it extracts it)."""
    position = f.tell()
    try:
        with tarfile.open(fileobj=f, mode="r:"):
            return True
    except (tarfile.TarError, EOFError, ValueError, OSError):
        return False
    finally:
        f.seek(position)


def _check_torch_zip(f, source: str) -> None:
    """A torch.save zip archive, as torch's own reader sees it: no TorchScript, one data.pkl, stored records only.

    The records are listed by torch's reader (the parser torch.load uses to decide TorchScript or not), and Python's
    zipfile must see the same records at the same offsets: a file with two central directories, one for each parser,
    would otherwise pass a check made with zipfile alone. torch.save writes every record stored (uncompressed); a
    compressed one is refused, since torch's reader would inflate it whole (a 1 MB file can hold gigabytes)."""
    position = f.tell()
    try:
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
        f.seek(position)
        offsets = {}
        for info in infos:  # where each record's data starts: after its local header's name and extra field
            f.seek(position + info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"no local header for {info.filename!r}")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            offsets[info.filename] = info.header_offset + 30 + name_length + extra_length
        f.seek(position)
        reader = torch._C.PyTorchFileReader(f)
        records = reader.get_all_records()
        torch_offsets = {name: reader.get_record_offset(name) for name in records}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError, struct.error) as err:
        raise UnsafeTorchFileError(f"{source}: not a readable torch file (broken zip archive: {err})") from err
    # TorchScript archives hold code/... and constants.pkl (torch's own test is the latter).
    scripted = [n for n in records if n == "constants.pkl" or n.startswith("code/") or "/code/" in n
                or n.endswith(".py")]
    if scripted or records.count("data.pkl") != 1:
        raise UnsafeTorchFileError(
            f"{source}: refusing a TorchScript archive (or an archive that is not a plain torch.save file): "
            f"loading it would run the code it carries")
    ours = {info.filename.split("/", 1)[-1]: offsets[info.filename] for info in infos}
    if ours != {name: position + offset for name, offset in torch_offsets.items()}:
        raise UnsafeTorchFileError(f"{source}: refusing a zip archive that reads differently to Python's zip reader "
                                   f"and to torch's (two central directories?): not a plain torch.save file")
    compressed = [info.filename for info in infos if info.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise UnsafeTorchFileError(f"{source}: refusing compressed records ({compressed[0]}...): torch.save stores "
                                   f"its records uncompressed, and torch would inflate them whole")
    # torch's weights_only unpickler allows builtins.bytearray, called with a size: 4 GB from a 1.4 KB file. No file
    # this project reads holds a bytearray.
    try:
        names = _pickle_globals(io.BytesIO(reader.get_record("data.pkl")))
    except (ValueError, RuntimeError) as err:  # opcodes pickletools cannot read: torch's unpickler refuses them too
        raise UnsafeTorchFileError(f"{source}: not a readable torch file (data.pkl: {err})") from err
    if names & {("builtins", "bytearray"), ("__builtin__", "bytearray")}:
        raise UnsafeTorchFileError(f"{source}: refusing a torch file that builds a bytearray (its size would come "
                                   f"from the file)")


def check_torch_file(f, source: str = "<torch file>") -> str:
    """Refuse the torch.load formats whose loaders run code, before torch.load sees the file; return the format.

    torch.load hands a zip holding TorchScript to torch.jit.load, which runs the archive's compiled `__setstate__`
    methods (arbitrary TorchScript: file writes through torch.from_file, for one), whatever `pickle_module` or, on
    torch < 2.6, `weights_only` say; and it extracts legacy tar archives into a temporary folder. Neither is a format
    this project writes or needs. Returns 'zip' (a torch.save archive: one data.pkl and tensor records, no TorchScript
    code or constants) or 'legacy' (the pre-1.6 stream: a pickled magic number first). `f` must be seekable; its
    position is restored.
    """
    position = f.tell()
    head = f.read(4)
    f.seek(position)
    if head.startswith(b"PK"):
        try:
            _check_torch_zip(f, source)
        finally:
            f.seek(position)
        return "zip"
    if _is_tar_archive(f):
        raise UnsafeTorchFileError(f"{source}: refusing a legacy tar-format torch file: loading it extracts an "
                                   f"archive; re-save it with a current torch.save")
    try:
        magic = safe_pickle.load(f)
    except Exception as err:  # noqa: BLE001 -- any failure means: not this format.
        magic = err
    finally:
        f.seek(position)
    if not isinstance(magic, int) or isinstance(magic, bool) or magic != _TORCH_LEGACY_MAGIC:
        raise pickle.UnpicklingError(f"{source}: not a torch file (neither a torch.save zip archive nor the legacy "
                                     f"format)")
    return "legacy"


def safe_torch_load(path_or_file, source: str | None = None):
    """torch.load(weights_only=True) after `check_torch_file`: plain tensors, numbers, strings and containers only.

    weights_only alone is not enough on every torch this project supports (before torch 2.6 it still dispatched
    TorchScript archives to torch.jit.load), so the format is checked here first.
    """
    with _open_seekable(path_or_file) as (f, name):
        check_torch_file(f, source or name)
        return torch.load(f, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def _open_seekable(path_or_file):
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as f:
            yield f, os.fspath(path_or_file)
    elif getattr(path_or_file, "seekable", lambda: False)():
        yield path_or_file, getattr(path_or_file, "name", "<file object>")
    else:
        data = path_or_file.read()
        yield io.BytesIO(data), getattr(path_or_file, "name", "<file object>")


def _safe_load_from_bytes(data: bytes):
    """torch.storage._load_from_bytes, restricted: one tensor storage in torch's legacy stream format, read through
    the whitelist. This is how every tensor of a plain-pickled network is stored (Storage.__reduce__), and the one
    whitelisted entry that deserialises nested bytes, so it is the one that must refuse every other format."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"tensor storage data must be bytes, got {type(data).__name__}")
    f = io.BytesIO(data)
    if check_torch_file(f, "a tensor storage in the pickle") != "legacy":
        raise UnsafeTorchFileError("a tensor storage in the pickle is a torch.save zip archive, not the legacy "
                                   "stream that Storage.__reduce__ writes")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        storage = torch.load(f, map_location="cpu", weights_only=False,
                             pickle_module=_make_safe_pickle_module(max_storage_elements=len(data)))
    if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
        raise pickle.UnpicklingError(f"a tensor storage in the pickle holds a {type(storage).__name__}, "
                                     f"not a storage")
    return storage


def _check_tensor_state(state, what: str) -> None:
    """A tensor's pickled attributes (a dict, or torch's (dict, slots) pair): refused when one is private (hooks live
    in `_backward_hooks`, `_post_accumulate_grad_hooks`, ...) or would shadow a tensor attribute (a method such as
    `backward` or `register_hook`), since either could make later code call what the file chose."""
    for part in state if isinstance(state, tuple) else (state,):
        if part is None:
            continue
        if not isinstance(part, dict):
            raise pickle.UnpicklingError(f"refusing a tensor ({what}) whose pickled state is a {type(part).__name__}")
        for key in part:
            if not isinstance(key, str) or key.startswith("_") or hasattr(torch.Tensor, key):
                raise pickle.UnpicklingError(f"refusing a tensor ({what}) whose pickled state sets {_shown(key)}")


def _no_hooks(rebuild, hooks_arg: int | None = None, state_arg: int | None = None):
    """A tensor rebuild function that refuses pickled backward hooks (callables that would run during backward) and
    pickled attribute state that sets private or shadowing attributes (`_check_tensor_state`)."""
    name = rebuild.__name__
    hooks_arg = _HOOKS_ARG.get(name) if hooks_arg is None else hooks_arg
    state_arg = _STATE_ARG.get(name) if state_arg is None else state_arg

    def rebuild_without_hooks(*args):
        if name in _VIEWS_A_STORAGE and len(args) >= 4:
            _check_within_storage(*args[:4], name)
        if hooks_arg is not None and len(args) > hooks_arg and args[hooks_arg]:
            raise pickle.UnpicklingError(f"refusing a tensor with pickled backward hooks ({name})")
        if state_arg is not None and len(args) > state_arg:
            _check_tensor_state(args[state_arg], name)
        if name in _CALLS_ITS_ARGUMENT and args and not (
                any(args[0] is rebuilder for rebuilder in _TENSOR_REBUILDERS) and len(args) > 1
                and any(args[1] is kind for kind in (torch.Tensor, torch.nn.Parameter))):
            # torch calls func(*args): a tensor rebuild function with its arguments, in torch's pickles
            raise pickle.UnpicklingError(f"refusing {name} of a {type(args[0]).__name__}: torch's pickles pass one "
                                         f"of its tensor rebuild functions and a tensor type")
        return rebuild(*args)
    rebuild_without_hooks.__name__ = name
    if name not in _CALLS_ITS_ARGUMENT:
        _TENSOR_REBUILDERS.append(rebuild_without_hooks)  # by identity: an attribute could be set by a file's BUILD
    return rebuild_without_hooks


_TENSOR_REBUILDERS: list = []  # the wrapped torch._utils rebuild functions of the whitelist


_CALLS_ITS_ARGUMENT = frozenset({"_rebuild_from_type", "_rebuild_from_type_v2"})
_VIEWS_A_STORAGE = frozenset({"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"})


def _check_within_storage(storage, offset, size, stride, name: str) -> None:
    """A tensor's view (offset, size, stride) must lie inside its storage: torch's set_() would grow the storage to
    fit (size (2,) with stride (1e9,) over one float: 4 GB), and the grown part is uninitialised memory."""
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) <= 64):
        raise pickle.UnpicklingError(f"refusing a tensor whose size and stride are a {type(size).__name__} and a "
                                     f"{type(stride).__name__} ({name})")
    try:
        # a TypedStorage: its elements (_size: without the TypedStorage deprecation warning len() gives)
        elements = storage._size() if hasattr(storage, "_size") else len(storage)
        sizes, strides = tuple(int(n) for n in size), tuple(int(n) for n in stride)
        offset = int(offset)
    except (TypeError, ValueError) as err:
        raise pickle.UnpicklingError(f"refusing a malformed tensor ({name}: {err})") from None
    if len(sizes) != len(strides) or offset < 0 or min(sizes + strides, default=0) < 0:
        raise pickle.UnpicklingError(f"refusing a tensor of size {sizes}, stride {strides}, offset {offset} ({name})")
    extent = 0 if 0 in sizes else offset + sum((n - 1) * st for n, st in zip(sizes, strides)) + 1
    if extent > elements:
        raise pickle.UnpicklingError(f"refusing a tensor of size {sizes} and stride {strides} at offset {offset}: it "
                                     f"reaches element {extent - 1:,} of a storage of {elements:,}")


# Position of `backward_hooks`, and of the attribute state, in torch's rebuild functions.
_HOOKS_ARG = {"_rebuild_tensor_v2": 5, "_rebuild_tensor_v3": 5, "_rebuild_parameter": 2,
              "_rebuild_parameter_with_state": 2}
_STATE_ARG = {"_rebuild_parameter_with_state": 3, "_rebuild_from_type": 3, "_rebuild_from_type_v2": 3}


class _NdarrayReference:
    """What a pickle's reference to `numpy.ndarray` loads as. numpy's own pickles name the class only as the first
    argument of `_reconstruct(ndarray, (0,), b'b')`; the class itself, called by REDUCE or NEWOBJ, builds an array over
    raw bytes of the file (`ndarray((1,), object, buffer)`: bytes read as object pointers, which a crafted file turns
    into a crash or a call of its choosing; a negative offset reads memory before the buffer). Only
    `_safe_reconstruct` accepts this marker; it cannot be called."""

    __slots__ = ()

    def __repr__(self):
        return "numpy.ndarray"


_NDARRAY = _NdarrayReference()


def _safe_reconstruct(subtype, shape, dtype):
    """numpy's _reconstruct as numpy's pickles call it: an empty ndarray whose contents BUILD then sets (checked by
    `_check_build`). Any other type, shape or dtype is refused (a file could ask for 5e8 objects)."""
    if subtype is not _NDARRAY or not (isinstance(shape, tuple) and shape == (0,)) or dtype not in (b"b", "b"):
        raise pickle.UnpicklingError(f"refusing numpy's _reconstruct({_shown(subtype)}, {_shown(shape)}, "
                                     f"{_shown(dtype)}): numpy's pickles call it as _reconstruct(numpy.ndarray, (0,), "
                                     f"b'b')")
    return _numpy_multiarray()._reconstruct(np.ndarray, (0,), b"b")


# Types whose construction from a number or an iterator (a range) would make a small file allocate without bound:
# bytes(4e9), list(range(6e7)), torch.Size(range(...)). Their pickles pass literal values, which the file holds.
_SIZED_TYPES = (bytes, bytearray, list, tuple, set, frozenset, dict, torch.Size)
_LITERAL_VALUES = (bytes, bytearray, str, list, tuple, dict, set, frozenset)


def _check_call(func, args, how: str) -> None:
    """What pickle's REDUCE, NEWOBJ(_EX), INST and OBJ opcodes may call, checked before they call it. `func` passed
    the whitelist; refused here are the calls its pickles never make and a crafted file could use: numpy.ndarray
    (see `_NdarrayReference`), tensor types (tensors are rebuilt by torch's rebuild functions only: torch.Tensor(4e9)
    would allocate), a torch layer's constructor (Linear(40000, 40000): 6 GB from 66 bytes; pickles only create the
    instance, `how` == 'new' without arguments, and BUILD its state) and a sized type built from anything but
    literal values."""
    if func is _NDARRAY:
        raise pickle.UnpicklingError("refusing numpy.ndarray(...) called by the pickle: arrays are rebuilt by "
                                     "numpy's _reconstruct only")
    if not isinstance(func, type):
        return  # whitelisted functions check their own arguments (the wrappers above)
    name = f"{func.__module__}.{func.__qualname__}"
    if issubclass(func, torch.Tensor):
        raise pickle.UnpicklingError(f"refusing to call {name} from the pickle: tensors are rebuilt by torch's "
                                     f"rebuild functions only")
    if issubclass(func, torch.nn.Module) and (how != "new" or args):
        raise pickle.UnpicklingError(f"refusing to call the constructor of {name} from the pickle (a torch layer "
                                     f"is created without it and given its pickled state)")
    if issubclass(func, str) and not all(isinstance(arg, (str, bytes, bytearray)) for arg in args):
        # str(x) of anything else is its repr: of shared nested lists, 2**depth characters
        raise pickle.UnpicklingError(f"refusing {name}({', '.join(type(arg).__name__ for arg in args)}) from the "
                                     f"pickle: text is built from text or bytes only")
    if issubclass(func, _SIZED_TYPES) and not all(isinstance(arg, _LITERAL_VALUES) for arg in args):
        kinds = ", ".join(type(arg).__name__ for arg in args)
        raise pickle.UnpicklingError(f"refusing {name}({kinds}) from the pickle: its pickles pass literal values, "
                                     f"and a size or a range would allocate without bound")
    for arg in args:  # set([...]) (protocol 2), dict([(key, value), ...]): hashed as the opcodes' items are
        if issubclass(func, (set, frozenset)) and isinstance(arg, (list, tuple)):
            _check_hashed_items(len(arg), arg)
        elif issubclass(func, dict) and isinstance(arg, (list, tuple)):
            _check_hashed_items(len(arg), [pair[0] if isinstance(pair, tuple) and pair else pair for pair in arg],
                                keys=True)


def _safe_frombuffer(buf, dtype, shape, order):
    """numpy's _frombuffer (protocol-5 arrays) for plain dtypes only: object fields would read pointers from bytes."""
    if not _plain_dtype(np.dtype(dtype)):
        raise pickle.UnpicklingError("refusing a numpy array of Python objects or of a structured dtype stored as raw "
                                     "bytes")
    return _numpy_frombuffer()(buf, dtype, shape, order)


def _plain_dtype(dtype) -> bool:
    """A numpy dtype without fields, sub-arrays or objects. A pickle can forge a structured dtype's state (BUILD calls
    dtype.__setstate__) so that an object field is not flagged as one; this project's files hold no structured
    arrays, so none is accepted."""
    return isinstance(dtype, np.dtype) and dtype.fields is None and dtype.subdtype is None and not dtype.hasobject


def _plain_or_object_dtype(dtype) -> bool:
    """`_plain_dtype`, or numpy's own object dtype (object arrays are built from lists of whitelisted objects)."""
    return _plain_dtype(dtype) or (isinstance(dtype, np.dtype) and dtype.kind == "O" and dtype.fields is None)


def _check_loaded_data(obj, source: str) -> None:
    """After a safe load: every numpy array, scalar and dtype in `obj` is plain (`_plain_dtype`; object arrays, which
    can only hold whitelisted objects, stay allowed), and every plain torch module carries no hooks and does not
    shadow its class's methods (`_check_plain_module`)."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (np.ndarray, np.generic, np.dtype)):
            dtype = item if isinstance(item, np.dtype) else item.dtype
            if not _plain_or_object_dtype(dtype):
                raise NetworkPickleError(f"{source}: refusing a numpy value of structured dtype (fields "
                                         f"{sorted(dtype.fields or {})}): a pickle can forge such a dtype")
            if isinstance(item, np.ndarray) and dtype.kind == "O":
                stack.extend(item.ravel().tolist())
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, PickledObject):
            stack.append(item.state)
        elif isinstance(item, torch.nn.Module):
            _check_plain_module(item, source)
            stack.extend(item.__dict__.values())


_MODULE_HOOKS = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks")


def _check_plain_module(module: torch.nn.Module, source: str) -> None:
    """A torch module as a pickle left it: no hooks (callables torch runs on forward, backward or state_dict) and no
    instance attribute that shadows a method or property of its class (e.g. `forward`)."""
    if not all(isinstance(module.__dict__.get(name, {}), dict) for name in ("_parameters", "_buffers", "_modules")):
        raise NetworkPickleError(f"{source}: a pickled {type(module).__name__} has a malformed state")
    for name in _MODULE_HOOKS:
        if getattr(module, name, None):
            raise NetworkPickleError(f"{source}: refusing a pickled {type(module).__name__} with {name}")
    for name in module.__dict__:
        attribute = inspect.getattr_static(type(module), name, None)
        if callable(attribute) or isinstance(attribute, property):
            raise NetworkPickleError(f"{source}: refusing a pickled {type(module).__name__} whose state replaces "
                                     f"its {name!r}")


_PLAIN_TYPES = ("set", "frozenset", "slice", "complex", "bytearray", "bytes", "object", "dict", "list", "tuple", "int",
                "float", "str", "bool", "range")


def _safe_dill_load_type(name):
    """dill's reference to a builtin type by its name (`dill._dill._load_type`: files pickled with dill, e.g. GDD's
    class embedding, name `set` so), for the plain types allowed above only; dill can name code and function types
    too."""
    if name not in _PLAIN_TYPES:
        raise pickle.UnpicklingError(f"refusing dill's type {_shown(name)}: only plain container and number types")
    return getattr(__import__("builtins"), name)


def _numpy_multiarray():
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2 (and the 1.26 alias).
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def _numpy_frombuffer():
    try:
        return importlib.import_module("numpy._core.numeric")._frombuffer
    except (ImportError, AttributeError):
        return importlib.import_module("numpy.core.numeric")._frombuffer


def _build_safe_globals() -> dict:
    table = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
        ("_codecs", "encode"): _safe_codecs_encode,
        ("dnnlib", "EasyDict"): EasyDict,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("torch", "Tensor"): torch.Tensor,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
        ("torch._tensor", "_rebuild_from_type"): _no_hooks(torch._tensor._rebuild_from_type),
        ("torch._tensor", "_rebuild_from_type_v2"): _no_hooks(torch._tensor._rebuild_from_type_v2),
    }
    if hasattr(torch._utils, "_rebuild_tensor"):
        table[("torch._utils", "_rebuild_tensor")] = _no_hooks(torch._utils._rebuild_tensor)
    for name in _HOOKS_ARG:
        if hasattr(torch._utils, name):
            table[("torch._utils", name)] = _no_hooks(getattr(torch._utils, name))
    for name in _PLAIN_TYPES:
        table[("builtins", name)] = getattr(__import__("builtins"), name)
    for module_name in ("dill._dill", "dill.dill"):  # dill >= 0.3, and before
        table[(module_name, "_load_type")] = _safe_dill_load_type
    for module_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module_name, "_reconstruct")] = _safe_reconstruct
        table[(module_name, "scalar")] = _safe_scalar
    for module_name in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(module_name, "_frombuffer")] = _safe_frombuffer
    table[("numpy", "dtype")] = np.dtype
    table[("numpy", "ndarray")] = _NDARRAY
    return table


_SAFE_GLOBALS: dict | None = None
_PY2_MODULE_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # What protocol-2 pickles (torch.save) write.
_PY2_NAMES = {("__builtin__", "unicode"): ("builtins", "str"), ("__builtin__", "long"): ("builtins", "int"),
              ("__builtin__", "xrange"): ("builtins", "range")}  # Python's own fix_imports renames, protocols < 3.
_RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")


def _resolve_safe_global(module: str, name: str):
    """The object a safe pickle may reference as `module.name`, or None when it is not allowed. Readers with a
    narrower whitelist (numpy-only pickles) take their objects from here too (`GuardedUnpickler.find_class`): numpy's
    ndarray, _reconstruct and _frombuffer only in their guarded forms."""
    global _SAFE_GLOBALS
    if _SAFE_GLOBALS is None:
        _SAFE_GLOBALS = _build_safe_globals()
    module, name = _PY2_NAMES.get((module, name), (module, name))
    module = _PY2_MODULE_NAMES.get(module, module)
    obj = _SAFE_GLOBALS.get((module, name))
    if obj is not None:
        return obj
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
        return getattr(torch, name)
    # Plain torch containers and layers: rebuilding them (NEWOBJ + Module.__setstate__) runs no user code, and
    # their state is only read for tensors. An explicit list, not "anything under torch.nn.modules".
    if module.startswith("torch.nn.modules.") and name in _TORCH_NN_CLASSES:
        obj = getattr(torch.nn, name, None)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == module:
            return obj
    return None


_TORCH_NN_CLASSES = frozenset({
    "Module", "ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList", "Identity", "Flatten",
    "SiLU", "ReLU", "LeakyReLU", "GELU", "Sigmoid", "Tanh", "Softmax", "Dropout", "Linear", "Conv2d",
    "ConvTranspose2d", "GroupNorm", "LayerNorm", "BatchNorm2d", "Embedding", "AvgPool2d", "MaxPool2d", "Upsample",
})


def _check_container(target, kind: type, opcode: str) -> None:
    if not isinstance(target, kind):
        raise pickle.UnpicklingError(f"refusing pickle's {opcode} on a {type(target).__name__} (only a "
                                     f"{kind.__name__} takes it here)")


# Calls may build this much more than the file has given (bytes; `GuardedUnpickler._count_copy`).
_COPY_SLACK = 64 << 20
_COPY_FACTOR = 4

# Sets, and dicts keyed by numbers, past this many items: ints (and tuples of them) hash predictably, and 60,000 keys
# of one hash took a minute to insert. A network pickle holds a few small ones.
_MAX_HASHED_ITEMS = 10_000


def _length(target) -> int:
    try:
        return len(target)
    except TypeError:
        return 0


def _check_hashed_items(total: int, items, keys: bool = False) -> None:
    if total > _MAX_HASHED_ITEMS and (not keys or any(type(item) is not str for item in items)):
        raise pickle.UnpicklingError(f"refusing a {'dict with number keys' if keys else 'set'} of more than "
                                     f"{_MAX_HASHED_ITEMS:,} items (a network pickle holds none)")
    for item in items:  # hashing a tuple hashes all of it, shared parts again: 30 nested pairs took 42 s
        if isinstance(item, (tuple, frozenset)) and any(isinstance(part, (tuple, frozenset, list, dict, set))
                                                        for part in item):
            raise pickle.UnpicklingError(f"refusing a {'dict key' if keys else 'set item'} that nests containers")


def _safe_scalar(dtype, data=None):
    """numpy's scalar() as numpy pickles a scalar: a plain dtype and exactly its bytes (numpy would zero-fill any
    item size asked for: dtype('V2000000000') is 2 GB from 70 bytes)."""
    if not (_plain_dtype(dtype) and isinstance(data, (bytes, str)) and len(data) == dtype.itemsize):
        raise pickle.UnpicklingError(f"refusing numpy's scalar({_shown(dtype)}, {type(data).__name__} of "
                                     f"{len(data) if isinstance(data, (bytes, str)) else '?'} items): numpy's "
                                     f"pickles give a plain dtype and its bytes")
    return _numpy_multiarray().scalar(dtype, data)


def _check_build(inst, state) -> None:
    """What pickle's BUILD opcode may do to an object, checked before it does it. Refused: any class (BUILD sets class
    attributes: a whitelisted class would change for the whole process); an array of a structured dtype, or of Python
    objects from raw bytes; a tensor state carrying backward hooks or other attributes. Dtypes are checked after their
    BUILD (`_check_built_dtype`)."""
    if isinstance(inst, type):
        raise pickle.UnpicklingError(f"refusing to set attributes of the class {inst.__qualname__}")
    if isinstance(inst, np.ndarray):
        # numpy writes (version, shape, dtype, fortran, data); older files (shape, dtype, fortran, data)
        dtype, data = (state[2], state[4]) if isinstance(state, tuple) and len(state) == 5 else \
            (state[1], state[3]) if isinstance(state, tuple) and len(state) == 4 else (None, None)
        if not _plain_or_object_dtype(dtype):
            raise pickle.UnpicklingError("refusing a numpy array state of a structured or unknown dtype")
        if dtype.hasobject and not isinstance(data, list):
            raise pickle.UnpicklingError("refusing a numpy array of Python objects from raw bytes")
        shape = state[1] if len(state) == 5 else state[0]
        if dtype.hasobject and not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
                                    and len(data) == math.prod(shape)):
            # numpy reads a short list past its end, taking memory for object pointers
            raise pickle.UnpicklingError(f"refusing a numpy object array of shape {_shown(shape)} from a list of "
                                         f"{len(data)} items")
    elif isinstance(inst, torch.Tensor):
        parts = state if isinstance(state, tuple) else (state,)
        if len(parts) > 3 or (len(parts) == 3 and parts[2]) or any(isinstance(p, dict) and p for p in parts):
            raise pickle.UnpicklingError("refusing a tensor state with backward hooks or attributes")


def _check_built_dtype(dtype: np.dtype, state) -> None:
    """A dtype after BUILD: its state may be numpy's own in any of numpy's versions, but may not leave it other than
    the dtype its type string names (fields, sub-arrays, or flags that hide an object field or an object type: raw
    bytes would then be read as object pointers)."""
    if dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"refusing a structured numpy dtype from a pickle ({_shown(state)})")
    natural = np.dtype(dtype.str)
    if dtype != natural or dtype.flags != natural.flags or dtype.hasobject != natural.hasobject:
        raise pickle.UnpicklingError(f"refusing a numpy dtype state that differs from {_shown(natural)}'s own: "
                                     f"{_shown(state)}")


class GuardedUnpickler(pickle._Unpickler):
    """pickle's (pure-Python) unpickler with every BUILD checked by `_check_build`. The C unpickler offers no hook for
    BUILD, and a whitelist of globals alone does not stop BUILD from reshaping what those globals return. Subclasses
    give `find_class` its whitelist."""

    def load(self):
        try:
            return super().load()
        except (KeyError, IndexError, struct.error) as err:
            # What the C unpickler reports as UnpicklingError ("invalid load key", "stack underflow", short reads),
            # the pure-Python one raises as these: one type for every damaged file.
            raise pickle.UnpicklingError(f"damaged pickle data ({type(err).__name__}: {err})") from None

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        _check_build(inst, state)
        # pickle's BUILD, but with the type's __setstate__, never one the instance answers with: an attribute set by
        # an earlier BUILD, or a __getattr__ (EasyDict answers with its items), would let the file choose the call.
        self.stack.pop()
        setstate = getattr(type(inst), "__setstate__", None)
        if setstate is not None:
            setstate(inst, state)
        else:
            inst_state, slot_state = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
            if inst_state:
                inst.__dict__.update({sys.intern(k) if type(k) is str else k: v for k, v in inst_state.items()})
            for name, value in (slot_state or {}).items():
                setattr(inst, name, value)
        if isinstance(inst, np.dtype):
            _check_built_dtype(inst, state)

    # APPEND(S) and ADDITEMS call the container's own list/set methods, looked up on the type for the same reason;
    # only lists and sets take them (pickle's protocol also allows any object with append/extend/add).
    def load_append(self):
        value, target = self.stack.pop(), self.stack[-1]
        _check_container(target, list, "APPEND")
        list.append(target, value)

    def load_appends(self):
        items = self.pop_mark()
        _check_container(self.stack[-1], list, "APPENDS")
        list.extend(self.stack[-1], items)

    def load_additems(self):
        items = self.pop_mark()
        _check_container(self.stack[-1], set, "ADDITEMS")
        _check_hashed_items(len(self.stack[-1]) + len(items), items)
        set.update(self.stack[-1], items)

    def load_frozenset(self):
        items = self.pop_mark()
        _check_hashed_items(len(items), items)
        self.append(frozenset(items))

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        _check_hashed_items(_length(self.stack[-1]) + 1, [key], keys=True)
        self.stack[-1][key] = value

    def load_setitems(self):
        items = self.pop_mark()
        _check_hashed_items(_length(self.stack[-1]) + len(items) // 2, items[::2], keys=True)
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_dict(self):  # protocols 0 and 1
        items = self.pop_mark()
        _check_hashed_items(len(items) // 2, items[::2], keys=True)
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def __init__(self, file, *args, **kwargs):
        super().__init__(file, *args, **kwargs)
        self._input_tell = getattr(file, "tell", None)
        self._input_start = self._input_position()
        self._copied = 0  # bytes (items) built by calls: a memoized value copied 10,000 times was 5,000x its file

    def _input_position(self) -> int:
        try:
            return int(self._input_tell()) if self._input_tell is not None else 0
        except (OSError, ValueError):
            return 0

    def _count_copy(self, value) -> None:
        """What a call built, against what the file has given so far: copies of one memoized string or list
        (MEMO GET then bytearray(), _codecs.encode(), list()) would otherwise grow without the file growing."""
        if isinstance(value, (bytes, bytearray, str)):
            self._copied += len(value)
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            self._copied += 64 * len(value)  # about what an item costs in a container (a dict entry: more)
        else:
            return
        read = self._input_position() - self._input_start
        if self._copied > _COPY_SLACK + _COPY_FACTOR * read:
            raise pickle.UnpicklingError(f"refusing a pickle whose calls build about {self._copied:,} bytes from "
                                         f"{read:,} bytes of file (copies of one value)")

    def load_reduce(self):
        _check_call(self.stack[-2], self.stack[-1], "call")
        super().load_reduce()
        self._count_copy(self.stack[-1])

    def load_newobj(self):
        _check_call(self.stack[-2], self.stack[-1], "new")
        super().load_newobj()
        self._count_copy(self.stack[-1])

    def load_newobj_ex(self):
        _check_call(self.stack[-3], (*self.stack[-2], *self.stack[-1].values()), "new")
        super().load_newobj_ex()
        self._count_copy(self.stack[-1])

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
        _check_call(klass, args, "call")
        super()._instantiate(klass, args)
        self._count_copy(self.stack[-1])

    def find_class(self, module, name):
        """The whitelisted object (`_resolve_safe_global`); subclasses narrow the names and call this."""
        obj = _resolve_safe_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load the global '{module}.{name}'")
        return obj

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex


class SafeUnpickler(GuardedUnpickler):
    """Unpickler that accepts only whitelisted globals and turns persistent objects into `PickledObject`s.

    `class_registry` (EDM class name -> class) decides which persistent class names are accepted; `source` names
    the file in error messages.
    """

    class_registry: dict | None = None
    source: str = "<pickle>"
    max_storage_elements: int | None = None  # storages declared larger are refused (`_safe_load_from_bytes`)

    # torch's legacy loader sets `persistent_load` on the unpickler: the storage it creates for a persistent id is
    # allocated at the size the id declares, before (and whether or not) its bytes are read.
    @property
    def persistent_load(self):
        return getattr(self, "_persistent_load", super().persistent_load)

    @persistent_load.setter
    def persistent_load(self, function):
        limit = self.max_storage_elements

        def checked(pid):
            if (limit is not None and isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                    and not (isinstance(pid[4], int) and 0 <= pid[4] <= limit)):
                raise UnsafeTorchFileError(f"refusing a tensor storage declared with {_shown(pid[4])} elements in "
                                           f"{limit:,} bytes of data")
            return function(pid)
        self._persistent_load = checked

    def load(self):
        data = super().load()
        _check_loaded_data(data, self.source)
        return data

    def find_class(self, module, name):
        if (module, name) == _RECONSTRUCT:
            return self._reconstruct_pickled_object
        obj = _resolve_safe_global(module, name)
        if obj is None:
            raise NetworkPickleError(
                f"{self.source}: refusing to load the global '{module}.{name}': a safe network pickle holds only "
                f"tensors, numbers, containers and known persistent classes, and this reference could run "
                f"arbitrary code. The file may be unsafe (or it is not a network pickle).")
        return obj

    def _reconstruct_pickled_object(self, meta):
        if not isinstance(meta, dict):
            raise NetworkPickleError(f"{self.source}: malformed persistent object (meta is {type(meta).__name__})")
        meta = _apply_import_hooks(meta)
        class_name = meta.get("class_name")
        if meta.get("version") != _version:
            raise NetworkPickleError(f"{self.source}: persistent object {_shown(class_name)} has format version "
                                     f"{_shown(meta.get('version'))}; only EDM's version {_version} is supported")
        if meta.get("type") != "class" or not isinstance(class_name, str):
            raise NetworkPickleError(f"{self.source}: malformed persistent object (type {_shown(meta.get('type'))}, "
                                     f"class_name {_shown(class_name)})")
        classes = self.class_registry if self.class_registry is not None else PERSISTENT_CLASSES
        if class_name not in classes:
            _resolve_class(class_name, classes, self.source)  # Raises the error naming the known classes.
        return PickledObject(class_name, dict(meta["state"]), meta.get("module_src"))


def _make_safe_pickle_module(class_registry: dict | None = None, source: str = "<pickle>",
                             max_storage_elements: int | None = None) -> types.ModuleType:
    """A module object usable as torch.load's `pickle_module`: Unpickler, load, loads, UnpicklingError."""
    module = types.ModuleType("torch_utils.persistence.safe_pickle")
    unpickler = type("SafeUnpickler", (SafeUnpickler,), dict(class_registry=class_registry, source=source,
                                                             max_storage_elements=max_storage_elements))

    def load(file, **kwargs):
        return unpickler(file, **kwargs).load()

    def loads(data, **kwargs):
        return unpickler(io.BytesIO(data), **kwargs).load()

    module.Unpickler = unpickler
    module.load = load
    module.loads = loads
    module.UnpicklingError = pickle.UnpicklingError
    return module


# torch.load(..., weights_only=False, pickle_module=safe_pickle) reads torch.save files holding persistent objects
# through the whitelist (persistent objects stay `PickledObject`s; `import_pickled_objects` rebuilds them).
safe_pickle = _make_safe_pickle_module()


# ---------------------------------------------------------------------------------------------------------------------
# Reading, safely: rebuilding our objects from PickledObjects.


def _pickled_module_tree(root, source: str):
    """Walk a pickled module tree: {dotted path: node}, {dotted name: tensor} for parameters and buffers."""
    nodes, params, buffers = {}, {}, {}
    stack = [("", root)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, PickledObject):
            state = node.state
        elif isinstance(node, torch.nn.Module):
            state = node.__dict__
        else:
            raise NetworkPickleError(f"{source}: submodule {_shown(path)} is a {type(node).__name__}, not a module")
        nodes[path] = node
        prefix = f"{path}." if path else ""
        if not isinstance(state, dict) or not all(isinstance(state.get(key) or {}, dict)
                                                  for key in ("_parameters", "_buffers", "_modules")):
            raise NetworkPickleError(f"{source}: submodule {path!r} has a malformed state")
        for key, out in (("_parameters", params), ("_buffers", buffers)):
            for name, tensor in (state.get(key) or {}).items():
                if tensor is None:
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise NetworkPickleError(f"{source}: {key[1:-1]} {prefix}{name} is a {type(tensor).__name__}")
                out[prefix + name] = tensor
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                stack.append((prefix + name, child))
    return nodes, params, buffers


def _format_names(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:20])
    return shown + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")


@torch.no_grad()
def _copy_pickled_state(module: torch.nn.Module, pickled: PickledObject, classes: dict, source: str) -> None:
    """Copy every parameter and buffer of the pickled tree into `module` by dotted name (all must match)."""
    nodes, params, buffers = _pickled_module_tree(pickled, source)
    ours = dict(module.named_parameters(remove_duplicate=False))
    ours.update(module.named_buffers(remove_duplicate=False))
    theirs = {**params, **buffers}
    missing, unexpected = ours.keys() - theirs.keys(), theirs.keys() - ours.keys()
    mismatched = [f"{name} {tuple(theirs[name].shape)} vs {tuple(ours[name].shape)}"
                  for name in sorted(ours.keys() & theirs.keys()) if theirs[name].shape != ours[name].shape]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the tensors of the pickled {pickled.class_name} do not match ours, built from its "
                 f"init kwargs"]
        if missing:
            lines.append(f"  missing from the pickle: {_format_names(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the pickle: {_format_names(unexpected)}")
        if mismatched:
            lines.append(f"  shapes (pickle vs ours): {_format_names(mismatched)}")
        raise NetworkPickleError("\n".join(lines))

    # Modes follow the pickle (EDM snapshots are in eval mode); modules the pickle lacks follow its root.
    root_training = pickled.state.get("training")
    if isinstance(root_training, bool):
        module.train(root_training)
    # Nested persistent objects must be the same layer classes as ours at the same place.
    for path, submodule in module.named_modules(remove_duplicate=False):
        node = nodes.get(path)
        if node is None:
            continue
        if isinstance(node, PickledObject) and path:
            expected = _resolve_class(node.class_name, classes, source)
            if not isinstance(submodule, expected):
                raise NetworkPickleError(f"{source}: submodule {path!r} is a {node.class_name} in the pickle but a "
                                         f"{type(submodule).__name__} in ours")
        training = (node.state if isinstance(node, PickledObject) else node.__dict__).get("training")
        if isinstance(training, bool):
            submodule.training = training

    for name, tensor in ours.items():
        tensor.copy_(theirs[name])
    for name, param in module.named_parameters(remove_duplicate=False):
        param.requires_grad_(bool(theirs[name].requires_grad))


_NAME_KEYS = ("class_name", "func_name")  # dnnlib's construct_class_by_name / call_func_by_name import these


def _names_to_import(obj, pickled: PickledObject, source: str):
    """Every value under a 'class_name' or 'func_name' key in the nested dicts, lists and tuples of constructor
    arguments, which may hold nothing but those containers, strings, numbers, None and persistent objects (rebuilt
    and checked in turn): a set of pairs or an object array could become a dict of names inside a constructor."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if id(item) in seen:  # shared containers once: a chain of them would otherwise be walked 2**depth times
                continue
            seen.add(id(item))
        if isinstance(item, dict):
            for key, value in item.items():
                if not isinstance(key, str):
                    raise NetworkPickleError(f"{source}: the pickled {pickled.class_name}'s constructor arguments "
                                             f"hold a dict key of type {type(key).__name__}")
                if key in _NAME_KEYS:
                    yield value
                stack.append(value)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif not (item is None or isinstance(item, (str, bool, int, float, PickledObject))
                  or (isinstance(item, np.generic) and item.dtype.kind in "biuf")):
            raise NetworkPickleError(f"{source}: the pickled {pickled.class_name}'s constructor arguments hold a "
                                     f"{type(item).__name__}; only containers, strings and numbers are accepted")


def _check_constructor_names(pickled: PickledObject, args, kwargs, classes: dict, source: str) -> None:
    """Constructor arguments from a file may name only registered persistent classes: a wrapper loss builds its base
    from `base_kwargs['class_name']`, and any such name would otherwise import and call whatever the file says."""
    allowed = {entry if isinstance(entry, str) else f"{entry.__module__}.{entry.__qualname__}"
               for entry in classes.values()}
    for name in _names_to_import((args, kwargs), pickled, source):
        if not isinstance(name, str) or name not in allowed:
            raise NetworkPickleError(f"{source}: the pickled {pickled.class_name}'s constructor arguments name "
                                     f"{_shown(name)} to import and call, which is not a registered persistent class: "
                                     f"refused (a file must not choose the code that runs)")


def _rebuild(pickled: PickledObject, classes: dict, source: str, memo: dict):
    """Our object for a pickled persistent one: constructed from its init args/kwargs, tensors copied in."""
    cls = _resolve_class(pickled.class_name, classes, source)
    init_args = pickled.state.get("_init_args")
    init_kwargs = pickled.state.get("_init_kwargs")
    if init_args is None or init_kwargs is None:
        raise NetworkPickleError(f"{source}: the pickled {pickled.class_name} does not record its constructor "
                                 f"arguments (_init_args/_init_kwargs), so it cannot be rebuilt without running "
                                 f"its embedded code")
    _check_constructor_names(pickled, init_args, init_kwargs, classes, source)
    init_args = _import_objects(init_args, classes, source, memo)
    init_kwargs = dict(_import_objects(init_kwargs, classes, source, memo))
    if not issubclass(cls, torch.nn.Module):
        # Forks add options to their losses (AOT's EDMLoss takes `batch`); a loss is only carried along in a
        # snapshot, so drop what ours does not take rather than refuse the whole file. Networks stay strict.
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(init_kwargs) - set(params))
            if unknown:
                dist.warn0(f"{source}: ignoring constructor arguments {unknown} of {pickled.class_name}, which "
                              f"our {cls.__qualname__} does not take", stacklevel=2)
                init_kwargs = {k: v for k, v in init_kwargs.items() if k not in unknown}
    if issubclass(cls, torch.nn.Module):
        _, params, buffers = _pickled_module_tree(pickled, source)
        tensors = itertools.chain(params.values(), buffers.values())
    else:
        tensors = (value for value in pickled.state.values() if isinstance(value, torch.Tensor))
    # Elements the file really holds, storage by storage: views (an expand's stride 0, many tensors over one storage)
    # would otherwise raise the budget without the file holding more.
    storages = {}
    for t in tensors:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes() // max(t.element_size(), 1))
    stored = sum(storages.values())
    budget = _AllocationBudget(_CONSTRUCTION_FACTOR * stored + _CONSTRUCTION_SLACK, pickled.class_name, stored, source)
    try:
        # The constructor draws initial weights that the pickle's then replace: from a forked generator, so that
        # loading a file leaves the caller's random stream as pickle.load does (EDM resumes and --transfer draw
        # their first sigma and noise right after loading).
        with torch.device("cpu"), torch.random.fork_rng(devices=[]), budget:
            obj = cls(*init_args, **init_kwargs)
    except NetworkPickleError:
        raise
    except Exception as err:
        if isinstance(err, ValueError) and not issubclass(cls, torch.nn.Module):
            # A loss is only carried along (as with the options dropped above): one whose options ours now refuses
            # (the checks train.py's --loss-opt meets, e.g. VELoss's sigma_min > sigma_max) stays its record, unbuilt,
            # rather than making the file's network unreadable. Networks stay strict.
            dist.warn0(f"{source}: keeping the pickled {pickled.class_name} as a record, unbuilt: our "
                       f"{cls.__qualname__} refuses its options {_shown(dict(init_kwargs))} ({_shown(str(err))})",
                       stacklevel=2)
            return pickled
        raise NetworkPickleError(f"{source}: cannot build {cls.__module__}.{cls.__qualname__} from the pickled "
                                 f"init kwargs {_shown(dict(init_kwargs))}: {type(err).__name__}: "
                                 f"{_shown(str(err))}") from err
    if isinstance(obj, torch.nn.Module):
        _copy_pickled_state(obj, pickled, classes, source)
    else:
        # Plain persistent objects (losses) are their constructor arguments; tensors or persistent objects stored
        # as attributes are state the constructor cannot know, so they are restored.
        for name, value in pickled.state.items():
            if name not in ("_init_args", "_init_kwargs") and isinstance(value, (torch.Tensor, PickledObject)):
                setattr(obj, name, _import_objects(value, classes, source, memo))
    return obj


# Constructor arguments in messages: a few levels and items (a file's arguments can share containers at every level,
# which a plain repr prints 2**depth times).
_ARGUMENTS_REPR = reprlib.Repr()  # attributes, not keywords: Python 3.11's Repr takes none
_ARGUMENTS_REPR.maxlevel, _ARGUMENTS_REPR.maxdict, _ARGUMENTS_REPR.maxlist, _ARGUMENTS_REPR.maxtuple = 4, 30, 30, 30
_ARGUMENTS_REPR.maxstring, _ARGUMENTS_REPR.maxother, _ARGUMENTS_REPR.maxlong = 200, 200, 60


# A constructor may ask torch's factory functions for this many times the elements of the tensors its pickle holds,
# plus the slack (buffers a class does not pickle, e.g. resampling filters; a discriminator's fixed projection),
# before the build is stopped: the sizes come from the file's constructor arguments.
_CONSTRUCTION_FACTOR = 4
_CONSTRUCTION_SLACK = 1 << 24


def _requested_size(name: str, args: tuple, kwargs: dict):
    """The shape a torch factory call asks for, from its arguments (without allocating: a meta-device probe would
    import torch._dynamo on every load), or None for a call that is not a factory."""
    def shape(value):
        if isinstance(value, (tuple, list, torch.Size)):
            if len(value) == 1 and isinstance(value[0], (tuple, list, torch.Size)):
                return shape(value[0])
            return [int(v) for v in value]
        return [int(value)]

    if "size" in kwargs and name in _SIZED_FACTORIES | _NEW_METHODS | {"randint", "full", "empty_strided"}:
        return shape(kwargs["size"])
    if name in _SIZED_FACTORIES:
        return shape(args)
    if name in ("full", "empty_strided", "randperm"):
        return shape(args[0])
    if name == "randint":
        return shape(next(a for a in reversed(args) if isinstance(a, (tuple, list, torch.Size))))
    if name == "new_full":  # Tensor.new_full(self, size, fill_value)
        return shape(args[1])
    if name in _NEW_METHODS:  # Tensor.new_zeros(self, *size)
        return shape(args[1:])
    if name == "eye":
        n = int(args[0] if args else kwargs["n"])
        return [n, int(args[1] if len(args) > 1 else kwargs.get("m", n))]
    if name in ("linspace", "logspace"):
        return [int(args[2] if len(args) > 2 else kwargs["steps"])]
    if name == "arange":
        values = list(args) + [kwargs[k] for k in ("start", "end", "step") if k in kwargs]
        start, end, step = (0, values[0], 1) if len(values) == 1 else (values + [1])[:3]
        return [max(0, math.ceil((float(end) - float(start)) / float(step)))]
    if name.endswith("_like") and args and isinstance(args[0], torch.Tensor):
        return list(args[0].shape)
    return None


_SIZED_FACTORIES = frozenset({"empty", "zeros", "ones", "rand", "randn"})
_NEW_METHODS = frozenset({"new_empty", "new_zeros", "new_ones", "new_full"})


class _AllocationBudget(TorchFunctionMode):
    """Stop a constructor once the tensors it asks torch's factory functions for (torch.empty, randn, zeros, ...)
    add up to more than `limit` elements, before the call that would pass it allocates: a 250 KB pickle declaring
    label_dim=8e6 described a 1.5 GB network, allocated before its tensors were compared with the file's."""

    def __init__(self, limit: int, class_name: str, stored: int, source: str):
        super().__init__()
        self.limit, self.class_name, self.stored, self.source = limit, class_name, stored, source
        self.requested = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        try:
            size = _requested_size(name, args, kwargs)
        except (TypeError, ValueError, IndexError, KeyError, StopIteration, OverflowError):
            size = None  # Not a factory call we can read; torch itself reports malformed sizes.
        if size is not None:
            self.requested += math.prod(max(0, s) for s in size)
            if self.requested > self.limit:
                raise NetworkPickleError(
                    f"{self.source}: the pickled constructor arguments of {self.class_name} ask for tensors of more "
                    f"than {self.limit:,} elements, but the pickle holds {self.stored:,}: refusing to build it")
        return func(*args, **kwargs)


def _import_objects(obj, classes: dict, source: str, memo: dict):
    """Replace every PickledObject in containers (and plain torch modules) by our rebuilt object."""
    key = id(obj)
    if key in memo:
        return memo[key][1]
    if isinstance(obj, PickledObject):
        result = _rebuild(obj, classes, source, memo)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _import_objects(v, classes, source, memo)
        result = obj
    elif isinstance(obj, list):
        obj[:] = [_import_objects(v, classes, source, memo) for v in obj]
        result = obj
    elif type(obj) is tuple:
        result = tuple(_import_objects(v, classes, source, memo) for v in obj)
    elif isinstance(obj, torch.nn.Module) and not isinstance(obj, torch.Tensor):
        if not isinstance(obj.__dict__.get("_modules"), dict):  # created by NEWOBJ, never given a state
            raise NetworkPickleError(f"{source}: a pickled {type(obj).__name__} without its state")
        for name, child in obj._modules.items():
            obj._modules[name] = _import_objects(child, classes, source, memo)
        result = obj
    else:
        return obj
    memo[key] = (obj, result)  # Keep obj alive so that its id is not reused during the walk.
    return result


def import_pickled_objects(data, extra_classes: dict | None = None, source: str = "<pickle>"):
    """Rebuild every `PickledObject` in `data` (as left by `safe_pickle`) as our class of the same EDM name."""
    classes = {**PERSISTENT_CLASSES, **(extra_classes or {})}
    return _import_objects(data, classes, source, {})


# ---------------------------------------------------------------------------------------------------------------------
# Public API.


@contextlib.contextmanager
def _open_input(f_or_path_or_url):
    if isinstance(f_or_path_or_url, (str, os.PathLike)):
        name = os.fspath(f_or_path_or_url)
        with dnnlib.util.open_url(name) as f:
            yield f, name
    elif hasattr(f_or_path_or_url, "read"):
        yield f_or_path_or_url, getattr(f_or_path_or_url, "name", "<file object>")
    else:
        raise TypeError(f"expected a path, URL or binary file object, got {type(f_or_path_or_url).__name__}")


@contextlib.contextmanager
def _refused_when_too_large(source: str):
    """A file nested deeper than Python's recursion limit, or describing more than the memory holds, is refused in
    one line naming it, as any other file that is not a network pickle."""
    try:
        yield
    except RecursionError:
        raise NetworkPickleError(f"{source}: refused: its objects are nested deeper than a network pickle's "
                                 f"(RecursionError)") from None
    except (MemoryError, OverflowError) as err:
        raise NetworkPickleError(f"{source}: refused: it describes objects too large to build ({type(err).__name__}"
                                 f"{': ' + str(err) if str(err) else ''})") from None


def load_network_pickle(f_or_path_or_url, extra_classes: dict | None = None) -> dict:
    """Import a network pickle (EDM's, ours, STF/AOT/GDD releases) without executing anything it embeds.

    Accepts a local path, a file:// or http(s) URL (downloaded once into the dnnlib cache) or a binary file object.
    Returns the pickled dict ({'ema': ..., 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': ...}) with every
    persistent object rebuilt as our class of the same name (`PERSISTENT_CLASSES`, plus `extra_classes`), on the
    CPU, its tensors copied from the file. A pickle holding a bare persistent object is returned as {'ema': obj}.
    Raises NetworkPickleError for unsafe globals, unknown classes or tensors that do not match.
    """
    classes = {**PERSISTENT_CLASSES, **(extra_classes or {})}
    with _open_input(f_or_path_or_url) as (f, source):
        if getattr(f, "seekable", lambda: False)():
            head = f.read(4)
            f.seek(-len(head), io.SEEK_CUR)
            if head == b"PK\x03\x04":
                raise NetworkPickleError(f"{source}: this is a zip archive (a torch.save file such as a training "
                                         f"state, or a numpy .npz), not a network pickle: sample a run's "
                                         f"network-snapshot-NNNNNN.pkl (in Python, EDM's training states read with "
                                         f"persistence.load_edm_training_state())")
        module = _make_safe_pickle_module(classes, source)
        try:
            with _refused_when_too_large(source):
                data = module.load(f)
        except NetworkPickleError:
            raise
        except UnsafeTorchFileError as err:
            raise NetworkPickleError(f"{source}: {err}") from err
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError,
                LookupError) as err:  # LookupError: an unknown codec or error handler named by the file
            raise NetworkPickleError(f"{source}: not a readable network pickle: {type(err).__name__}: {err}") from err
    try:
        with _refused_when_too_large(source):
            data = _import_objects(data, classes, source, {})
    except (AttributeError, TypeError, ValueError, LookupError) as err:  # structures no network pickle has
        raise NetworkPickleError(f"{source}: malformed network pickle: {type(err).__name__}: {err}") from err
    if isinstance(data, dict):
        return data
    if is_persistent(data):
        return {"ema": data}
    raise NetworkPickleError(f"{source}: expected a dict of networks (ema, loss_fn, ...) or a persistent module at "
                             f"the top level of the pickle, got {type(data).__name__}")


def load_edm_training_state(path, extra_classes: dict | None = None) -> dict:
    """Read a `training-state-*.pt` written by EDM (torch.save of dict(net=<persistent module>, optimizer_state=...)),
    which torch.load(weights_only=True) refuses, through the same whitelist; the net is rebuilt as our class."""
    path = os.fspath(path)
    classes = {**PERSISTENT_CLASSES, **(extra_classes or {})}
    module = _make_safe_pickle_module(classes, path)
    try:
        with open(path, "rb") as f, _refused_when_too_large(path):
            check_torch_file(f, path)
            data = torch.load(f, map_location="cpu", weights_only=False, pickle_module=module)
    except NetworkPickleError:
        raise
    except UnsafeTorchFileError as err:
        message = str(err)
        raise NetworkPickleError(message if message.startswith(path) else f"{path}: {message}") from err
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError,
            LookupError) as err:
        raise NetworkPickleError(f"{path}: not a readable training state: {type(err).__name__}: {err}") from err
    try:
        with _refused_when_too_large(path):
            data = _import_objects(data, classes, path, {})
    except (AttributeError, TypeError, ValueError, LookupError) as err:
        raise NetworkPickleError(f"{path}: malformed training state: {type(err).__name__}: {err}") from err
    if not isinstance(data, dict):
        raise NetworkPickleError(f"{path}: expected a dict (net, optimizer_state) at the top level, "
                                 f"got {type(data).__name__}")
    return data


def _unwrap(module):
    """The plain module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, torch.nn.Module):
            module = module._orig_mod
        else:
            return module


def _to_python_scalars(obj, memo: set) -> Any:
    """numpy scalars -> Python numbers, stray tensors -> CPU, inside containers, persistent objects and modules.

    numpy 2 pickles numpy scalars as numpy._core.multiarray.scalar, which numpy < 1.26.1 (EDM's environment)
    cannot load; Python floats load everywhere.
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.cpu()
    if id(obj) in memo:
        return obj
    memo.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _to_python_scalars(v, memo)
    elif isinstance(obj, list):
        obj[:] = [_to_python_scalars(v, memo) for v in obj]
    elif type(obj) is tuple:
        return tuple(_to_python_scalars(v, memo) for v in obj)
    elif isinstance(obj, torch.nn.Module) or is_persistent(obj):
        for k, v in vars(obj).items():
            if k not in ("_parameters", "_buffers"):
                vars(obj)[k] = _to_python_scalars(v, memo)
    return obj


def _pickle_globals(file) -> set[tuple[str, str]]:
    """Every (module, name) global a pickle references, read from its opcodes (nothing is loaded)."""
    found, recent, memo = set(), [], {}
    for opcode, arg, _ in pickletools.genops(file):
        name = opcode.name
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                    "STRING"):
            recent.append(arg)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = recent[-1] if recent else None
        elif name == "STACK_GLOBAL":
            if len(recent) >= 2:
                found.add((recent[-2], recent[-1]))
            recent = []
        elif name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            found.add((module, attr))
            recent = []
        else:
            recent = []
    return found


def save_network_pickle(path, data: dict) -> None:
    """Write `data` (e.g. dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)) as an EDM network pickle.

    Modules are deep-copied to the CPU in eval mode without gradients, numpy scalars become Python numbers, and the
    file is written atomically. EDM's generate.py can load it, and so can `load_network_pickle`: a value that would
    reference a global outside the safe whitelist (e.g. a non-persistent class) is refused with ValueError.
    """
    if not isinstance(data, dict):
        raise TypeError(f"save_network_pickle expects a dict of networks, got {type(data).__name__}")
    snapshot = {}
    for key, value in data.items():
        value = _unwrap(value)
        if isinstance(value, torch.nn.Module):
            if not is_persistent(value):
                raise ValueError(f"cannot save {key!r}: {type(value).__name__} is not a persistent class "
                                 f"(decorate it with torch_utils.persistence.persistent_class)")
            value = copy.deepcopy(value).eval().requires_grad_(False).cpu()
        else:
            value = copy.deepcopy(value)
        snapshot[key] = value
    snapshot = _to_python_scalars(snapshot, set())
    path = os.fspath(path)
    with dnnlib.util.atomic_output(path, "wb") as f:
        pickle.dump(snapshot, f, protocol=4)
        f.flush()
        with open(f.name, "rb") as written:
            unsafe = sorted(g for g in _pickle_globals(written)
                            if g != _RECONSTRUCT and _resolve_safe_global(*g) is None)
        if unsafe:
            names = ", ".join(f"{m}.{n}" for m, n in unsafe)
            raise ValueError(f"cannot save {path}: the pickle would reference {names}, which load_network_pickle "
                             f"refuses; store only persistent classes, tensors, numbers and containers")
