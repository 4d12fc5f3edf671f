"""EDM network-pickle format v6: our writer, the safe importer, EDM-style loaders (issue 3)."""

import collections
import functools
import glob
import http.server
import inspect
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch

import dnnlib
import training.snapshots  # noqa: F401 -- registers the project's persistent classes with persistence
from torch_utils import persistence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edm_format_fixture as fixture  # noqa: E402
import hostile_payloads as hostile  # noqa: E402
import persistence_tiny_classes as tiny  # noqa: E402

TINY_SRC_PATH = tiny.__file__


def tiny_net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return tiny.TinyNet(4, **kwargs)


def numpy_strings(data: bytes) -> list:
    """String arguments of a pickle's opcodes that name numpy modules (what numpy scalar/array globals need)."""
    return [arg for _, arg, _ in pickletools.genops(data)
            if isinstance(arg, str) and (arg == "numpy" or arg.startswith(("numpy.", "numpy._core")))]


# ---------------------------------------------------------------------------------------------------------------------
# Writer.


def test_decorator_records_init_args_and_reduces_to_edm_v6_meta():
    net = tiny_net(hidden=6, scale=0.25)
    assert net.init_args == (4,)
    assert net.init_kwargs == dict(hidden=6, scale=0.25)
    assert isinstance(net.init_kwargs, dnnlib.EasyDict)
    net.init_kwargs["hidden"] = 99  # A copy: the recorded kwargs are untouched.
    assert net._init_kwargs == dict(hidden=6, scale=0.25)
    assert inspect.signature(tiny.TinyNet).parameters.keys() == {"in_features", "hidden", "scale", "out_gain"}

    func, args, state = net.__reduce__()[:3]
    assert func is persistence._reconstruct_persistent_obj and state is None
    meta = args[0]
    assert set(meta) == {"type", "version", "module_src", "class_name", "state"}
    assert (meta["type"], meta["version"], meta["class_name"]) == ("class", 6, "TinyNet")
    with open(TINY_SRC_PATH) as f:
        assert meta["module_src"] == f.read()
    assert meta["state"]["_init_kwargs"] == dict(hidden=6, scale=0.25)
    assert set(meta["state"]["_modules"]) == {"layers"} and set(meta["state"]["_buffers"]) == {"offset"}

    assert persistence.is_persistent(net) and persistence.is_persistent(tiny.TinyNet)
    assert not persistence.is_persistent(torch.nn.Linear(1, 1)) and not persistence.is_persistent(tiny.PlainThing)
    assert persistence.persistent_class(tiny.TinyNet) is tiny.TinyNet


def test_plain_pickle_of_ours_reuses_the_loaded_module():
    # EDM's path (plain pickle -> _reconstruct_persistent_obj) finds the identical source already imported: same
    # class objects, nothing executed.
    net = tiny_net()
    x = torch.randn(3, 4)
    loaded = pickle.loads(pickle.dumps(net))
    assert type(loaded) is tiny.TinyNet and type(loaded.layers["fc0"]) is tiny.TinyLayer
    assert torch.equal(loaded(x), net(x))
    assert loaded.init_kwargs == net.init_kwargs


@persistence.persistent_class
class SubNet(tiny.TinyNet):
    """A persistent subclass of a persistent class."""


def test_subclass_of_persistent_class_pickles_under_its_own_name():
    sub = SubNet(4, hidden=3)
    meta = sub.__reduce__()[1][0]
    assert meta["class_name"] == "SubNet" and "class SubNet(tiny.TinyNet)" in meta["module_src"]
    assert sub.init_args == (4,) and sub.init_kwargs == dict(hidden=3)
    assert type(pickle.loads(pickle.dumps(sub))) is SubNet


class PlainSubNet(tiny.TinyNet):
    """An undecorated subclass: pickles as its persistent base, as in EDM."""


def test_undecorated_subclass_pickles_as_its_persistent_base():
    meta = PlainSubNet(4).__reduce__()[1][0]
    assert meta["class_name"] == "TinyNet" and "class TinyNet(" in meta["module_src"]


def test_local_class_is_refused_at_pickling_time():
    local_class = persistence.persistent_class(type("LocalNet", (torch.nn.Module,), {}))
    with pytest.raises(pickle.PicklingError, match="must be defined at the top level"):
        pickle.dumps(local_class())


# ---------------------------------------------------------------------------------------------------------------------
# Safe importer on EDM-format pickles.


def test_edm_format_pickle_imports_without_executing_embedded_source(tmp_path):
    marker = tmp_path / "executed.txt"
    with open(TINY_SRC_PATH) as f:
        poisoned = fixture.poisoned_source(f.read(), marker)
    net = tiny_net(hidden=5).eval()
    loss = tiny.TinyLoss(P_mean=-1.0)
    data = fixture.edm_style_dumps(dict(ema=net, loss_fn=loss, augment_pipe=None,
                                        dataset_kwargs=dnnlib.EasyDict(path="x.zip", resolution=8)),
                                   module_src_for=lambda obj: poisoned)

    loaded = persistence.load_network_pickle(io.BytesIO(data), extra_classes=tiny.TINY_CLASSES)
    assert not marker.exists()
    x = torch.randn(3, 4)
    assert type(loaded["ema"]) is tiny.TinyNet
    assert torch.equal(loaded["ema"](x), net(x))
    assert loaded["ema"].init_kwargs == dict(hidden=5)
    assert not loaded["ema"].training  # The pickled mode is kept.
    assert type(loaded["loss_fn"]) is tiny.TinyLoss and loaded["loss_fn"].P_mean == -1.0
    assert loaded["augment_pipe"] is None and loaded["dataset_kwargs"] == dict(path="x.zip", resolution=8)
    assert isinstance(loaded["dataset_kwargs"], dnnlib.EasyDict)

    # Control: EDM's own path does execute that source, so the poison is live.
    with pytest.raises(RuntimeError, match="embedded module source was executed"):
        pickle.loads(data)
    assert marker.read_text() == "executed"


def test_edm_style_exec_loader_and_safe_importer_agree():
    # The same pickle read by an EDM-style loader (source executed into a fresh module) and by ours.
    with open(TINY_SRC_PATH) as f:
        src = f.read()
    net = tiny_net(seed=3)
    data = fixture.edm_style_dumps(net, module_src_for=lambda obj: src)
    executed = fixture.edm_style_loads(data)
    imported = persistence.load_network_pickle(io.BytesIO(data), extra_classes=tiny.TINY_CLASSES)
    assert type(executed).__module__.startswith("_edm_exec_")
    assert list(imported) == ["ema"]  # A bare module comes back as {'ema': module}.
    x = torch.randn(2, 4)
    assert torch.equal(imported["ema"](x), executed(x))
    assert torch.equal(imported["ema"](x), net(x))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_imports(protocol):
    # Protocols 0-1 go through copyreg._reconstructor and _codecs.encode, 2 writes Python 2 module names.
    net = tiny_net(seed=5, scale=np.float32(0.5))
    data = pickle.dumps(dict(ema=net, dataset_kwargs=dnnlib.EasyDict(a=1), extra={1, 2}), protocol=protocol)
    loaded = persistence.load_network_pickle(io.BytesIO(data), extra_classes=tiny.TINY_CLASSES)
    x = torch.randn(2, 4)
    assert torch.equal(loaded["ema"](x), net(x))
    assert isinstance(loaded["dataset_kwargs"], dnnlib.EasyDict) and loaded["dataset_kwargs"] == dict(a=1)
    assert loaded["extra"] == {1, 2}


def test_missing_init_kwargs_cannot_be_rebuilt():
    def drop_kwargs(obj, state):
        return dict(state, _init_kwargs=None)

    data = fixture.edm_style_dumps(dict(loss_fn=tiny.TinyLoss()), lambda obj: "pass", state_hook=drop_kwargs)
    with pytest.raises(persistence.NetworkPickleError, match="TinyLoss does not record its constructor arguments"):
        persistence.load_network_pickle(io.BytesIO(data), extra_classes=tiny.TINY_CLASSES)


def test_safe_loader_rejects_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(Vtouch {marker}\ntR.".encode()  # Protocol 0: os.system('touch ...').
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load the global 'os\.system'.*may be unsafe"):
        persistence.load_network_pickle(io.BytesIO(payload))

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    data = pickle.dumps(dict(ema=Evil()))
    with pytest.raises(pickle.UnpicklingError, match=rf"'{os.system.__module__}\.system'"):
        persistence.load_network_pickle(io.BytesIO(data))
    assert not marker.exists()


def test_safe_loader_rejects_unsafe_global_inside_persistent_state(tmp_path):
    def add_eval(obj, state):
        return dict(state, hook=eval) if isinstance(obj, tiny.TinyNet) else state

    with open(TINY_SRC_PATH) as f:
        src = f.read()
    data = fixture.edm_style_dumps(dict(ema=tiny_net()), lambda obj: src, state_hook=add_eval)
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(persistence.NetworkPickleError, match=rf"{path}: refusing to load the global 'builtins\.eval'"):
        persistence.load_network_pickle(str(path), extra_classes=tiny.TINY_CLASSES)


def test_unknown_class_name_is_named_with_the_known_classes():
    data = fixture.edm_style_dumps(dict(loss_fn=tiny.TinyLoss()), lambda obj: "raise RuntimeError('executed')")
    with pytest.raises(persistence.NetworkPickleError,
                       match=r"class 'TinyLoss', which has no counterpart here\. Known classes: .*EDMPrecond.*"
                             r"load through training.snapshots, or import it first"):
        persistence.load_network_pickle(io.BytesIO(data))


def test_other_format_version_is_refused():
    data = fixture.edm_style_dumps(tiny.TinyLoss(), lambda obj: "pass", version=5)
    with pytest.raises(persistence.NetworkPickleError, match="format version 5; only EDM's version 6"):
        persistence.load_network_pickle(io.BytesIO(data), extra_classes=tiny.TINY_CLASSES)


def test_tensor_name_and_shape_mismatches_are_listed():
    def corrupt(obj, state):
        if isinstance(obj, tiny.TinyNet):
            buffers = dict(state["_buffers"])
            buffers["extra"] = buffers.pop("offset")
            state = dict(state, _buffers=buffers)
        if isinstance(obj, tiny.TinyLayer) and obj.weight.shape[0] == 4:
            state = dict(state, _parameters=dict(state["_parameters"], bias=torch.zeros(7)))
        return state

    with open(TINY_SRC_PATH) as f:
        src = f.read()
    data = fixture.edm_style_dumps(dict(ema=tiny_net()), lambda obj: src, state_hook=corrupt)
    with pytest.raises(persistence.NetworkPickleError) as info:
        persistence.load_network_pickle(io.BytesIO(data), extra_classes=tiny.TINY_CLASSES)
    message = str(info.value)
    assert "missing from the pickle: offset" in message
    assert "unexpected in the pickle: extra" in message
    assert "layers.fc1.bias (7,) vs (4,)" in message


def test_zip_archive_is_pointed_to_load_edm_training_state(tmp_path):
    path = tmp_path / "training-state-000000.pt"
    torch.save(dict(a=torch.zeros(1)), path)
    with pytest.raises(persistence.NetworkPickleError, match="load_edm_training_state"):
        persistence.load_network_pickle(str(path))


# ---------------------------------------------------------------------------------------------------------------------
# save_network_pickle.


def test_save_then_load_round_trip(tmp_path):
    net = tiny_net(seed=1, hidden=7, scale=0.75)
    loss = tiny.TinyLoss(P_mean=-0.4, P_std=1.0)
    dataset_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="d.zip", max_size=10)
    path = tmp_path / "network-snapshot-000000.pkl"
    persistence.save_network_pickle(path, dict(ema=net, loss_fn=loss, augment_pipe=None,
                                               dataset_kwargs=dataset_kwargs))
    assert os.listdir(tmp_path) == [path.name]  # No temporary file left behind.
    assert net.training and all(p.requires_grad for p in net.parameters())  # The live net is untouched.

    loaded = persistence.load_network_pickle(str(path), extra_classes=tiny.TINY_CLASSES)
    assert list(loaded) == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
    ema = loaded["ema"]
    x = torch.randn(5, 4)
    assert torch.equal(ema(x), net(x))
    assert ema.init_args == net.init_args and ema.init_kwargs == net.init_kwargs
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    assert loaded["loss_fn"].init_kwargs == loss.init_kwargs and loaded["loss_fn"].P_std == 1.0
    assert loaded["dataset_kwargs"] == dataset_kwargs and loaded["augment_pipe"] is None


def test_save_writes_python_floats_not_numpy_scalars(tmp_path):
    net = tiny_net(scale=np.float64(0.5), out_gain=np.float32(0.25))
    raw = pickle.dumps(net)
    assert numpy_strings(raw)  # Control: numpy scalars do reach a plain pickle.

    path = tmp_path / "snapshot.pkl"
    persistence.save_network_pickle(path, dict(ema=net, dataset_kwargs=dnnlib.EasyDict(max_size=np.int64(3))))
    data = path.read_bytes()
    assert numpy_strings(data) == []
    loaded = pickle.loads(data)
    assert type(loaded["ema"].scale) is float and type(loaded["ema"].layers["fc1"].gain) is float
    assert type(loaded["ema"].init_kwargs["out_gain"]) is float and loaded["ema"].init_kwargs["out_gain"] == 0.25
    assert type(loaded["dataset_kwargs"]["max_size"]) is int


def test_save_refuses_what_the_safe_loader_cannot_read(tmp_path):
    path = tmp_path / "snapshot.pkl"
    with pytest.raises(ValueError, match="'ema': Linear is not a persistent class"):
        persistence.save_network_pickle(path, dict(ema=torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"persistence_tiny_classes\.PlainThing, which load_network_pickle refuses"):
        persistence.save_network_pickle(path, dict(ema=tiny_net(), extra=tiny.PlainThing()))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# EDM training states and URLs.


def test_load_edm_training_state(tmp_path):
    net = tiny_net(seed=2, scale=np.float64(0.5))  # torch.save's protocol 2 writes numpy scalars via _codecs.encode.
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    path = tmp_path / "training-state-000001.pt"
    torch.save(dict(net=net, optimizer_state=optimizer.state_dict()), path)  # What EDM's training loop writes.

    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    state = persistence.load_edm_training_state(path, extra_classes=tiny.TINY_CLASSES)
    loaded = state["net"]
    assert type(loaded) is tiny.TinyNet and loaded.training
    assert loaded.init_kwargs == dict(scale=0.5) and type(loaded.init_kwargs["scale"]) is np.float64
    assert all(p.requires_grad for p in loaded.parameters())
    for (name, a), (_, b) in zip(loaded.state_dict().items(), net.state_dict().items()):
        assert torch.equal(a, b), name
    for index, entry in optimizer.state_dict()["state"].items():
        assert torch.equal(state["optimizer_state"]["state"][index]["exp_avg_sq"], entry["exp_avg_sq"])
    resumed = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    resumed.load_state_dict(state["optimizer_state"])  # Resumable.


def test_load_from_file_and_http_urls_with_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    net = tiny_net(seed=4)
    serve_dir = tmp_path / "serve"
    serve_dir.mkdir()
    persistence.save_network_pickle(serve_dir / "net.pkl", dict(ema=net))
    x = torch.randn(2, 4)

    loaded = persistence.load_network_pickle(f"file://{serve_dir / 'net.pkl'}", extra_classes=tiny.TINY_CLASSES)
    assert torch.equal(loaded["ema"](x), net(x))

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/net.pkl"
    try:
        loaded = persistence.load_network_pickle(url, extra_classes=tiny.TINY_CLASSES)
    finally:
        server.shutdown()
        server.server_close()
    assert torch.equal(loaded["ema"](x), net(x))
    assert glob.glob(os.path.join(os.environ["DNNLIB_CACHE_DIR"], "downloads", "*net.pkl"))
    loaded = persistence.load_network_pickle(url, extra_classes=tiny.TINY_CLASSES)  # Server gone: from the cache.
    assert torch.equal(loaded["ema"](x), net(x))


# ---------------------------------------------------------------------------------------------------------------------
# The real classes (tiny configurations).

SONG_KWARGS = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                   dropout=0.13)


def real_classes():
    return pytest.importorskip("training.preconditioning"), pytest.importorskip("training.networks")


def make_denoiser(kind: str):
    preconditioning, _ = real_classes()
    torch.manual_seed(0)
    if kind == "edm-ddpmpp":
        net = preconditioning.EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, augment_dim=9, **SONG_KWARGS)
    elif kind == "vp-ncsnpp-cond":
        net = preconditioning.VPPrecond(img_resolution=8, img_channels=3, label_dim=4,
                                        **dict(SONG_KWARGS, embedding_type="fourier", encoder_type="residual",
                                               channel_mult_noise=2, resample_filter=[1, 3, 3, 1]))
    elif kind == "iddpm-adm":
        net = preconditioning.iDDPMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type="DhariwalUNet",
                                           model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    else:
        raise ValueError(kind)
    return fixture.randomize_(net).eval()


def denoiser_inputs(net, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.eye(net.label_dim)[:2] if net.label_dim else None
    return x, sigma, labels


@pytest.mark.parametrize("kind", ["edm-ddpmpp", "vp-ncsnpp-cond", "iddpm-adm"])
def test_edm_format_pickle_of_real_networks_imports_identically(tmp_path, kind):
    net = make_denoiser(kind)
    marker = tmp_path / "executed.txt"

    def poisoned_module_source(obj):
        return fixture.poisoned_source(inspect.getsource(sys.modules[type(obj).__module__]), marker)

    data = fixture.edm_style_dumps(dict(ema=net), poisoned_module_source)
    loaded = persistence.load_network_pickle(io.BytesIO(data))["ema"]
    assert not marker.exists()
    assert type(loaded) is type(net) and loaded.init_kwargs == net.init_kwargs
    x, sigma, labels = denoiser_inputs(net)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
    assert loaded.state_dict().keys() == net.state_dict().keys()


def make_snapshot_parts():
    preconditioning, _ = real_classes()
    augment = pytest.importorskip("training.augment")
    losses = pytest.importorskip("losses")
    processes = pytest.importorskip("processes")
    ema = make_denoiser("edm-ddpmpp")
    augment_pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    loss_kwargs = dict(class_name="losses.denoising.EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    dataset_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip",
                                     use_labels=False, xflip=False, cache=True, resolution=8, max_size=100)
    # What training.snapshots.save_snapshot writes: the loss and the process as records, not objects.
    return dict(ema=ema, process=processes.process_record(processes.EDMProcess()),
                loss=losses.loss_record(loss_kwargs), augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs)


def test_our_snapshot_loads_in_an_edm_environment(tmp_path):
    parts = make_snapshot_parts()
    path = tmp_path / "network-snapshot-000000.pkl"
    persistence.save_network_pickle(path, parts)
    assert numpy_strings(path.read_bytes()) == []

    ema = parts["ema"]
    x, sigma, labels = denoiser_inputs(ema)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    torch.save(dict(x=x, sigma=sigma, labels=labels, images=images), tmp_path / "inputs.pt")
    env = fixture.make_edm_environment(str(tmp_path / "edm_env"))
    result = subprocess.run([sys.executable, "-I", os.path.join(env, "load_like_edm.py"), env, str(path),
                             str(tmp_path / "inputs.pt"), str(tmp_path / "report.pt")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = torch.load(tmp_path / "report.pt", weights_only=True)

    # The embedded source ran (classes come from exec'd modules) and needed nothing but EDM's packages.
    assert report["ema_module"].startswith("_imported_module_") and report["project_modules"] == []
    assert report["loss_record"] == {"name": "edm", "options": dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)}
    assert report["process_record"] == {"name": "edm", "options": {}}
    with torch.no_grad():
        assert torch.equal(report["denoised"], ema(x, sigma, labels))
    assert report["ema_training"] is False and report["img_resolution"] == 8
    assert report["dataset_kwargs"] == parts["dataset_kwargs"]
    torch.manual_seed(123)
    augmented, augment_labels = parts["augment_pipe"](images)
    assert torch.equal(report["augmented"], augmented) and torch.equal(report["augment_labels"], augment_labels)


def test_real_snapshot_round_trip(tmp_path):
    parts = make_snapshot_parts()
    path = tmp_path / "network-snapshot-000000.pkl"
    persistence.save_network_pickle(path, parts)
    loaded = persistence.load_network_pickle(str(path))
    for key in ("ema", "augment_pipe"):
        assert type(loaded[key]) is type(parts[key])
        assert loaded[key].init_kwargs == parts[key].init_kwargs
    assert loaded["loss"] == parts["loss"] and loaded["process"] == parts["process"]
    ema = loaded["ema"]
    x, sigma, labels = denoiser_inputs(ema)
    with torch.no_grad():
        assert torch.equal(ema(x, sigma, labels), parts["ema"](x, sigma, labels))
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    assert loaded["dataset_kwargs"] == parts["dataset_kwargs"]


def test_edm_training_state_of_real_network(tmp_path):
    net = make_denoiser("edm-ddpmpp").train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    path = tmp_path / "training-state-000000.pt"
    torch.save(dict(net=net, optimizer_state=optimizer.state_dict()), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    loaded = persistence.load_edm_training_state(path)["net"]
    assert type(loaded) is type(net) and loaded.training
    x, sigma, labels = denoiser_inputs(net)
    net.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


# ---------------------------------------------------------------------------------------------------------------------
# Opt-in: against EDM's own code. EDM_REPO=<an NVlabs/edm checkout> (its code is CC BY-NC-SA and is never part of
# this repository); runs EDM in a subprocess to write its pickles, imports them, and lets EDM load ours.


@pytest.mark.skipif(not os.environ.get("EDM_REPO"), reason="set EDM_REPO to an NVlabs/edm checkout")
def test_against_edm_checkout(tmp_path):
    edm_repo = os.environ["EDM_REPO"]
    script = tmp_path / "make_edm_pickles.py"
    script.write_text(fixture.EDM_MAKE_SCRIPT)
    result = subprocess.run([sys.executable, "-I", "-W", "ignore", str(script), edm_repo, str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    io_data = torch.load(tmp_path / "edm-io.pt", weights_only=True)
    x, sigma, labels = io_data["x"], io_data["sigma"], io_data["labels"]

    # EDM's pickles -> our classes. Tolerance: fp32 rounding of a different (not bit-identical) implementation.
    for kind, expected in io_data["outputs"].items():
        net = persistence.load_network_pickle(tmp_path / f"edm-{kind}.pkl")["ema"]
        with torch.no_grad():
            torch.testing.assert_close(net(x, sigma, labels if net.label_dim else None), expected,
                                       rtol=1e-5, atol=1e-5, msg=kind)
    snapshot = persistence.load_network_pickle(tmp_path / "edm-snapshot.pkl")
    assert snapshot["loss_fn"].init_kwargs == {} and snapshot["augment_pipe"].init_kwargs["xflip"] == 1e8
    torch.manual_seed(123)
    augmented, augment_labels = snapshot["augment_pipe"](io_data["images"])
    assert torch.equal(augment_labels, io_data["augment_labels"])
    torch.testing.assert_close(augmented, io_data["augmented"], rtol=1e-5, atol=1e-5)
    state = persistence.load_edm_training_state(tmp_path / "edm-training-state.pt")
    assert state["net"].training and set(state["optimizer_state"]) == {"state", "param_groups"}

    # Ours -> EDM's plain pickle.load with EDM's persistence (embedded source executed there). Our snapshots
    # record the loss as data (training.snapshots), so the imported EDMLoss object is not written back.
    ours = tmp_path / "ours.pkl"
    persistence.save_network_pickle(ours, {k: v for k, v in snapshot.items() if k != "loss_fn"})
    torch.save(dict(x=x, sigma=sigma, labels=None, images=io_data["images"]), tmp_path / "inputs.pt")
    load_script = tmp_path / "load_like_edm.py"
    load_script.write_text(fixture.EDM_LOAD_SCRIPT)
    result = subprocess.run([sys.executable, "-I", "-W", "ignore", str(load_script), edm_repo, str(ours),
                             str(tmp_path / "inputs.pt"), str(tmp_path / "report.pt")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = torch.load(tmp_path / "report.pt", weights_only=True)
    assert report["ema_module"].startswith("_imported_module_")
    with torch.no_grad():
        assert torch.equal(report["denoised"], snapshot["ema"](x, sigma))
    assert torch.equal(report["augment_labels"], augment_labels) and torch.equal(report["augmented"], augmented)


def test_fork_loss_with_extra_constructor_argument_is_rebuilt_with_a_warning():
    """AOT's released pickles carry EDMLoss(batch=...): the loss is rebuilt without it, networks stay strict."""
    from losses import denoising
    pickled = persistence.PickledObject("EDMLoss", {"_init_args": (), "_init_kwargs": {"P_mean": -1.0, "batch": 64}})
    with pytest.warns(UserWarning, match=r"ignoring constructor arguments \['batch'\] of EDMLoss"):
        data = persistence.import_pickled_objects({"loss_fn": pickled})
    loss = data["loss_fn"]
    assert isinstance(loss, denoising.EDMLoss)
    assert loss.P_mean == -1.0 and loss.P_std == 1.2
    strict = persistence.PickledObject("EDMPrecond", {"_init_args": (), "_init_kwargs": dict(
        img_resolution=8, img_channels=1, model_type="SongUNet", not_an_option=1)})
    with pytest.raises(persistence.NetworkPickleError, match="not_an_option"):
        persistence.import_pickled_objects({"ema": strict})


def test_pickled_loss_whose_options_ours_now_refuses_does_not_make_the_network_unreadable(tmp_path):
    """Snapshots written before 2026-11-30 pickle their loss, which is only carried along. One whose options the
    constructor checks of 2026-12-04 refuse (VE sigma_min > sigma_max and EDM P_std < 0 train finitely; VP
    epsilon_t=0 was accepted) made generate.py and fid.py refuse the whole file: it stays its record, with a warning,
    and the network imports. Networks stay strict."""
    from losses import denoising

    def as_written_then(cls, **options):  # the object an earlier version built, without today's checks
        loss = cls.__new__(cls)
        loss.__dict__.update(options, _init_args=(), _init_kwargs=options)
        return loss

    net = tiny_net()
    x = torch.randn(3, 4)
    for loss in (as_written_then(denoising.VELoss, sigma_min=0.5, sigma_max=0.1),
                 as_written_then(denoising.EDMLoss, P_mean=-1.2, P_std=-1.2, sigma_data=0.5),
                 as_written_then(denoising.VPLoss, beta_d=19.9, beta_min=0.1, epsilon_t=0)):
        path = tmp_path / f"{type(loss).__name__}.pkl"
        persistence.save_network_pickle(path, dict(ema=net, loss_fn=loss, augment_pipe=None))
        name = type(loss).__name__
        with pytest.warns(UserWarning, match=f"keeping the pickled {name} as a record, unbuilt: our {name} refuses "
                                             f"its options"):
            data = persistence.load_network_pickle(str(path), extra_classes=tiny.TINY_CLASSES)
        assert isinstance(data["loss_fn"], persistence.PickledObject) and data["loss_fn"].class_name == name
        assert torch.equal(data["ema"](x), net(x))
    wrapped = persistence.PickledObject("STFLoss", {"_init_args": (), "_init_kwargs": dict(base_kwargs=dict(
        class_name="losses.denoising.VELoss", sigma_min=0.5, sigma_max=0.1))})
    with pytest.warns(UserWarning, match="keeping the pickled STFLoss as a record"):
        assert persistence.import_pickled_objects({"loss_fn": wrapped})["loss_fn"] is wrapped


# ---------------------------------------------------------------------------------------------------------------------
# Hostile files (issue 16): nested archives whose loaders run code.


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_the_torchscript_payload_really_runs_when_loaded_unsafely(tmp_path):
    # Proof that the payload is live, so that the refusals below mean something.
    marker = tmp_path / "executed-by-jit-load"
    archive = hostile.torchscript_archive(marker)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="TorchScript"):
        torch.load(io.BytesIO(archive), weights_only=False)
    assert marker.read_bytes() == b"X" * 8


def test_network_pickle_with_a_torchscript_storage_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(hostile.network_pickle_with_storage(hostile.torchscript_archive(marker)))
    with pytest.raises(persistence.NetworkPickleError) as err:
        persistence.load_network_pickle(str(path))
    assert _one_line(err).startswith(f"{path}: ") and "TorchScript" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["zip", "tar", "junk"])
def test_storage_bytes_in_any_other_format_are_refused(kind):
    data = {"zip": lambda: (lambda b: (torch.save(torch.zeros(2).untyped_storage(), b), b.getvalue())[1])(io.BytesIO()),
            "tar": hostile.tar_archive, "junk": lambda: b"\x80\x04K\x01." + os.urandom(64)}[kind]()
    with pytest.raises(persistence.NetworkPickleError, match="tensor storage|not a torch file") as err:
        persistence.load_network_pickle(io.BytesIO(hostile.network_pickle_with_storage(data)))
    _one_line(err)


def test_real_storages_still_load_through_the_checked_path():
    # Every plain-pickled tensor goes through _load_from_bytes; the check must not refuse the legacy stream.
    tensors = dict(a=torch.arange(6, dtype=torch.float32).reshape(2, 3), b=torch.tensor([1, 2], dtype=torch.int64),
                   c=torch.nn.Parameter(torch.ones(3, dtype=torch.float16)))
    for protocol in (2, 4, 5):
        loaded = persistence.load_network_pickle(io.BytesIO(pickle.dumps(tensors, protocol=protocol)))
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor.detach()), name


def test_training_states_carrying_the_payload_are_refused(tmp_path):
    from training import training_loop

    marker = tmp_path / "pwned"
    archive = hostile.torchscript_archive(marker)
    nested = tmp_path / "training-state-000001.pt"
    nested.write_bytes(hostile.training_state_with_storage(archive))
    whole = tmp_path / "training-state-000002.pt"
    whole.write_bytes(archive)  # The training state file is itself a TorchScript archive.
    for path in (nested, whole):
        with pytest.raises(persistence.NetworkPickleError) as err:
            persistence.load_edm_training_state(path)
        assert _one_line(err).startswith(f"{path}: ")
    assert training_loop.load_training_state(str(nested)) is None  # Not ours; the EDM path then refuses it.
    with pytest.raises(persistence.UnsafeTorchFileError, match="TorchScript"):
        training_loop.load_training_state(str(whole))
    with pytest.raises(persistence.UnsafeTorchFileError, match="TorchScript"):
        persistence.safe_torch_load(whole)
    assert not marker.exists()


def test_torch_files_are_checked_as_torch_reads_them(tmp_path):
    # A second central directory shows Python's zipfile a plain torch.save file ('archive/data.pkl' only) while
    # torch's reader sees the TorchScript archive (found by an audit: a check made with zipfile alone passed it).
    from training import training_loop

    marker = tmp_path / "pwned"
    payload = hostile.two_directory_archive(marker)
    assert zipfile.ZipFile(io.BytesIO(payload)).namelist() == ["archive/data.pkl"]
    path = tmp_path / "training-state-000001.pt"
    path.write_bytes(payload)
    with pytest.raises(persistence.UnsafeTorchFileError, match="TorchScript"):
        persistence.check_torch_file(io.BytesIO(payload))
    with pytest.raises(persistence.UnsafeTorchFileError, match="TorchScript"):
        training_loop.load_training_state(str(path))
    with pytest.raises(persistence.UnsafeTorchFileError, match="TorchScript"):
        persistence.safe_torch_load(path)
    with pytest.raises(persistence.NetworkPickleError, match="TorchScript"):
        persistence.load_edm_training_state(path)
    assert not marker.exists()

    # Compressed records: torch.save never writes them, and torch's reader would inflate each whole (a bomb).
    plain = io.BytesIO()
    torch.save({"x": torch.zeros(1000)}, plain)
    source, packed = zipfile.ZipFile(io.BytesIO(plain.getvalue())), io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    assert torch.equal(torch.load(io.BytesIO(packed.getvalue()), weights_only=True)["x"], torch.zeros(1000))
    with pytest.raises(persistence.UnsafeTorchFileError, match="refusing compressed records"):
        persistence.safe_torch_load(io.BytesIO(packed.getvalue()))
    # Bytes prepended to the zip (zipfile would shift every offset to find the records, torch would not): refused.
    with pytest.raises(pickle.UnpicklingError, match="not a torch file"):
        persistence.safe_torch_load(io.BytesIO(b"\0" * 64 + plain.getvalue()))
    assert persistence.check_torch_file(io.BytesIO(plain.getvalue())) == "zip"
    assert torch.equal(persistence.safe_torch_load(io.BytesIO(plain.getvalue()))["x"], torch.zeros(1000))


def _tiny_edm_precond(**kwargs):
    from training import preconditioning
    return preconditioning.EDMPrecond(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=16,
                                      channel_mult=[1], num_blocks=1, attn_resolutions=[], **kwargs)


def test_constructor_arguments_far_larger_than_the_tensors_are_refused_unbuilt():
    # The sizes a network is built with come from the file: a 50 KB pickle declaring label_dim=8e7 described a
    # 5 GB network that was allocated before its tensors were compared (an audit's repro: 1.5 GB at 8e6).
    net = _tiny_edm_precond()
    assert persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": net}, protocol=4)))["ema"].label_dim == 0
    stored = sum(t.numel() for t in [*net.parameters(), *net.buffers()])
    net._init_kwargs["label_dim"] = 80_000_000
    data = pickle.dumps({"ema": net}, protocol=4)
    assert len(data) < 1 << 20
    limit = persistence._CONSTRUCTION_FACTOR * stored + persistence._CONSTRUCTION_SLACK
    with pytest.raises(persistence.NetworkPickleError, match=rf"<file object>: the pickled constructor arguments of "
                                                             rf"EDMPrecond ask for tensors of more than {limit:,} "
                                                             rf"elements, but the pickle holds {stored:,}: refusing"):
        persistence.load_network_pickle(io.BytesIO(data))


def test_constructor_size_is_checked_before_a_loop_it_drives():
    # iDDPM's constructor builds its sigma table in a Python loop of M steps after allocating M + 1 floats: M=1e9
    # from a file is refused at the allocation, not hours later.
    import time

    from training import preconditioning
    net = preconditioning.iDDPMPrecond(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=16,
                                       channel_mult=[1], num_blocks=1, attn_resolutions=[])
    net._init_kwargs["M"] = 1_000_000_000
    start = time.perf_counter()
    with pytest.raises(persistence.NetworkPickleError, match="iDDPMPrecond ask for tensors of more than"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": net}, protocol=4)))
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("call", [
    "torch.empty(3, 4)", "torch.zeros((3, 4))", "torch.ones(size=(2, 5))", "torch.randn(torch.Size([2, 3]))",
    "torch.rand(5)", "torch.empty(size=[4])", "torch.full((2, 3), 1.0)", "torch.randint(0, 5, (3, 2))",
    "torch.randint(5, (7,))", "torch.eye(3, 5)", "torch.eye(4)", "torch.arange(10)", "torch.arange(0, 10, 3)",
    "torch.arange(start=0, end=5)", "torch.arange(1.0, 2.0, 0.3)", "torch.linspace(0, 1, 7)",
    "torch.empty_strided((2, 3), (3, 1))", "torch.randperm(9)", "torch.zeros_like(t)", "t.new_zeros(3, 4)",
    "t.new_empty((5, 6))", "t.new_full((2, 2), 1.0)", "t.new_ones(7)"])
def test_allocation_budget_reads_factory_sizes_as_torch_does(call):
    names = {"torch": torch, "t": torch.ones(2, 7)}
    expected = eval(call, names).numel()  # torch's own reading of the arguments
    with persistence._AllocationBudget(10 ** 6, "Probe", 0, "<test>") as budget:
        eval(call, names)
    assert budget.requested == expected


def test_allocation_budget_refuses_before_the_call_that_would_pass_it():
    with pytest.raises(persistence.NetworkPickleError, match=r"<src>: the pickled constructor arguments of Probe ask "
                                                             r"for tensors of more than 100 elements, but the pickle "
                                                             r"holds 7: refusing to build it"):
        with persistence._AllocationBudget(100, "Probe", 7, "<src>"):
            torch.zeros(60)
            torch.zeros(41)  # 101 > 100
    with persistence._AllocationBudget(100, "Probe", 7, "<src>") as budget:
        torch.zeros(60)
        torch.zeros(40)
    assert budget.requested == 100


def test_loading_a_network_does_not_import_torch_dynamo():
    # A meta-device build (an earlier size check) imported torch._dynamo: 1.4 s on every load, and 2-rank
    # generate.py runs then aborted at exit now and then.
    code = ("import io, pickle, sys; import training.snapshots; from torch_utils import persistence; "
            "from training import preconditioning as p; "
            "net = p.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=16, "
            "channel_mult=[1], num_blocks=1, attn_resolutions=[]); "
            "persistence.load_network_pickle(io.BytesIO(pickle.dumps({'ema': net}, protocol=4))); "
            "print('torch._dynamo' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_tensor_with_pickled_backward_hooks_is_refused():
    class HookedTensor:
        def __reduce__(self):
            hooks = collections.OrderedDict(evil=str)  # Whitelisted itself; only its use as a hook is refused.
            return torch._utils._rebuild_tensor_v2, (torch.zeros(2)._typed_storage(), 0, (2,), (1,), False, hooks)

    with pytest.raises(persistence.NetworkPickleError, match="backward hooks"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": HookedTensor()}, protocol=2)))


def test_object_arrays_from_raw_bytes_are_refused():
    class ObjectArray:
        def __reduce__(self):
            return persistence._numpy_frombuffer(), (b"\0" * 8, np.dtype("O"), (1,), "C")

    with pytest.raises(persistence.NetworkPickleError, match="Python objects"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": ObjectArray()}, protocol=5)))


def _persistent_object(class_name, init_kwargs):
    """A persistent object as EDM pickles it (meta for _reconstruct_persistent_obj), with no source to run."""
    class Persistent:
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src="", class_name=class_name,
                        state=dict(_init_args=(), _init_kwargs=init_kwargs))
            return persistence._reconstruct_persistent_obj, (meta,)
    return Persistent()


def test_constructor_arguments_cannot_name_code_to_run(tmp_path):
    """A wrapper loss builds its base from base_kwargs['class_name'] (dnnlib's construct_class_by_name): a pickled
    STFLoss naming os.system ran a command while a snapshot loaded. Names must be registered persistent classes."""
    marker = tmp_path / "ran"
    evil = _persistent_object("STFLoss", dict(base_kwargs=dict(class_name="os.system", command=f"touch {marker}")))
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": torch.nn.Identity(), "loss_fn": evil}, protocol=4))
    with pytest.raises(persistence.NetworkPickleError, match=r"name 'os.system' to import and call, which is not a "
                                                             r"registered persistent class"):
        persistence.load_network_pickle(str(path))
    assert not marker.exists()
    nested = _persistent_object("AOTLoss", dict(base_kwargs=dict(class_name="losses.stf.STFLoss", base_kwargs=dict(
        class_name="builtins.exec", source="x"))))
    with pytest.raises(persistence.NetworkPickleError, match="'builtins.exec'"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": torch.nn.Identity(), "loss": nested})))
    # The name hidden from a dict-only check: as pairs (dict() of them inside the constructor), or in an object array.
    pairs = [("class_name", "os.system"), ("command", f"touch {marker}")]
    for hidden in (pairs, np.array(pairs, dtype=object)):
        evil = _persistent_object("STFLoss", dict(base_kwargs=hidden))
        with pytest.raises(persistence.NetworkPickleError, match="must be a mapping|hold a ndarray"):
            persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": torch.nn.Identity(), "loss": evil})))
        assert not marker.exists()
    fine = _persistent_object("AOTLoss", dict(base_kwargs=dict(class_name="losses.denoising.EDMLoss")))
    loaded = persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": torch.nn.Identity(), "loss": fine})))
    assert type(loaded["loss"].base).__name__ == "EDMLoss"  # our own snapshots' pickled losses still load


def test_whitelisted_classes_cannot_be_given_class_attributes():
    """Pickle's BUILD with slot state sets attributes on whatever it is handed, a class too: a file naming EasyDict
    gave every EasyDict in the process a `module_src`, which EDM's trusted-pickle path then executed. No whitelisted
    class accepts it."""
    table = persistence._build_safe_globals()
    classes = {key: value for key, value in table.items() if isinstance(value, type)}
    assert ("dnnlib", "EasyDict") in classes
    for (module, name), cls in classes.items():
        payload = (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"N}X\x0a\x00\x00\x00module_srcX\x04\x00\x00"
                   b"\x00evils\x86b.")  # GLOBAL cls; NONE; {'module_src': 'evil'}; TUPLE2; BUILD; STOP
        with pytest.raises((TypeError, AttributeError, pickle.UnpicklingError)):
            persistence.safe_pickle.loads(payload)
        assert "module_src" not in vars(cls), (module, name)
    assert not hasattr(dnnlib.EasyDict, "module_src") and dnnlib.EasyDict(a=1).a == 1


def test_forged_structured_dtypes_are_refused():
    """A pickle can give a structured dtype an object field that numpy does not flag (dtype.__setstate__), so that
    raw bytes become object pointers: structured numpy values are refused after a safe load."""
    class Forged:
        def __reduce__(self):  # dtype('V8') whose BUILD state declares field 'a' of dtype object, flags 0
            return np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)

    class ForgedArray:
        def __reduce__(self):
            return (persistence._numpy_multiarray()._reconstruct, (np.ndarray, (0,), b"b"),
                    (1, (1,), Forged(), False, b"AAAAAAAA"))

    for payload in (Forged(), ForgedArray()):
        with pytest.raises(persistence.NetworkPickleError, match="dtype state that differs|structured (numpy )?dtype"):
            persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": payload}, protocol=4)))

    class ForgedFlags:  # dtype('O') with its flags zeroed: object-ness hidden from hasobject
        def __reduce__(self):
            return np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0)

    with pytest.raises(persistence.NetworkPickleError, match="numpy dtype state that differs from dtype\\('O'\\)"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": ForgedFlags()}, protocol=4)))
    # The same through EDM2's reference-statistics reader, whose whitelist holds dtype and _reconstruct too.
    from metrics import frechet
    with pytest.raises(pickle.UnpicklingError, match="numpy dtype state that differs|structured numpy dtype"):
        frechet._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({"fid": {"mu": ForgedArray()}}, protocol=4))).load()
    plain = persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": torch.nn.Identity(), "x": np.arange(3),
                                                                     "s": np.float64(2.5)}, protocol=4)))
    assert plain["s"] == 2.5 and plain["x"].tolist() == [0, 1, 2]


def test_pickled_hooks_and_shadowing_attributes_are_refused():
    """Tensor attribute state that sets private attributes (hooks) or shadows tensor methods, and plain torch
    modules carrying hooks or replacing `forward`, are refused: they would make later code call what the file
    chose."""
    class ParameterWithState:
        def __init__(self, state):
            self.state = state

        def __reduce__(self):
            return torch._utils._rebuild_parameter_with_state, (torch.zeros(2), True, collections.OrderedDict(),
                                                                 self.state)

    for state in ({"_backward_hooks": {0: collections.OrderedDict}}, {"backward": collections.OrderedDict}):
        with pytest.raises(persistence.NetworkPickleError, match="pickled state sets"):
            persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": ParameterWithState(state)})))
    class TensorBuiltWithHooks:  # BUILD on a rebuilt tensor: Tensor.__setstate__((requires_grad, None, hooks))
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (torch.zeros(2)._typed_storage(), 0, (2,), (1,), False,
                                                      collections.OrderedDict()),
                    (False, None, collections.OrderedDict({0: torch.Size})))

    with pytest.raises(persistence.NetworkPickleError, match="tensor state with backward hooks"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": TensorBuiltWithHooks()})))
    hooked = torch.nn.Linear(2, 2)
    hooked.register_forward_hook(collections.OrderedDict)  # a whitelisted callable
    with pytest.raises(persistence.NetworkPickleError, match="_forward_hooks"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": hooked})))
    shadowing = torch.nn.Linear(2, 2)
    shadowing.__dict__["forward"] = collections.OrderedDict
    with pytest.raises(persistence.NetworkPickleError, match="replaces its 'forward'"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": shadowing})))
    plain = persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": torch.nn.Linear(2, 2)})))
    assert isinstance(plain["ema"], torch.nn.Linear)


def test_loading_a_network_leaves_the_random_stream_alone(tmp_path):
    """The safe importer builds our class (drawing initial weights) before copying the pickle's in; EDM's pickle.load
    draws nothing, and an EDM resume or --transfer draws its first sigma and noise right after loading."""
    from training.preconditioning import EDMPrecond
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])
    path = tmp_path / "net.pkl"
    persistence.save_network_pickle(str(path), dict(ema=net))
    torch.manual_seed(5)
    persistence.load_network_pickle(str(path))
    after_load = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after_load, torch.rand(4))


def test_only_listed_torch_nn_classes_are_accepted():
    assert persistence._resolve_safe_global("torch.nn.modules.container", "ModuleDict") is torch.nn.ModuleDict
    assert persistence._resolve_safe_global("torch.nn.modules.linear", "Linear") is torch.nn.Linear
    assert persistence._resolve_safe_global("torch.nn.modules.rnn", "LSTM") is None
    assert persistence._resolve_safe_global("torch.nn.modules.module", "register_module_forward_hook") is None
    assert persistence._resolve_safe_global("torch.nn.modules.linear", "Conv2d") is None  # Wrong module.


# ---------------------------------------------------------------------------------------------------------------------
# What the whitelisted globals may be called with (an audit's repros: a 62-byte file crashed every loader, and with a
# known address ran a command; 55-66 byte files allocated gigabytes).

class _Call:
    """Pickles as a call of `func` with `args` (REDUCE; NEWOBJ when func is copyreg.__newobj__)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _newobj(cls, *args) -> bytes:
    """A protocol-3 pickle of cls.__new__(cls, *args) (NEWOBJ), which pickle itself writes only for an instance of
    cls."""
    body = pickle.dumps(args, protocol=3)[2:-1]  # the opcodes that push the tuple
    return b"\x80\x03c" + f"{cls.__module__}\n{cls.__qualname__}\n".encode() + body + b"\x81."


def _numpy_only_readers():
    from metrics import frechet
    from training import dataset_tool_lib
    return [frechet._NumpyOnlyUnpickler, dataset_tool_lib._NumpyOnlyUnpickler]


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_numpy_ndarray_is_never_called_by_a_pickle(protocol):
    """numpy.ndarray(shape, object, buffer) reads the file's bytes as object pointers (a crash, or a call of the file's
    choosing given an address; here null pointers, which numpy shows as None); a negative offset reads before the
    buffer. Every reader refuses the class called, by REDUCE or NEWOBJ."""
    calls = [pickle.dumps({"x": _Call(np.ndarray, (1,), np.dtype("O"), b"\0" * 8)}, protocol=protocol),
             pickle.dumps({"x": _Call(np.ndarray, (4,), np.dtype("u1"), b"abcdefgh", 4)}, protocol=protocol),
             _newobj(np.ndarray, (1,), np.dtype("O"), b"\0" * 8)]
    for data in calls:
        with pytest.raises(persistence.NetworkPickleError, match=r"refusing numpy.ndarray\(...\) called by the pickle"):
            persistence.load_network_pickle(io.BytesIO(data))
        for reader in _numpy_only_readers() if protocol > 2 else []:  # EDM2's references are protocol >= 3
            with pytest.raises(pickle.UnpicklingError, match=r"refusing numpy.ndarray\(...\) called by the pickle"):
                reader(io.BytesIO(data)).load()
    # numpy's own arrays (its _reconstruct of an empty ndarray, then BUILD) still load everywhere, object arrays too.
    arrays = {"f": np.arange(6.0).reshape(2, 3), "o": np.array([1, "a"], dtype=object), "s": np.float32(1.5)}
    loaded = persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": torch.nn.Identity(), **arrays},
                                                                     protocol=protocol)))
    assert loaded["f"].tolist() == arrays["f"].tolist() and loaded["o"].tolist() == [1, "a"] and loaded["s"] == 1.5
    for reader in _numpy_only_readers() if protocol > 2 else []:
        plain = reader(io.BytesIO(pickle.dumps({"f": arrays["f"]}, protocol=protocol))).load()
        assert plain["f"].tolist() == arrays["f"].tolist()


def test_numpy_reconstruct_only_as_numpy_calls_it():
    reconstruct = persistence._numpy_multiarray()._reconstruct
    for args in ((np.ndarray, (1000,), b"O"), (np.ndarray, (3,), b"f8"), (np.ndarray, (0,), b"O")):
        with pytest.raises(persistence.NetworkPickleError, match="numpy's pickles call it as _reconstruct"):
            persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": _Call(reconstruct, *args)}, protocol=4)))


@pytest.mark.parametrize("payload, refused", [
    ((bytearray, 1000), r"builtins.bytearray\(int\)"), ((bytes, 1000), r"builtins.bytes\(int\)"),
    ((list, range(1000)), r"builtins.list\(range\)"), ((tuple, range(9)), r"builtins.tuple\(range\)"),
    ((frozenset, range(9)), r"builtins.frozenset\(range\)"), ((torch.Size, range(3)), r"torch.Size\(range\)"),
    (("newobj", bytes, 1000), r"builtins.bytes\(int\)"), (("newobj", tuple, range(9)), r"builtins.tuple\(range\)"),
    ((torch.nn.Linear, 40, 40), "refusing to call the constructor of torch.nn.modules.linear.Linear"),
    ((torch.Tensor, 1000), "refusing to call torch.Tensor from the pickle"),
    (("newobj", torch.Tensor, 1000), "refusing to call torch.Tensor from the pickle"),
])
def test_whitelisted_types_are_not_called_with_sizes(payload, refused):
    """bytearray(4e9) from 55 bytes, list(range(6.25e7)), Linear(40000, 40000) from 66 bytes (6.8 GB): a whitelisted
    type's pickles pass literal values, a layer is created without its constructor, tensors come from torch's
    rebuild functions. Small sizes here: refused for what they are, not for their size."""
    data = (_newobj(*payload[1:]) if payload[0] == "newobj" else
            pickle.dumps({"ema": torch.nn.Identity(), "x": _Call(*payload)}, protocol=4))
    with pytest.raises(persistence.NetworkPickleError, match=refused):
        persistence.load_network_pickle(io.BytesIO(data))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_literal_values_of_the_whitelisted_types_still_load(protocol):
    values = {"b": bytearray(b"abc"), "s": {1, 2}, "f": frozenset([3]), "size": torch.Size([2, 3]), "c": complex(1, 2),
              "sl": slice(1, 5, 2), "r": range(2, 9, 3), "od": collections.OrderedDict(a=1), "t": (1, "x"),
              "e": dnnlib.EasyDict(k=[1.5])}
    loaded = persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": torch.nn.Identity(), **values},
                                                                     protocol=protocol)))
    assert {k: loaded[k] for k in values} == values


def test_rebuild_from_type_calls_only_tensor_rebuild_functions():
    """torch._tensor._rebuild_from_type_v2(func, type, args, state) calls func(*args): any whitelisted callable with
    the file's arguments (a route for the object-array exploit). torch's pickles pass a tensor rebuild function."""
    payload = _Call(torch._tensor._rebuild_from_type_v2, bytearray, torch.Tensor, (b"ab",), {})
    with pytest.raises(persistence.NetworkPickleError, match="pass one of its tensor rebuild functions"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": payload}, protocol=4)))
    sub = torch.zeros(3).as_subclass(torch.nn.Parameter)  # pickled through _rebuild_from_type_v2 by torch
    assert torch.equal(persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": sub}, protocol=4)))["x"],
                       torch.zeros(3))


def test_constructor_arguments_sharing_containers_are_walked_once(tmp_path):
    """A 24-level chain of shared lists is 2**24 paths: the names check and the error message walked every one (an
    audit's 60-level file hung the loader)."""
    import time
    chain = [1]
    for _ in range(24):
        chain = [chain, chain]
    net = _tiny_edm_precond()
    net._init_kwargs["unknown_option"] = chain
    start = time.perf_counter()
    with pytest.raises(persistence.NetworkPickleError, match="cannot build training.preconditioning.EDMPrecond") as err:
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": net}, protocol=4)))
    assert time.perf_counter() - start < 5 and len(str(err.value)) < 3000


def test_deeply_nested_pickles_are_refused_in_one_line():
    depth = 100_000
    data = (b"\x80\x02}X\x03\x00\x00\x00ema" + b"]" * depth + b"a" * (depth - 1) + b"s.")  # {'ema': [[[...]]]}
    with pytest.raises(persistence.NetworkPickleError, match="nested deeper than a network pickle's"):
        persistence.load_network_pickle(io.BytesIO(data))


def test_views_of_one_storage_do_not_raise_the_construction_budget():
    """The budget scales with what the file holds: a stride-0 view (expand) of one element described 4e9 and let a
    constructor allocate 6.8 GB before the tensors were compared."""
    net = _tiny_edm_precond()
    net._init_kwargs["label_dim"] = 4_000_000  # about 6.4e7 elements asked for (label_dim x 16)
    net.register_buffer("padding", torch.zeros(1).expand(100_000_000))
    stored = sum(t.numel() for t in [*net.parameters(), *net.buffers()]) - 100_000_000 + 1
    with pytest.raises(persistence.NetworkPickleError, match=rf"but the pickle holds {stored:,}: refusing"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"ema": net}, protocol=4)))


def test_torch_files_that_build_a_bytearray_are_refused(tmp_path):
    """torch's weights_only unpickler allows bytearray(n): a 1.4 KB schedule or state file took 4.4 GB."""
    torch.save({"x": bytearray(b"ab"), "t": torch.zeros(2)}, tmp_path / "with-bytearray.pt")
    with pytest.raises(persistence.UnsafeTorchFileError, match="refusing a torch file that builds a bytearray"):
        persistence.safe_torch_load(str(tmp_path / "with-bytearray.pt"))
    torch.save({"t": torch.zeros(2), "s": "text", "b": b"bytes"}, tmp_path / "plain.pt")
    assert persistence.safe_torch_load(str(tmp_path / "plain.pt"))["b"] == b"bytes"


# A second audit of the guards above: calls the file chose through BUILD and APPEND lookups, a short object list
# read past its end, numpy's scalar and torch's set_() sizing memory from the file, legacy storages allocated at a
# declared size, colliding hashes.

def test_build_and_append_call_only_the_types_own_methods():
    """pickle's BUILD calls getattr(inst, '__setstate__') and APPEND inst.append: an EasyDict answers both with its
    items, so a 72-byte file called bytearray(2e9). Here 1e6, which loaded before."""
    for opcode, tail in ((b"b", b"."), (b"a", b".")):  # BUILD, APPEND
        key = b"__setstate__" if opcode == b"b" else b"append"
        data = (b"\x80\x02cdnnlib.util\nEasyDict\n)\x81X" + struct.pack("<I", len(key)) + key
                + b"cbuiltins\nbytearray\nsJ\x40\x42\x0f\x00" + opcode + tail)  # EasyDict(); [key] = bytearray; 1e6
        with pytest.raises(persistence.NetworkPickleError, match="not a readable network pickle"):
            persistence.load_network_pickle(io.BytesIO(data))


def test_object_arrays_must_have_as_many_items_as_their_shape():
    """numpy's __setstate__ reads a short list past its end, taking memory for object pointers (a segfault, or an
    object at an address the file sprays)."""
    reconstruct = persistence._numpy_multiarray()._reconstruct

    class ShortObjectArray:
        def __reduce__(self):
            return reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), np.dtype("O"), False, [1])

    with pytest.raises(persistence.NetworkPickleError, match=r"object array of shape \(2,\) from a list of 1 items"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": ShortObjectArray()}, protocol=4)))


def test_numpy_scalars_only_from_their_own_bytes():
    scalar = persistence._numpy_multiarray().scalar
    for args in ((np.dtype("V1000"),), (np.dtype("f8"), b"\0" * 4), (np.dtype("V8"), b"\0" * 9)):
        with pytest.raises(persistence.NetworkPickleError, match="refusing numpy's scalar"):
            persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": _Call(scalar, *args)}, protocol=4)))
    assert persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": np.float32(2.5)})))["x"] == 2.5


def test_tensor_views_must_lie_inside_their_storage():
    """torch's set_() grows a storage to fit the view: size (2,) and stride (1e9,) over one float was 4 GB."""
    storage = torch.zeros(1).untyped_storage()
    for size, stride, offset in (((2,), (1000,), 0), ((1,), (1,), 5), ((3, 2), (2, 1), 0)):
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
        call = _Call(torch._utils._rebuild_tensor_v2, typed, offset, size, stride, False, collections.OrderedDict())
        with pytest.raises(persistence.NetworkPickleError, match="refusing a tensor of size"):
            persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": call}, protocol=4)))
    view = torch.arange(12.0)[2:].view(2, 5)[:, ::2]  # offset 2, strides (5, 2): inside its 12 elements
    assert torch.equal(persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": view})))["x"], view)


def test_rebuild_from_type_takes_the_rebuild_functions_by_identity():
    """A module given `rebuilds_tensor = True` by its pickled state passed an attribute test, and was called."""
    module = torch.nn.Identity()
    module.rebuilds_tensor = True
    call = _Call(torch._tensor._rebuild_from_type_v2, module, torch.Tensor, (torch.zeros(1),), {})
    with pytest.raises(persistence.NetworkPickleError, match="_rebuild_from_type_v2 of a Identity"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": call}, protocol=4)))


def test_legacy_storages_are_not_allocated_beyond_their_bytes():
    """torch's legacy loader allocates a storage at the size its id declares, before (and whether or not) it reads
    the bytes: 1e9 floats from 192 bytes, left as uninitialised memory when the key is not in the stream's list."""
    head = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                            "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
    declared = (b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ"
                + struct.pack("<i", 1_000_000) + b"NtQ.")
    stream = head + declared + pickle.dumps([], protocol=2)
    with pytest.raises(persistence.NetworkPickleError, match=r"declared with 1000000 elements in \d+ bytes of data"):
        persistence.load_network_pickle(io.BytesIO(hostile.network_pickle_with_storage(stream)))


def test_sets_and_number_keyed_dicts_are_capped():
    """60,000 ints of one hash took a minute to insert (719 KB); no network pickle holds a set or a number-keyed dict
    of more than 10,000 items. Text keys hash unpredictably: those dicts are not capped."""
    for value in (set(range(10_001)), frozenset(range(10_001)), dict.fromkeys(range(10_001))):
        for protocol in (2, 4):
            with pytest.raises(persistence.NetworkPickleError, match="of more than 10,000 items"):
                persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": value}, protocol=protocol)))
    big = dict.fromkeys(map(str, range(10_001)), 1)
    assert len(persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": big}, protocol=4)))["x"]) == 10_001
    assert persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": set(range(100))})))["x"] == set(range(100))


def test_a_torch_layer_without_its_state_is_one_line():
    data = b"\x80\x02}X\x03\x00\x00\x00emactorch.nn.modules.linear\nLinear\n)\x81s."  # {'ema': Linear.__new__()}
    with pytest.raises(persistence.NetworkPickleError, match="a pickled Linear without its state"):
        persistence.load_network_pickle(io.BytesIO(data))


# A third audit round: hashing and repr of shared nested values, a range as a tensor's size, copies of one memoized
# value, and errors that escaped as tracebacks.

def test_shared_nested_values_are_neither_hashed_nor_printed():
    """30 nested pairs of one tuple as a dict key took 42 s to hash (each level doubles it); str() of shared nested
    lists is 2**depth characters."""
    key = (1, 2)
    for _ in range(4):
        key = (key, key)
    for data in (pickle.dumps({"x": {key: 1}}, protocol=4), pickle.dumps({"x": {key}}, protocol=4)):
        with pytest.raises(persistence.NetworkPickleError, match="that nests containers"):
            persistence.load_network_pickle(io.BytesIO(data))
    assert persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": {(1, "a"): 2}})))["x"] == {(1, "a"): 2}
    nested = [1]
    for _ in range(4):
        nested = [nested, nested]
    with pytest.raises(persistence.NetworkPickleError, match=r"refusing builtins.str\(list\)"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": _Call(str, nested)}, protocol=4)))
    reconstruct = persistence._numpy_multiarray()._reconstruct  # a refusal message prints the file's value bounded
    with pytest.raises(persistence.NetworkPickleError, match=r"_reconstruct\(numpy.ndarray, \[\[\[\[\[") as err:
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": _Call(reconstruct, np.ndarray, nested * 64,
                                                                            b"b")}, protocol=4)))
    assert len(str(err.value)) < 5000  # bounded (a plain repr: 64 x 2**4 lists)


def test_a_range_is_not_a_tensor_size():
    storage = torch.storage.TypedStorage(wrap_storage=torch.zeros(1).untyped_storage(), dtype=torch.float32,
                                         _internal=True)
    call = _Call(torch._utils._rebuild_tensor_v2, storage, 0, range(10 ** 6), range(10 ** 6), False, None)
    with pytest.raises(persistence.NetworkPickleError, match="size and stride are a range and a range"):
        persistence.load_network_pickle(io.BytesIO(pickle.dumps({"x": call}, protocol=4)))


def test_copies_of_one_memoized_value_are_budgeted():
    """MEMO GET hands one value to a call many times: bytearray(b) of one 100 KB string 10,000 times was 1.6 GB from
    160 KB. What calls build may exceed 4x the file read so far by 64 MB, no more."""
    big = b"x" * 100_000
    data = pickle.dumps({"x": [_Call(bytearray, big) for _ in range(700)]}, protocol=4)
    assert len(data) < 120_000
    with pytest.raises(persistence.NetworkPickleError, match="calls build about .* bytes from .* bytes of file"):
        persistence.load_network_pickle(io.BytesIO(data))
    fine = pickle.dumps({"x": [bytearray(b"x" * 100_000 + bytes([i])) for i in range(50)]}, protocol=2)
    assert len(persistence.load_network_pickle(io.BytesIO(fine))["x"]) == 50  # protocol 2: a call per bytearray


def test_malformed_values_are_one_line_errors(tmp_path):
    for data, message in ((pickle.dumps({"x": _Call(str, b"a", "no-such-encoding")}, protocol=4), "LookupError"),
                          (b"\x80\x02}X\x03\x00\x00\x00emactorch.nn.modules.linear\nLinear\n)\x81}(X\x0b\x00\x00"
                           b"\x00_parameters]K\x01aX\x08\x00\x00\x00_modules}ubs.", "has a malformed state")):
        with pytest.raises(persistence.NetworkPickleError, match=message):
            persistence.load_network_pickle(io.BytesIO(data))
    from metrics import frechet
    (tmp_path / "ref.pkl").write_bytes(pickle.dumps({1: 2}, protocol=4))  # EDM2's format, but not named arrays
    with pytest.raises(frechet.ReferenceStatsError, match="expected a dict of named arrays"):
        frechet.load_reference(str(tmp_path / "ref.pkl"))


def test_snapshot_writer_refuses_an_unregistered_persistent_class(tmp_path):
    """A network class whose module is not registered: save_snapshot refuses it at a run's first snapshot, naming the
    registration, instead of writing pickles that generate.py refuses after the run (extensibility trial B)."""
    from training import snapshots

    net = tiny.TinyNet(4)
    assert persistence.unregistered_classes(net) == ['TinyNet', 'TinyLayer']
    with pytest.raises(ValueError, match=r"TinyNet, TinyLayer, which load_network_pickle would refuse: register .*"
                                         r"persistence.register_module in training/snapshots.py"):
        snapshots.save_snapshot(str(tmp_path / 'x.pkl'), ema=net,
                                loss_kwargs=dict(class_name='losses.denoising.EDMLoss'),
                                process=snapshots.processes.EDMProcess())
    assert not (tmp_path / 'x.pkl').exists()
