"""What the Slicer module checks before it may import PyTorch: the packages from their metadata
(`frontends.environment`), the modules it imports before they are installed (none may import PyTorch, NumPy or
nibabel), and the probe process that asks PyTorch its questions (`frontends.probe`)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.methods.registry import METHODS
from DeepRegistrationLib.frontends import environment, probe

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = {"numpy": "2.1.3", "torch": "2.5.1+cu121", "safetensors": "0.4.5", "nibabel": "5.3.2", "scipy": "1.14.1"}


def versions(**changes):
    table = {**INSTALLED, **changes}
    return lambda name: table.get(name)


def test_versions_compare_by_release_numbers():
    assert environment.parse_version("2.3.1+cu121") == (2, 3, 1)
    assert environment.parse_version("2.13.0rc1") == (2, 13, 0)
    assert environment.at_least("2.10.0", "2.3") and not environment.at_least("2.2.9", "2.3")
    assert environment.at_least("2.1", "2.1.0")
    with pytest.raises(ValueError):
        environment.parse_version("unknown")


def test_a_complete_environment_has_no_problem():
    assert environment.check(versions()) == []
    assert environment.describe([]) == ""


def test_pytorch_missing_too_old_or_built_for_numpy_1_is_fixed_through_the_pytorch_extension():
    [missing] = environment.check(versions(torch=None))
    assert (missing.package, missing.fix, missing.requirement) == ("torch", "pytorch", ">=2.1")
    [old] = environment.check(versions(torch="2.0.1"))
    assert old.fix == "pytorch" and "2.0.1" in old.message and old.requirement == ">=2.1"
    [numpy1] = environment.check(versions(torch="2.2.2", numpy="2.0.2"))
    assert numpy1.requirement == ">=2.3" and "NumPy 1" in numpy1.message and "2.0.2" in numpy1.message
    assert environment.check(versions(torch="2.2.2", numpy="1.26.4")) == [], "PyTorch 2.2 is fine with NumPy 1"
    assert "PyTorch extension" in environment.describe([missing])


def test_other_packages_are_pip_requirements():
    problems = environment.check(versions(nibabel=None, scipy="1.9.0"))
    assert [(p.package, p.fix, p.requirement) for p in problems] == [("nibabel", "pip", "nibabel>=5.0"),
                                                                      ("scipy", "pip", "scipy>=1.10")]
    assert "with pip" in environment.describe(problems)
    assert environment.installed_version("no-such-distribution-here") is None
    assert environment.installed_version("numpy") == np.__version__


def test_what_the_widget_imports_before_installing_needs_no_pytorch_numpy_or_nibabel():
    """A fresh Python where importing torch, numpy, nibabel, scipy or SimpleITK fails imports the modules the widget
    uses before the first Apply, and they work."""
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'numpy', 'nibabel', 'scipy', 'SimpleITK', 'safetensors', 'vtk'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.methods.registry import METHODS
from DeepRegistrationLib.frontends import environment, inputs
from DeepRegistrationLib.methods.registry import METHODS, get_method
print(len(METHODS), get_method('lapirn').weights_path.name, RegistrationOptions().method)
try:
    inputs.check_weights(RegistrationOptions(method='voxelmorph', weights=str(get_method('lapirn').weights_path)))
except InputError as exc:
    print('refused:', exc)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "DeepRegistration", capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"{len(METHODS)} lapirn.safetensors lapirn"
    assert "a 'lapirn' model, not 'voxelmorph'" in done.stdout


def test_the_probe_answers_in_json_and_reports_failures_as_json(tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"options": RegistrationOptions(method="voxelmorph", device="cpu").to_dict(),
                                   "shape": [40, 48, 40], "affine": (np.diag([2.0, 2.0, 2.0, 1.0])).tolist()}))
    answer = probe.memory(json.loads(request.read_text()))
    assert answer["bytes"] > 0 and answer["device"] == "cpu" and answer["free"] > 0
    devices = probe.devices()
    assert devices["torch"] and devices["numpy"] == np.__version__ and isinstance(devices["cuda"], list)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert probe.main(["memory", str(tmp_path / "missing.json")]) == 1
        assert probe.main(["nonsense"]) == 2
    assert "FileNotFoundError" in json.loads(out.getvalue().splitlines()[0])["error"]
