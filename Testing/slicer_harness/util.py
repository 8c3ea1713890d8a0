"""A stand-in for `slicer.util`: the GUI helpers DeepRegistration uses, with Slicer's semantics, and slicer-core's own
implementations of the helpers that only touch MRML.

- `tryWithErrorDisplay(message)`: on an exception, shows "message\\n\\nerror" in an error popup and then re-raises
  (Slicer does both; inside a Qt slot the re-raised exception ends up as a traceback in the Python console).
- `errorDisplay`/`warningDisplay`/`infoDisplay`: a popup, recorded in `POPUPS`, and logged.
- `confirmOkCancelDisplay`/`confirmYesNoDisplay`: the next answer in `ANSWERS` (True when empty), question recorded.
- `loadUI` builds the widget tree of a Qt Designer file from the `qt`, `ctk` and `slicer` stand-ins;
  `childWidgetVariables` gives every named descendant as an attribute.
- `pip_install` records the requirements in `PIP_INSTALLS` and calls `PIP_HOOK` (the harness decides what gets
  installed).
"""

from __future__ import annotations

import logging
import sys
import traceback
import types
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from typing import Any, Callable

from . import ctk, mrml_widgets, qt

_REAL = sys.modules.get("slicer.util")
if _REAL is None or getattr(_REAL, "__harness__", False):
    import importlib

    _REAL = importlib.import_module("slicer.util")

VTKObservationMixin = _REAL.VTKObservationMixin
arrayFromVolume = _REAL.arrayFromVolume
arrayFromVolumeModified = _REAL.arrayFromVolumeModified
addVolumeFromArray = _REAL.addVolumeFromArray
updateVolumeFromArray = _REAL.updateVolumeFromArray
arrayFromVTKMatrix = _REAL.arrayFromVTKMatrix
vtkMatrixFromArray = _REAL.vtkMatrixFromArray
getNode = _REAL.getNode
getNodesByClass = _REAL.getNodesByClass
NodeModify = _REAL.NodeModify

__harness__ = True
POPUPS: list[tuple[str, str, str]] = []
"""(level, text, detailed text) of each popup shown."""
QUESTIONS: list[str] = []
ANSWERS: list[bool] = []
DELAY_DISPLAYS: list[str] = []
PIP_INSTALLS: list[list[str]] = []
PIP_HOOK: Callable[[list[str]], None] | None = None
RESET_SLICE_VIEWS: list[bool] = []


def reset() -> None:
    for store in (POPUPS, QUESTIONS, ANSWERS, DELAY_DISPLAYS, PIP_INSTALLS, RESET_SLICE_VIEWS):
        store.clear()


def _popup(level: str, text: str, detailedText: str = "") -> None:
    POPUPS.append((level, str(text), str(detailedText or "")))
    logging.log(getattr(logging, level.upper(), logging.INFO), text)


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs) -> None:
    _popup("error", text, kwargs.get("detailedText", ""))


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs) -> None:
    _popup("warning", text, kwargs.get("detailedText", ""))


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs) -> None:
    _popup("info", text, kwargs.get("detailedText", ""))


def _confirm(text: str) -> bool:
    QUESTIONS.append(str(text))
    return ANSWERS.pop(0) if ANSWERS else True


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs) -> bool:
    return _confirm(text)


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs) -> bool:
    return _confirm(text)


def delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs) -> None:
    DELAY_DISPLAYS.append(str(message))
    logging.info(message)
    qt.EVENT_LOOP.process_events()


class WaitCursor:
    def __init__(self, show: bool = True) -> None:
        self.show = show

    def __enter__(self):
        if self.show:
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)

    def __exit__(self, *exc) -> None:
        if self.show:
            qt.QApplication.restoreOverrideCursor()


@contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    import slicer

    try:
        if waitCursor:
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        yield
        if waitCursor:
            slicer.app.restoreOverrideCursor()
    except Exception as e:
        if waitCursor:
            slicer.app.restoreOverrideCursor()
        if show and not slicer.app.testingEnabled():
            errorMessage = f"{message}\n\n{e}" if message is not None else str(e)
            errorDisplay(errorMessage, detailedText=traceback.format_exc())
        raise


def pip_install(requirements, **kwargs) -> None:
    args = requirements.split() if isinstance(requirements, str) else list(requirements)
    PIP_INSTALLS.append(args)
    if PIP_HOOK is not None:
        PIP_HOOK(args)


def resetSliceViews() -> None:
    RESET_SLICE_VIEWS.append(True)


def mainWindow():
    return None


def settingsValue(key, default, converter=lambda v: v, settings=None):
    return default


def toBool(value) -> bool:
    return _REAL.toBool(value)


# ------------------------------------------------------------------------------------------------- .ui files


def _widget_class(name: str) -> type:
    import slicer

    for module in (qt, ctk, mrml_widgets, slicer):
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return cls
    raise KeyError(f"no stand-in for the widget class {name}")


def _value(prop: ET.Element) -> Any:
    child = next(iter(prop))
    if child.tag == "string":
        return child.text or ""
    if child.tag == "bool":
        return child.text == "true"
    if child.tag == "number":
        return int(child.text)
    if child.tag == "double":
        return float(child.text)
    if child.tag == "stringlist":
        return [s.text or "" for s in child.findall("string")]
    if child.tag in ("enum", "set"):
        return child.text
    return None


def _build_widget(element: ET.Element, parent: qt.QWidget | None) -> qt.QWidget:
    widget = _widget_class(element.get("class"))()
    widget.objectName = element.get("name")
    if parent is not None:
        widget.setParent(parent)
    for prop in element.findall("property"):
        value = _value(prop)
        name = prop.get("name")
        if prop.get("stdset") == "0":
            widget.setProperty(name, value)
        elif name == "textFormat":
            widget.textFormat = qt.Qt.RichText if value and value.endswith("RichText") else qt.Qt.PlainText
        else:
            setattr(widget, name, value)
    layout = element.find("layout")
    if layout is not None:
        widget.setLayout(_build_layout(layout, widget))
    return widget


def _build_layout(element: ET.Element, owner: qt.QWidget) -> qt.QLayout:
    layout = _widget_class(element.get("class"))()
    layout.objectName = element.get("name")
    for item in element.findall("item"):
        child = next(iter(item), None)
        if child is None:
            continue
        if child.tag == "widget":
            layout.addWidget(_build_widget(child, owner))
        elif child.tag == "layout":
            layout.addLayout(_build_layout(child, owner))
        elif child.tag == "spacer":
            layout.addItem(qt.QSpacerItem())
    return layout


def loadUI(path: str) -> qt.QWidget:
    """The top widget of a Qt Designer file, its children, and its <connections>."""
    root = ET.parse(path).getroot()
    top = _build_widget(root.find("widget"), None)
    by_name = {w.objectName: w for w in [top, *top.findChildren(qt.QObject)]}
    for connection in root.iter("connection"):
        sender, receiver = by_name[connection.findtext("sender")], by_name[connection.findtext("receiver")]
        slot_name = connection.findtext("slot").split("(")[0]
        sender.connect(connection.findtext("signal"), getattr(receiver, slot_name))
    return top


def childWidgetVariables(widget: qt.QWidget) -> types.SimpleNamespace:
    """Every named descendant of `widget` as an attribute (Slicer: `slicer.util.childWidgetVariables`)."""
    namespace = types.SimpleNamespace()
    for child in widget.findChildren(qt.QWidget):
        if child.objectName:
            setattr(namespace, child.objectName, child)
    return namespace


def findChildren(widget=None, name="", text="", title="", className=""):
    found = []
    for child in (widget.findChildren(qt.QObject) if widget is not None else []):
        if name and child.objectName != name:
            continue
        if className and type(child).__name__ != className:
            continue
        found.append(child)
    return found
