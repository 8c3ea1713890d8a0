"""A stand-in for `slicer.parameterNodeWrapper` (Slicer ≥ 5.2), covering what DeepRegistration's parameter class uses.

`@parameterNodeWrapper` turns a class of annotated fields into a wrapper around a vtkMRMLScriptedModuleNode:
- plain values (str, int, float, bool) are stored as node parameters (strings), node-typed values (a vtkMRML class or
  a Union of them) as node references named after the field; a field missing from the node gets its default when the
  wrapper is created (no default: "", 0, 0.0, False or None);
- `Annotated[..., Choice([...])]` and `WithinRange(low, high)` validate on assignment (ValueError), as does the type
  (a node must be an instance of one of the field's classes — subclasses included);
- `connectGui(gui)` binds every widget with a `SlicerParameterName` dynamic property to its field both ways and
  returns a tag for `disconnectGui(tag)`: check boxes (toggled), spin boxes (valueChanged, range from WithinRange),
  line edits (textChanged), combo boxes of a Choice (filled with the choices; currentIndexChanged) and node combo
  boxes (currentNodeChanged). A widget is written from the node when connected and whenever the node is modified.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

import vtk

from . import mrml_widgets, qt


@dataclass(frozen=True)
class Choice:
    choices: tuple

    def __init__(self, choices) -> None:
        object.__setattr__(self, "choices", tuple(choices))

    def validate(self, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {list(self.choices)}")


@dataclass(frozen=True)
class WithinRange:
    minimum: Any
    maximum: Any

    def validate(self, value: Any) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value!r} is not within [{self.minimum}, {self.maximum}]")


@dataclass(frozen=True)
class Default:
    value: Any

    def validate(self, value: Any) -> None:
        pass


_PLAIN_DEFAULTS = {str: "", int: 0, float: 0.0, bool: False}


@dataclass
class _Field:
    name: str
    kind: type | None  # plain type, None for nodes
    node_types: tuple = ()
    validators: tuple = ()
    default: Any = None

    def check(self, value: Any) -> Any:
        if self.kind is None:
            if value is not None and not isinstance(value, self.node_types):
                raise ValueError(f"{self.name}: {value!r} is not a {' or '.join(t.__name__ for t in self.node_types)}")
        else:
            if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
                raise ValueError(f"{self.name}: {value!r} is not a {self.kind.__name__}")
        for validator in self.validators:
            validator.validate(value)
        return value

    def serialize(self, value: Any) -> str:
        return repr(value) if self.kind is float else str(value)

    def deserialize(self, text: str) -> Any:
        if self.kind is bool:
            return text == "True"
        return self.kind(text)


def _field(name: str, annotation: Any, default: Any) -> _Field:
    validators: tuple = ()
    if get_origin(annotation) is typing.Annotated:
        annotation, *extras = get_args(annotation)
        validators = tuple(extras)
        for extra in extras:
            if isinstance(extra, Default):
                default = extra.value
    if get_origin(annotation) is Union:
        types = tuple(t for t in get_args(annotation) if t is not type(None))
        return _Field(name, None, types, validators, None)
    if isinstance(annotation, type) and annotation.__name__.startswith("vtkMRML"):
        return _Field(name, None, (annotation,), validators, None)
    if annotation not in _PLAIN_DEFAULTS:
        raise TypeError(f"parameter {name}: unsupported type {annotation!r} in this stand-in")
    if default is _MISSING:
        default = _PLAIN_DEFAULTS[annotation]
    return _Field(name, annotation, (), validators, default)


_MISSING = object()


class _Connection:
    """One widget bound to one field."""

    def __init__(self, wrapper, field: _Field, widget) -> None:
        self.wrapper, self.field, self.widget = wrapper, field, widget
        choice = next((v for v in field.validators if isinstance(v, Choice)), None)
        bounds = next((v for v in field.validators if isinstance(v, WithinRange)), None)
        if isinstance(widget, mrml_widgets.qMRMLNodeComboBox):
            self.signal, self.read = "currentNodeChanged(vtkMRMLNode*)", lambda: widget.currentNode()
            self.write = widget.setCurrentNode
        elif isinstance(widget, qt.QCheckBox):
            self.signal, self.read = "toggled(bool)", lambda: widget.checked
            self.write = lambda v: setattr(widget, "checked", v)
        elif isinstance(widget, (qt.QSpinBox, qt.QDoubleSpinBox)):
            if bounds is not None:
                widget.setRange(bounds.minimum, bounds.maximum)
            self.signal = "valueChanged(int)" if isinstance(widget, qt.QSpinBox) else "valueChanged(double)"
            self.read, self.write = lambda: widget.value, lambda v: setattr(widget, "value", v)
        elif isinstance(widget, qt.QLineEdit):
            self.signal, self.read = "textChanged(QString)", lambda: widget.text
            self.write = lambda v: setattr(widget, "text", v)
        elif isinstance(widget, qt.QComboBox):
            if choice is None:
                raise TypeError(f"{field.name}: a QComboBox needs a Choice")
            widget.clear()
            for value in choice.choices:
                widget.addItem(str(value), value)
            self.signal, self.read = "currentIndexChanged(int)", lambda: widget.currentData
            self.write = lambda v: widget.setCurrentIndex(widget.findData(v))
        else:
            raise TypeError(f"{field.name}: no connector for {type(widget).__name__}")
        widget.connect(self.signal, self.onWidgetChanged)
        self.update()

    def onWidgetChanged(self, *args) -> None:
        value = self.read()
        if getattr(self.wrapper, self.field.name) != value or self.field.kind is None:
            setattr(self.wrapper, self.field.name, value)

    def update(self) -> None:
        value = getattr(self.wrapper, self.field.name)
        blocked = self.widget.blockSignals(True)
        try:
            self.write(value)
        finally:
            self.widget.blockSignals(blocked)

    def close(self) -> None:
        self.widget.disconnect(self.signal, self.onWidgetChanged)


def parameterNodeWrapper(cls):
    hints = get_type_hints(cls, include_extras=True)
    fields = {name: _field(name, annotation, cls.__dict__.get(name, _MISSING)) for name, annotation in hints.items()}

    class Wrapper:
        allParameters = fields

        def __init__(self, parameterNode) -> None:
            if parameterNode is None or not parameterNode.IsA("vtkMRMLScriptedModuleNode"):
                raise ValueError("a parameter node wrapper needs a vtkMRMLScriptedModuleNode")
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "_guis", {})
            object.__setattr__(self, "_nextTag", 0)
            wasModified = parameterNode.StartModify()
            for field in fields.values():
                if field.kind is not None and not parameterNode.GetParameter(field.name):
                    if field.name not in parameterNode.GetParameterNames():
                        parameterNode.SetParameter(field.name, field.serialize(field.default))
            parameterNode.EndModify(wasModified)

        def __getattr__(self, name: str) -> Any:
            field = fields.get(name)
            if field is None:
                raise AttributeError(name)
            node = object.__getattribute__(self, "parameterNode")
            if field.kind is None:
                return node.GetNodeReference(name)
            if name not in node.GetParameterNames():
                return field.default
            return field.deserialize(node.GetParameter(name))

        def __setattr__(self, name: str, value: Any) -> None:
            field = fields.get(name)
            if field is None:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            value = field.check(value)
            node = self.parameterNode
            if field.kind is None:
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(name, field.serialize(value))

        def __bool__(self) -> bool:
            return True

        def StartModify(self) -> int:
            return self.parameterNode.StartModify()

        def EndModify(self, wasModified: int) -> None:
            self.parameterNode.EndModify(wasModified)

        def connectGui(self, gui) -> int:
            widgets = gui.findChildren(qt.QWidget) if isinstance(gui, qt.QWidget) else list(vars(gui).values())
            connections = []
            for widget in widgets:
                name = widget.property("SlicerParameterName") if isinstance(widget, qt.QObject) else None
                if name:
                    if name not in fields:
                        raise ValueError(f"widget {widget.objectName}: no parameter {name!r}")
                    connections.append(_Connection(self, fields[name], widget))

            def update(caller=None, event=None) -> None:
                for connection in connections:
                    connection.update()

            observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, update)
            tag = self._nextTag
            object.__setattr__(self, "_nextTag", tag + 1)
            self._guis[tag] = (connections, observer)
            return tag

        def disconnectGui(self, tag) -> None:
            connections, observer = self._guis.pop(tag, ([], None))
            for connection in connections:
                connection.close()
            if observer is not None:
                self.parameterNode.RemoveObserver(observer)

    Wrapper.__name__ = cls.__name__
    Wrapper.__qualname__ = cls.__qualname__
    Wrapper.__doc__ = cls.__doc__
    return Wrapper
