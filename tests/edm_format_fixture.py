"""Test-only helpers for EDM's network-pickle format (version 6); independent code, nothing copied from EDM.

- `edm_style_dumps`: an EDM-format writer that does not use our decorator's __reduce__: any object carrying
  `_init_kwargs` is written as `torch_utils.persistence._reconstruct_persistent_obj(meta)` with a module source of
  the test's choosing (e.g. one that writes a marker file and raises if it is ever executed).
- `edm_style_loads`: an EDM-style loader that DOES execute embedded source (into fresh modules), as EDM's
  generate.py does through plain pickle.
- `make_edm_environment` + `EDM_LOAD_SCRIPT`: a directory holding only `dnnlib`, `torch_utils.misc` and an
  EDM-like `torch_utils.persistence`, where a subprocess loads a snapshot with plain pickle, as EDM's
  generate.py would in EDM's checkout (no `training` or `losses` package importable).
"""

import io
import os
import pickle
import shutil
import types
import uuid

import torch

from torch_utils import persistence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with N(0, 0.1^2) values (EDM inits some layers at ~1e-5, which hides differences)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# EDM-format writer, independent of the decorator.


def poisoned_source(src: str, marker_path: str) -> str:
    """`src` preceded by code that writes `marker_path` and raises: proof of execution if the marker appears."""
    return (f"import pathlib\npathlib.Path({str(marker_path)!r}).write_text('executed')\n"
            f"raise RuntimeError('embedded module source was executed')\n{src}")


class _EDMStylePickler(pickle.Pickler):
    def __init__(self, file, module_src_for, state_hook, version):
        super().__init__(file, protocol=4)
        self.module_src_for = module_src_for
        self.state_hook = state_hook
        self.version = version

    def reducer_override(self, obj):
        if isinstance(obj, type) or "_init_kwargs" not in getattr(obj, "__dict__", {}):
            return NotImplemented
        state = dict(vars(obj))
        state.pop("_compiled_call_impl", None)
        if self.state_hook is not None:
            state = self.state_hook(obj, state)
        meta = dict(type="class", version=self.version, module_src=self.module_src_for(obj),
                    class_name=type(obj).__name__, state=state)
        # Pickled by reference, as 'torch_utils.persistence _reconstruct_persistent_obj': EDM's global.
        return persistence._reconstruct_persistent_obj, (meta,)


def edm_style_dumps(obj, module_src_for, state_hook=None, version=6) -> bytes:
    """Pickle `obj` in EDM's format; `module_src_for(o)` gives the source embedded for each persistent object `o`,
    `state_hook(o, state) -> state` may edit what is pickled as its state."""
    buffer = io.BytesIO()
    _EDMStylePickler(buffer, module_src_for, state_hook, version).dump(obj)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# EDM-style loader that executes embedded source (in this process).


class _ExecUnpickler(pickle.Unpickler):
    modules: dict = {}  # source -> module, shared like EDM's cache

    def find_class(self, module, name):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return self.reconstruct
        return super().find_class(module, name)

    def reconstruct(self, meta):
        assert meta["version"] == 6 and meta["type"] == "class"
        module = self.modules.get(meta["module_src"])
        if module is None:
            module = types.ModuleType(f"_edm_exec_{uuid.uuid4().hex}")
            exec(meta["module_src"], module.__dict__)
            self.modules[meta["module_src"]] = module
        cls = module.__dict__[meta["class_name"]]
        obj = cls.__new__(cls)
        if callable(getattr(obj, "__setstate__", None)):
            obj.__setstate__(dict(meta["state"]))
        else:
            obj.__dict__.update(meta["state"])
        return obj


def edm_style_loads(data: bytes):
    """Load as EDM's generate.py does (plain pickle, embedded source executed into a fresh module per source)."""
    return _ExecUnpickler(io.BytesIO(data)).load()


# ---------------------------------------------------------------------------------------------------------------------
# A stand-in for EDM's checkout, for loading our snapshots in a subprocess.

EDM_PERSISTENCE_SRC = '''"""EDM-like persistence (test stand-in): executes embedded module source when unpickling."""
import copy
import inspect
import sys
import types
import uuid

import dnnlib

_version = 6
_decorators = set()
_src_by_module_name = {}
_module_by_src = {}


def persistent_class(orig_class):
    if orig_class in _decorators:
        return orig_class
    module = sys.modules[orig_class.__module__]
    src = _src_by_module_name.get(module.__name__)
    if src is None:
        src = inspect.getsource(module)
        _src_by_module_name[module.__name__] = src
        _module_by_src[src] = module

    class Decorator(orig_class):
        _orig_module_src = src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__()) + [None, None]
            meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                        class_name=self._orig_class_name, state=fields[2])
            return (_reconstruct_persistent_obj, (meta,), None)

    Decorator.__name__ = orig_class.__name__
    Decorator.__module__ = orig_class.__module__
    _decorators.add(Decorator)
    return Decorator


def is_persistent(obj):
    return obj in _decorators or type(obj) in _decorators


def import_hook(hook):
    pass


def _reconstruct_persistent_obj(meta):
    assert meta["version"] == _version and meta["type"] == "class"
    src = meta["module_src"]
    module = _module_by_src.get(src)
    if module is None:
        name = "_imported_module_" + uuid.uuid4().hex
        module = types.ModuleType(name)
        sys.modules[name] = module
        _src_by_module_name[name] = src
        _module_by_src[src] = module
        exec(src, module.__dict__)
    cls = persistent_class(module.__dict__[meta["class_name"]])
    obj = cls.__new__(cls)
    if callable(getattr(obj, "__setstate__", None)):
        obj.__setstate__(dict(meta["state"]))
    else:
        obj.__dict__.update(meta["state"])
    return obj
'''

# argv: env_dir pickle_path inputs_path output_path. Runs with `python -I` (no repo on sys.path).
EDM_LOAD_SCRIPT = '''import pickle
import sys

sys.path.insert(0, sys.argv[1])
import torch

torch.set_num_threads(1)  # As the test process (conftest), so that reductions run in the same order.

with open(sys.argv[2], "rb") as f:
    data = pickle.load(f)
inputs = torch.load(sys.argv[3], weights_only=True)
net = data["ema"]
with torch.no_grad():
    denoised = net(inputs["x"], inputs["sigma"], inputs["labels"])
report = dict(denoised=denoised, ema_module=type(net).__module__, ema_training=net.training,
              img_resolution=net.img_resolution, sigma_min=float(net.sigma_min),
              dataset_kwargs=dict(data["dataset_kwargs"]),
              project_modules=sorted(m for m in sys.modules if m.split(".")[0] in ("training", "losses", "processes")),
              loss_record=data.get("loss"), process_record=data.get("process"))
if data.get("loss_fn") is not None:
    report.update(loss_class=type(data["loss_fn"]).__name__, loss_module=type(data["loss_fn"]).__module__,
                  loss_kwargs=dict(data["loss_fn"].init_kwargs))
if data.get("augment_pipe") is not None:
    torch.manual_seed(123)
    augmented, augment_labels = data["augment_pipe"](inputs["images"])
    report.update(augmented=augmented, augment_labels=augment_labels)
torch.save(report, sys.argv[4])
'''


def make_edm_environment(root: str) -> str:
    """Create `root` with dnnlib/, torch_utils/{__init__,misc,persistence}.py: what EDM's checkout provides to
    code embedded in pickles (our dnnlib and misc stand in for EDM's, whose names they follow)."""
    os.makedirs(os.path.join(root, "torch_utils"), exist_ok=True)
    shutil.copytree(os.path.join(REPO_ROOT, "dnnlib"), os.path.join(root, "dnnlib"),
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copyfile(os.path.join(REPO_ROOT, "torch_utils", "misc.py"), os.path.join(root, "torch_utils", "misc.py"))
    with open(os.path.join(root, "torch_utils", "__init__.py"), "w") as f:
        f.write("")
    with open(os.path.join(root, "torch_utils", "persistence.py"), "w") as f:
        f.write(EDM_PERSISTENCE_SRC)
    with open(os.path.join(root, "load_like_edm.py"), "w") as f:
        f.write(EDM_LOAD_SCRIPT)
    return root


# argv: edm_repo out_dir. Runs EDM's own code (an NVlabs/edm checkout, with `python -I`) to write the pickles EDM
# would write for tiny networks, with inputs and EDM's outputs, for the opt-in EDM_REPO test.
EDM_MAKE_SCRIPT = '''import copy
import os
import pickle
import sys

sys.path.insert(0, sys.argv[1])
import torch

torch.set_num_threads(1)
import dnnlib
from training import augment, loss, networks

out_dir = sys.argv[2]
song = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
            dropout=0.13)
nets = dict(
    edm=networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, augment_dim=9, **song),
    vp=networks.VPPrecond(img_resolution=8, img_channels=3, label_dim=4, embedding_type="fourier",
                          encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], **song),
    ve=networks.VEPrecond(img_resolution=8, img_channels=3, label_dim=0, **song),
    iddpm=networks.iDDPMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_type="DhariwalUNet",
                                model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
)
generator = torch.Generator().manual_seed(1)
x = torch.randn(2, 3, 8, 8, generator=generator)
sigma = torch.tensor([0.5, 2.0])
labels = torch.eye(4)[:2]
images = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
outputs = {}
for index, (kind, net) in enumerate(nets.items()):
    generator = torch.Generator().manual_seed(index)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        outputs[kind] = net.eval()(x, sigma, labels if net.label_dim else None)
    with open(os.path.join(out_dir, f"edm-{kind}.pkl"), "wb") as f:
        pickle.dump(dict(ema=copy.deepcopy(net).eval().requires_grad_(False).cpu()), f)
pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
torch.manual_seed(123)
augmented, augment_labels = pipe(images)
snapshot = dict(ema=copy.deepcopy(nets["edm"]).eval().requires_grad_(False).cpu(), loss_fn=loss.EDMLoss(),
                augment_pipe=pipe, dataset_kwargs=dnnlib.EasyDict(path="cifar10.zip", resolution=8))
with open(os.path.join(out_dir, "edm-snapshot.pkl"), "wb") as f:
    pickle.dump(snapshot, f)
net = nets["edm"].train().requires_grad_(True)
optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
net(x, sigma).square().sum().backward()
optimizer.step()
torch.save(dict(net=net, optimizer_state=optimizer.state_dict()), os.path.join(out_dir, "edm-training-state.pt"))
torch.save(dict(x=x, sigma=sigma, labels=labels, images=images, outputs=outputs, augmented=augmented,
                augment_labels=augment_labels), os.path.join(out_dir, "edm-io.pt"))
'''
