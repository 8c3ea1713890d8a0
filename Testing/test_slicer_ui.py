"""The Slicer module's GUI files, checked without Slicer: the .ui parses, the code's widgets exist in it, and every
widget bound with SlicerParameterName names a field of the parameter class with a type its widget can represent.

DeepRegistration.py imports Slicer's GUI (qt, slicer.util), so it is read with `ast`, not imported.
"""

from __future__ import annotations

import ast
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "DeepRegistration"
SCRIPT = MODULE_DIR / "DeepRegistration.py"
UI = MODULE_DIR / "Resources" / "UI" / "DeepRegistration.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "DeepRegistration.png"

NODE_WIDGETS = {"qMRMLNodeComboBox"}
# Widgets that parameterNodeWrapper's GUI connectors accept for each plain type (Slicer's guiConnectors.py).
TYPE_WIDGETS = {"bool": {"QCheckBox", "QPushButton"}, "int": {"QSpinBox", "QSlider"},
                "float": {"QDoubleSpinBox", "ctkSliderWidget"}, "str": {"QLineEdit", "QTextEdit"}}


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(SCRIPT.read_text())


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI).getroot()


def widgets(ui: ET.Element) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ui.iter("widget")}


def string_property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop.findtext("string")
    return None


def parameter_fields(tree: ast.Module) -> dict[str, ast.expr]:
    """Annotated fields of the class decorated with @parameterNodeWrapper, with module-level aliases resolved."""
    aliases = {node.targets[0].id: node.value for node in tree.body
               if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)}
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)
               and any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list)]
    assert len(classes) == 1, "expected one @parameterNodeWrapper class"
    fields = {}
    for statement in classes[0].body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            annotation = statement.annotation
            if isinstance(annotation, ast.Name) and annotation.id in aliases:
                annotation = aliases[annotation.id]
            fields[statement.target.id] = annotation
    return fields


def describe(annotation: ast.expr) -> tuple[str, list[str], bool]:
    """(kind, node classes, has Choice): kind is "node" or a plain type name."""
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name):
        if annotation.value.id == "Annotated":
            base, *extras = annotation.slice.elts
            kind, nodes, _ = describe(base)
            choice = any(isinstance(e, ast.Call) and getattr(e.func, "id", "") == "Choice" for e in extras)
            return kind, nodes, choice
        if annotation.value.id == "Union":
            names = [e.id for e in annotation.slice.elts]
            assert all(n.startswith("vtkMRML") for n in names), names
            return "node", names, False
    assert isinstance(annotation, ast.Name), ast.dump(annotation)
    if annotation.id.startswith("vtkMRML"):
        return "node", [annotation.id], False
    return annotation.id, [], False


def test_ui_parses_and_has_the_template_structure(ui):
    assert ui.tag == "ui" and ui.findtext("class") == "DeepRegistration"
    root = ui.find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "DeepRegistration"
    custom = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    assert {c for c in used if c.startswith(("q", "ctk"))} <= custom


def test_every_widget_the_code_uses_exists(tree, ui):
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert len(used) > 15
    missing = used - set(widgets(ui))
    assert not missing, f"self.ui.<name> used in DeepRegistration.py but absent from the .ui: {sorted(missing)}"


def test_widget_names_are_unique(ui):
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names))


def test_every_parameter_name_is_a_field_with_a_matching_widget(tree, ui):
    fields = parameter_fields(tree)
    bound = {}
    for name, widget in widgets(ui).items():
        parameter = string_property(widget, "SlicerParameterName")
        if parameter is None:
            continue
        assert parameter in fields, f"widget {name}: SlicerParameterName {parameter!r} is not a parameter"
        assert parameter not in bound, f"{parameter!r} is bound to {bound[parameter]} and {name}"
        bound[parameter] = name
        kind, nodes, choice = describe(fields[parameter])
        cls = widget.get("class")
        if kind == "node":
            assert cls in NODE_WIDGETS, (name, cls)
            types = [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]
            assert sorted(types) == sorted(nodes), (name, types, nodes)
        elif cls == "QComboBox":
            assert choice, f"{name}: a QComboBox needs a Choice annotation on {parameter!r}"
        else:
            assert cls in TYPE_WIDGETS[kind], (name, cls, kind)
    # the inputs and outputs the issue names are all in the panel
    for parameter in ("fixedVolume", "movingVolume", "fixedSegmentation", "movingSegmentation", "fixedLandmarks",
                      "movingLandmarks", "fixedGuidance", "movingGuidance", "fixedMask", "movingMask", "preset",
                      "outputTransform", "outputVolume", "outputJacobian", "outputFolding", "transformDisplay"):
        assert parameter in bound, parameter


def test_mrml_widgets_receive_the_scene(ui):
    receivers = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    for name, widget in widgets(ui).items():
        if widget.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView"):
            assert name in receivers, name


def test_module_script_imports_no_backend_at_load_time(tree):
    """The module must load in a Slicer without PyTorch: DeepRegistrationLib is imported inside functions only."""
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(n.startswith(("DeepRegistrationLib", "torch", "numpy")) for n in names), names


def test_icon_and_cmake_resources():
    header = ICON.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (128, 128)
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    for needle in ("slicerMacroBuildScriptedModule", "Resources/UI/${MODULE_NAME}.ui",
                   "Resources/Icons/${MODULE_NAME}.png", "${MODULE_NAME}Lib/*.py"):
        assert needle in cmake, needle


def test_widget_starts_with_the_registry_default_method(tree):
    """The parameter class cannot import the backend at load time, so its default method is a literal: it must be
    registry.DEFAULT_METHOD, the method whose shipped model `deepregistration demo` uses."""
    from DeepRegistrationLib.methods.registry import DEFAULT_METHOD

    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)
               and any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list)]
    defaults = {s.target.id: s.value for s in classes[0].body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None}
    assert ast.literal_eval(defaults["method"]) == DEFAULT_METHOD
