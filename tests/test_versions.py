"""The supported versions are stated once and tested: requirements floors == constraints-oldest.txt pins (the oldest
environment of the test matrix) == environment.yml floors, the Dockerfile's base torch is the torch floor, and the
Python range agrees between pyproject.toml, environment.yml and the README."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _version(text):
    return tuple(int(part) for part in text.split("."))


def _specs(name, operator):
    """{package: version} from a requirements or constraints file's `package<operator>version` lines."""
    specs = {}
    for line in _read(name).splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-r"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*" + re.escape(operator) + r"\s*([0-9.]+)", line)
        assert match, f"{name}: expected 'package{operator}version', got {line!r}"
        specs[match.group(1).lower()] = match.group(2)
    return specs


def _floors():
    floors = _specs("requirements.txt", ">=")
    floors.update(_specs("requirements-dev.txt", ">="))
    return floors


def test_oldest_constraints_pin_exactly_the_floors():
    floors, pins = _floors(), _specs("constraints-oldest.txt", "==")
    assert set(pins) == set(floors)
    mismatched = {name: (floors[name], pins[name]) for name in floors if _version(floors[name]) != _version(pins[name])}
    assert not mismatched, f"floor vs oldest tested pin: {mismatched}"


def test_environment_yml_has_the_same_floors_and_python_range():
    floors = _specs("requirements.txt", ">=")
    text = _read("environment.yml")
    for name, floor in floors.items():  # torch is in the pip section (PyPI's name), the others conda-forge's
        match = re.search(rf"^\s*- {re.escape(name)}>=([0-9.]+)\s*$", text, re.MULTILINE)
        assert match, f"environment.yml lacks a floor for {name}"
        assert _version(match.group(1)) == _version(floor), f"environment.yml: {name}>={match.group(1)}, not {floor}"
    assert re.search(r"^\s*- python>=3\.10,<3\.14\s*$", text, re.MULTILINE)
    assert 'requires-python = ">=3.10,<3.14"' in _read("pyproject.toml")
    assert "Python 3.10-3.13" in _read("README.md")


def test_dockerfile_base_image_is_the_torch_floor():
    match = re.search(r"^FROM pytorch/pytorch:([0-9.]+)-", _read("Dockerfile"), re.MULTILINE)
    assert match and match.group(1) == _floors()["torch"]


def test_default_torch_and_the_readme_agree_with_the_floors():
    floors = _floors()
    match = re.search(r"\$\{TORCH_SPEC:-torch==([0-9.]+) torchvision==[0-9.]+\}", _read("scripts/setup_env.sh"))
    assert match, "scripts/setup_env.sh: default TORCH_SPEC not found"
    assert _version(match.group(1)) >= _version(floors["torch"])
    readme = _read("README.md")
    assert f"torch {floors['torch']}" in readme and f"torch {match.group(1)}" in readme


# Import names whose distribution on PyPI is called otherwise.
DISTRIBUTION_OF_IMPORT = {"PIL": "pillow", "sklearn": "scikit-learn"}


def _module_level_imports(path):
    """Top-level names a file imports unconditionally (in its module body; imports inside functions or try blocks are
    optional dependencies that fail with their own message, e.g. timm, pyspng, torchvision in a test)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_every_unconditional_import_is_a_requirement():
    """A fresh `pip install -r requirements.txt` runs the tools (and requirements-dev.txt the tests and benchmarks):
    each third-party package a module imports unconditionally is listed, under its distribution's name."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = files.stdout.split()
    assert "train.py" in files and "tests/test_versions.py" in files
    local = {name.split("/")[0].removesuffix(".py") for name in files}  # the project's own packages and modules
    local |= {name.split("/")[1].removesuffix(".py") for name in files if name.startswith(("tests/", "benchmarks/"))}
    runtime, dev = set(_specs("requirements.txt", ">=")), set(_floors())
    missing = []
    for name in files:
        allowed = dev if name.startswith(("tests/", "benchmarks/")) else runtime
        for module in _module_level_imports(os.path.join(ROOT, name)):
            if module in sys.stdlib_module_names or module in local:
                continue
            if DISTRIBUTION_OF_IMPORT.get(module, module).lower() not in allowed:
                missing.append(f"{name}: {module}")
    assert not missing, f"imported but not required: {missing}"
    assert "torchvision" not in dev  # only a test uses it, as a reference, and skips without it
