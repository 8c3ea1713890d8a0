"""`RegistrationOptions` is declared once: the command line's flags, the job file and the Slicer parameter node all
follow from it."""

from __future__ import annotations

import ast
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.frontends import cli, job

SCRIPT = Path(__file__).resolve().parents[1] / "DeepRegistration" / "DeepRegistration.py"


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def parameter_node_defaults() -> dict[str, object]:
    """Field name → default literal (None when it has none) of the @parameterNodeWrapper class."""
    tree = ast.parse(SCRIPT.read_text())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef)
               and any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list))
    return {s.target.id: (ast.literal_eval(s.value) if s.value is not None else None)
            for s in cls.body if isinstance(s, ast.AnnAssign)}


def default(f) -> object:
    return f.default_factory() if f.default is MISSING else f.default


def test_every_option_has_a_parameter_node_field_with_its_default():
    node = parameter_node_defaults()
    for f in fields(RegistrationOptions):
        if f.name == "parameters":  # stored per method as JSON, edited through the generated panel
            assert node["methodParameters"] == "{}"
            continue
        if isinstance(default(f), dict):  # other dict options: JSON text
            assert node[camel(f.name)] == "{}", f.name
            continue
        assert camel(f.name) in node, f"the parameter node lacks {camel(f.name)} for option {f.name}"
        expected = "" if f.name == "weights" else default(f)  # the node stores "no weights file" as ""
        assert node[camel(f.name)] == expected, f.name


def test_every_option_is_a_command_line_flag_with_its_default_and_help():
    parser = cli.build_parser()
    register = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("register"))
    flags = {action.dest: action for action in register._actions}
    for f in fields(RegistrationOptions):
        dest = "set" if isinstance(default(f), dict) else f.name  # dict options: --set KEY=VALUE, refine.KEY=VALUE
        assert dest in flags, f.name
        if dest != "set" or f.name == "parameters":
            assert f.metadata["help"] in (flags[dest].help or "")
        if dest != "set":
            assert flags[dest].default == default(f)
            assert flags[dest].choices == f.metadata.get("choices")
    args = parser.parse_args(["register", "--fixed", "f", "--moving", "m", "--output-dir", "o", "--seed", "3",
                              "--instance-optimization", "5", "--set", "int_steps=4", "--prealign", "moments",
                              "--preset", "fast", "--set", "refine.lr=0.2"])
    assert cli.options_from_args(args) == RegistrationOptions(seed=3, instance_optimization=5,
                                                              parameters={"int_steps": 4}, prealign="moments",
                                                              preset="fast", refinement={"lr": 0.2})


def test_options_survive_the_job_file(tmp_path):
    import numpy as np

    from DeepRegistrationLib.core.geometry import Grid
    from DeepRegistrationLib.core.image import Image

    image = Image(np.zeros((4, 5, 6), np.float32), Grid((4, 5, 6), np.eye(4)))
    options = RegistrationOptions(method="voxelmorph", weights="w.safetensors", parameters={"int_steps": 5},
                                  device="cpu", prealign="moments", instance_optimization=2, seed=9,
                                  fixed_modality="ct")
    job.write_job(job.RegistrationJob(image, image, options), tmp_path)
    assert job.read_job(tmp_path).options == options
    with pytest.raises(ValueError, match="unknown registration option"):
        RegistrationOptions.from_dict({"no_such_option": 1})
