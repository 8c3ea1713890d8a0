"""A stand-in for Slicer's `qt` module (PythonQt over Qt 5): the classes DeepRegistration uses, with Qt's semantics.

- Signals are strings ("clicked(bool)"); `connect(signal, slot)` adds a slot, `emit` calls each slot with as many of
  the signal's arguments as it accepts (PythonQt's rule), and an exception raised in a slot is printed to the console
  (`CONSOLE.tracebacks`) instead of reaching the code that emitted the signal. `blockSignals(True)` silences an
  object and returns the previous state.
- Widget state is read and written as properties (`button.enabled = False`, `combo.currentData`); changing a value
  programmatically emits the same signal as a user would (`setCurrentIndex` → `currentIndexChanged(int)`, setting
  `checked` → `toggled(bool)`, `text` of a line edit → `textChanged(QString)`), as Qt does.
- `EVENT_LOOP` runs queued events and timers in virtual time: `QTimer.singleShot`, `deleteLater` (an object is
  deleted when control returns to the event loop), and the signals of `QProcess`.
- `QProcess` goes NotRunning → Starting → Running → NotRunning. A program that cannot be run emits
  `errorOccurred(FailedToStart)` and never `finished`; `kill()` ends a running program with `errorOccurred(Crashed)`
  followed by `finished(exitCode, CrashExit)`. What a started program does is looked up in `QProcess.programs`
  (the harness registers the in-process DeepRegistration worker there).
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import os
import sys
import traceback
from typing import Any, Callable


class _Console:
    """What Slicer's Python console would show: tracebacks of exceptions raised inside slots and timers."""

    def __init__(self) -> None:
        self.tracebacks: list[str] = []

    def report(self, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.tracebacks.append(text)
        print(text, file=sys.stderr)


CONSOLE = _Console()


class EventLoop:
    """Queued calls and timers in virtual milliseconds."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def post(self, call: Callable[[], None], delay_ms: float = 0.0) -> None:
        heapq.heappush(self._queue, (self.now + max(delay_ms, 0.0), next(self._order), call))

    def process_events(self, max_events: int = 10_000) -> int:
        """Run every event that is due now (and those they post for now); returns how many ran."""
        count = 0
        while self._queue and self._queue[0][0] <= self.now and count < max_events:
            _, _, call = heapq.heappop(self._queue)
            _call_reporting(call)
            count += 1
        return count

    def advance(self, ms: float) -> None:
        """Let `ms` virtual milliseconds pass, running timers as they come due."""
        end = self.now + ms
        while self._queue and self._queue[0][0] <= end:
            self.now = max(self.now, self._queue[0][0])
            self.process_events()
        self.now = end
        self.process_events()

    def pending(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        self._queue.clear()
        self.now = 0.0


EVENT_LOOP = EventLoop()


def _call_reporting(call: Callable[[], Any]) -> None:
    try:
        call()
    except Exception as exc:  # PythonQt prints it to the console; the event loop goes on
        CONSOLE.report(exc)


def _normalize(signature: str) -> str:
    return signature.replace(" ", "")


def _accepted_arguments(slot: Callable) -> int | None:
    """How many positional arguments `slot` accepts (None: any number)."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for p in parameters:
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


class Qt:
    WaitCursor = 3
    ArrowCursor = 0
    RichText = 1
    PlainText = 0
    Vertical = 2
    Horizontal = 1
    AlignLeft = 1


class QObject:
    """Signals, dynamic properties, parent/children and deferred deletion."""

    def __init__(self, parent: QObject | None = None) -> None:
        self._slots: dict[str, list[Callable]] = {}
        self._signalsBlocked = False
        self._properties: dict[str, Any] = {}
        self._children: list[QObject] = []
        self._parent = None
        self._emitting = 0
        self.deleted = False
        self.deleteLaterCalled = False
        self.objectName = ""
        if parent is not None:
            self.setParent(parent)

    # signals
    def connect(self, signal: str, slot: Callable) -> bool:
        self._slots.setdefault(_normalize(signal), []).append(slot)
        return True

    def disconnect(self, signal: str | None = None, slot: Callable | None = None) -> bool:
        if signal is None:
            self._slots.clear()
            return True
        slots = self._slots.get(_normalize(signal), [])
        if slot is None:
            slots.clear()
        elif slot in slots:
            slots.remove(slot)
        return True

    def blockSignals(self, block: bool) -> bool:
        previous, self._signalsBlocked = self._signalsBlocked, bool(block)
        return previous

    def signalsBlocked(self) -> bool:
        return self._signalsBlocked

    def emit(self, signal: str, *args: Any) -> None:
        if self._signalsBlocked or self.deleted:
            return
        self._emitting += 1
        try:
            for slot in list(self._slots.get(_normalize(signal), [])):
                accepted = _accepted_arguments(slot)
                call_args = args if accepted is None else args[:accepted]
                _call_reporting(lambda: slot(*call_args))
        finally:
            self._emitting -= 1

    def receivers(self, signal: str) -> int:
        return len(self._slots.get(_normalize(signal), []))

    # properties and tree
    def setProperty(self, name: str, value: Any) -> bool:
        self._properties[name] = value
        return True

    def property(self, name: str) -> Any:
        return self._properties.get(name)

    def setParent(self, parent: QObject | None) -> None:
        if self._parent is not None and self in self._parent._children:
            self._parent._children.remove(self)
        self._parent = parent
        if parent is not None:
            parent._children.append(self)

    def parent(self) -> QObject | None:
        return self._parent

    def children(self) -> list[QObject]:
        return list(self._children)

    def findChildren(self, cls: type | None = None) -> list[QObject]:
        found = []
        for child in self._children:
            if cls is None or isinstance(child, cls):
                found.append(child)
            found.extend(child.findChildren(cls))
        return found

    def deleteLater(self) -> None:
        """Delete this object when control returns to the event loop (safe inside a slot of its own signal)."""
        self.deleteLaterCalled = True
        EVENT_LOOP.post(self._delete)

    def _delete(self) -> None:
        if self.deleted:
            return
        if self._emitting:
            raise RuntimeError(f"{type(self).__name__} deleted while one of its signals was being emitted")
        for child in list(self._children):
            child._delete()
        self.setParent(None)
        self._slots.clear()
        self.deleted = True


class QByteArray:
    def __init__(self, data: bytes = b"") -> None:
        self._data = bytes(data)

    def data(self) -> bytes:
        return self._data

    def size(self) -> int:
        return len(self._data)


# ----------------------------------------------------------------------------------------------- layouts


class QLayout(QObject):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__()
        self._items: list[Any] = []
        self._owner: QWidget | None = None
        if parent is not None:
            parent.setLayout(self)

    def _adopt(self, widget: QWidget) -> None:
        if self._owner is not None:
            widget.setParent(self._owner)

    def addWidget(self, widget: QWidget, *args: Any) -> None:
        self._items.append(widget)
        self._adopt(widget)

    def addLayout(self, layout: QLayout, *args: Any) -> None:
        self._items.append(layout)
        if self._owner is not None:
            layout._setOwner(self._owner)

    def addStretch(self, *args: Any) -> None:
        self._items.append(None)

    def addItem(self, item: Any) -> None:
        self._items.append(item)

    def _setOwner(self, owner: QWidget) -> None:
        self._owner = owner
        for item in self._items:
            if isinstance(item, QWidget):
                item.setParent(owner)
            elif isinstance(item, QLayout):
                item._setOwner(owner)

    def count(self) -> int:
        return len(self._items)

    def widgets(self) -> list[QWidget]:
        return [i for i in self._items if isinstance(i, QWidget)]


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QGridLayout(QLayout):
    pass


class QFormLayout(QLayout):
    """Rows of (label, field)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._rows: list[tuple[QWidget | None, QWidget | None]] = []

    def addRow(self, label: Any, field: QWidget | None = None) -> None:
        if field is None:
            label_widget, field = None, label
        else:
            label_widget = QLabel(label) if isinstance(label, str) else label
        self._rows.append((label_widget, field))
        for widget in (label_widget, field):
            if widget is not None:
                self._items.append(widget)
                self._adopt(widget)

    def addWidget(self, widget: QWidget, *args: Any) -> None:
        self.addRow(widget)

    def rowCount(self) -> int:
        return len(self._rows)

    def removeRow(self, row: int) -> None:
        label, field = self._rows.pop(row)
        for widget in (label, field):
            if widget is not None:
                if widget in self._items:
                    self._items.remove(widget)
                widget._delete()

    def rowWidgets(self) -> list[tuple[QWidget | None, QWidget | None]]:
        return list(self._rows)


class QSpacerItem:
    def __init__(self, *args: Any) -> None:
        pass


# ------------------------------------------------------------------------------------------------ widgets


class QWidget(QObject):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.styleSheet = ""
        self._layout: QLayout | None = None

    def setLayout(self, layout: QLayout) -> None:
        self._layout = layout
        layout._setOwner(self)

    def layout(self) -> QLayout | None:
        return self._layout

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setToolTip(self, text: str) -> None:
        self.toolTip = text

    def isEnabledTo(self, ancestor: QWidget) -> bool:
        """Enabled here and in every parent up to `ancestor` (Qt: a disabled parent disables its children)."""
        widget: QObject | None = self
        while widget is not None:
            if isinstance(widget, QWidget) and not widget.enabled:
                return False
            if widget is ancestor:
                return True
            widget = widget.parent()
        return True


class QFrame(QWidget):
    pass


class QLabel(QWidget):
    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = text
        self.wordWrap = False
        self.textFormat = Qt.PlainText

    def setText(self, text: str) -> None:
        self.text = text


class QAbstractButton(QWidget):
    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = text
        self.checkable = False
        self._checked = False

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        value = bool(value)
        if value != self._checked:
            self._checked = value
            self.emit("toggled(bool)", value)

    def setChecked(self, value: bool) -> None:
        self.checked = value

    def isChecked(self) -> bool:
        return self._checked

    def setText(self, text: str) -> None:
        self.text = text

    def click(self) -> None:
        """A user's click: nothing happens on a disabled button (Qt ignores it)."""
        if not self.enabled:
            return
        if self.checkable:
            self.checked = not self._checked
        self.emit("clicked(bool)", self._checked)
        self.emit("clicked()")


class QPushButton(QAbstractButton):
    pass


class QToolButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(text, parent)
        self.checkable = True


class QComboBox(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._items: list[tuple[str, Any]] = []
        self._index = -1

    def addItem(self, text: str, data: Any = None) -> None:
        self._items.append((str(text), data))
        if self._index == -1:
            self._setIndex(0)

    def addItems(self, texts: list[str]) -> None:
        for text in texts:
            self.addItem(text)

    def clear(self) -> None:
        self._items.clear()
        self._setIndex(-1)

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self.setCurrentIndex(index)

    def setCurrentIndex(self, index: int) -> None:
        if not -1 <= index < len(self._items):
            index = -1
        self._setIndex(index)

    def _setIndex(self, index: int) -> None:
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged(int)", index)
            self.emit("currentTextChanged(QString)", self.currentText)

    @property
    def currentData(self) -> Any:
        return self._items[self._index][1] if self._index >= 0 else None

    @property
    def currentText(self) -> str:
        return self._items[self._index][0] if self._index >= 0 else ""

    def findData(self, data: Any) -> int:
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)

    def findText(self, text: str) -> int:
        return next((i for i, (t, _) in enumerate(self._items) if t == text), -1)

    def itemData(self, index: int) -> Any:
        return self._items[index][1]

    def itemText(self, index: int) -> str:
        return self._items[index][0]


class QLineEdit(QWidget):
    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._text = str(text)
        self.placeholderText = ""
        self.readOnly = False

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        value = str(value)
        if value != self._text:
            self._text = value
            self.emit("textChanged(QString)", value)

    def setText(self, value: str) -> None:
        self.text = value

    def finishEditing(self) -> None:
        """The user pressed Enter or left the field: Qt emits editingFinished()."""
        self.emit("editingFinished()")


class _SpinBox(QWidget):
    _signal = "valueChanged(int)"
    _type: type = int

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.minimum, self.maximum = self._type(0), self._type(99)
        self._value = self._type(0)
        self.singleStep = self._type(1)
        self.suffix = ""
        self.decimals = 2

    def setRange(self, low: Any, high: Any) -> None:
        self.minimum, self.maximum = self._type(low), self._type(high)
        self.value = self._value

    def setMinimum(self, low: Any) -> None:
        self.setRange(low, max(low, self.maximum))

    def setMaximum(self, high: Any) -> None:
        self.setRange(min(self.minimum, high), high)

    @property
    def value(self) -> Any:
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        value = self._type(min(max(self._type(value), self.minimum), self.maximum))
        if value != self._value:
            self._value = value
            self.emit(self._signal, value)

    def setValue(self, value: Any) -> None:
        self.value = value


class QSpinBox(_SpinBox):
    pass


class QDoubleSpinBox(_SpinBox):
    _signal = "valueChanged(double)"
    _type = float


class QProgressBar(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._value = 0
        self.history: list[int] = []

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, value: int) -> None:
        self._value = int(value)
        self.history.append(self._value)


class QPlainTextEdit(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plainText = ""
        self.readOnly = False

    def appendPlainText(self, text: str) -> None:
        self.plainText = f"{self.plainText}\n{text}" if self.plainText else text

    def clear(self) -> None:
        self.plainText = ""


class QTextEdit(QPlainTextEdit):
    pass


class QGroupBox(QWidget):
    def __init__(self, title: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = title


# ------------------------------------------------------------------------------------- timers, dialogs


class QTimer(QObject):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.interval = 0
        self.singleShot_ = False
        self._generation = 0
        self._active = False

    @staticmethod
    def singleShot(msec: int, callback: Callable[[], Any]) -> None:
        EVENT_LOOP.post(callback, msec)

    def setInterval(self, msec: int) -> None:
        self.interval = int(msec)

    def setSingleShot(self, single: bool) -> None:
        self.singleShot_ = bool(single)

    def start(self, msec: int | None = None) -> None:
        if msec is not None:
            self.interval = int(msec)
        self._generation += 1
        self._active = True
        self._schedule(self._generation)

    def _schedule(self, generation: int) -> None:
        def fire() -> None:
            if generation != self._generation or not self._active or self.deleted:
                return
            if self.singleShot_:
                self._active = False
            else:
                self._schedule(generation)
            self.emit("timeout()")

        EVENT_LOOP.post(fire, self.interval)

    def stop(self) -> None:
        self._active = False
        self._generation += 1

    def isActive(self) -> bool:
        return self._active

    @property
    def active(self) -> bool:
        return self._active


class QMessageBox(QWidget):
    Ok, Cancel, Yes, No, Retry, Close, NoButton = 0x400, 0x400000, 0x4000, 0x10000, 0x80000, 0x200000, 0
    Information, Warning, Critical, Question = 1, 2, 3, 4


class QFileDialog(QWidget):
    answers: list[str] = []
    """What the next getOpenFileName calls return (the harness sets it; empty string: the user cancelled)."""

    @staticmethod
    def getOpenFileName(parent: Any = None, caption: str = "", directory: str = "", filter: str = "") -> str:
        return QFileDialog.answers.pop(0) if QFileDialog.answers else ""


class QApplication(QObject):
    overrideCursors: list[int] = []

    @staticmethod
    def setOverrideCursor(cursor: Any) -> None:
        QApplication.overrideCursors.append(cursor)

    @staticmethod
    def restoreOverrideCursor() -> None:
        if QApplication.overrideCursors:
            QApplication.overrideCursors.pop()

    @staticmethod
    def processEvents(*args: Any) -> None:
        EVENT_LOOP.process_events()


class QCursor:
    def __init__(self, shape: int = 0) -> None:
        self.shape = shape


# ----------------------------------------------------------------------------------------------- QProcess


class QProcess(QObject):
    NotRunning, Starting, Running = 0, 1, 2
    FailedToStart, Crashed, Timedout, ReadError, WriteError, UnknownError = 0, 1, 2, 3, 4, 5
    NormalExit, CrashExit = 0, 1

    programs: dict[str, Callable[["QProcess", list[str]], int]] = {}
    """Program path → what running it does: called with the process and its arguments in the event loop after
    `started()`, returns the exit code. It writes output with `write_output`/`write_errors`."""
    unable_to_start: str | None = None
    """When set, every start fails with this reason (Qt: "insufficient permissions or resources")."""
    instances: list["QProcess"] = []

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._state = QProcess.NotRunning
        self._stdout = b""
        self._stderr = b""
        self._error = QProcess.UnknownError
        self._errorString = "Unknown error"
        self._exitCode = 0
        self._exitStatus = QProcess.NormalExit
        self._killed = False
        self.workingDirectory = ""
        self.program = ""
        self.arguments: list[str] = []
        QProcess.instances.append(self)

    def state(self) -> int:
        return self._state

    def error(self) -> int:
        return self._error

    def errorString(self) -> str:
        return self._errorString

    def exitCode(self) -> int:
        return self._exitCode

    def exitStatus(self) -> int:
        return self._exitStatus

    def setWorkingDirectory(self, path: str) -> None:
        self.workingDirectory = path

    def start(self, program: str, arguments: list[str] | None = None) -> None:
        if self._state != QProcess.NotRunning:
            print("QProcess::start: Process is already running", file=sys.stderr)
            return
        self.program, self.arguments = program, list(arguments or [])
        self._state = QProcess.Starting
        self._killed = False
        runner = QProcess.programs.get(program)
        reason = QProcess.unable_to_start
        if reason is None and not (os.path.isfile(program) and os.access(program, os.X_OK)):
            reason = "execvp: No such file or directory"
        if reason is None and runner is None:
            reason = f"no behaviour registered for {program}"
        if reason is not None:
            EVENT_LOOP.post(lambda: self._failToStart(reason))
            return
        EVENT_LOOP.post(lambda: self._run(runner))

    def _failToStart(self, reason: str) -> None:
        self._state = QProcess.NotRunning
        self._error = QProcess.FailedToStart
        self._errorString = f"Process failed to start: {reason}"
        self.emit("errorOccurred(QProcess::ProcessError)", QProcess.FailedToStart)

    def _run(self, runner: Callable[["QProcess", list[str]], int]) -> None:
        if self._killed or self.deleted:
            return
        self._state = QProcess.Running
        self.emit("started()")
        try:
            code = runner(self, self.arguments)
        except _Killed:
            code = None
        except Exception as exc:  # the program itself crashed
            CONSOLE.report(exc)
            code = None
        if self._killed or code is None:
            self._state = QProcess.NotRunning
            self._exitCode, self._exitStatus = 9, QProcess.CrashExit
            self._error, self._errorString = QProcess.Crashed, "Process crashed"
            EVENT_LOOP.post(lambda: self._end(crashed=True))
        else:
            self._state = QProcess.NotRunning
            self._exitCode, self._exitStatus = int(code), QProcess.NormalExit
            EVENT_LOOP.post(lambda: self._end(crashed=False))

    def _end(self, crashed: bool) -> None:
        if crashed:
            self.emit("errorOccurred(QProcess::ProcessError)", QProcess.Crashed)
        self.emit("finished(int,QProcess::ExitStatus)", self._exitCode, self._exitStatus)

    # the running program's side
    def write_output(self, text: str) -> None:
        """The program wrote `text` on standard output: readyReadStandardOutput() is delivered while it runs."""
        self._stdout += text.encode()
        self.emit("readyReadStandardOutput()")
        if self._killed:
            raise _Killed()

    def write_errors(self, text: str) -> None:
        self._stderr += text.encode()
        self.emit("readyReadStandardError()")
        if self._killed:
            raise _Killed()

    # the owner's side
    def readAllStandardOutput(self) -> QByteArray:
        data, self._stdout = self._stdout, b""
        return QByteArray(data)

    def readAllStandardError(self) -> QByteArray:
        data, self._stderr = self._stderr, b""
        return QByteArray(data)

    def kill(self) -> None:
        if self._state == QProcess.NotRunning:
            return
        self._killed = True
        if self._state == QProcess.Starting:  # killed before it ran: it ends as a crash
            self._state = QProcess.NotRunning
            self._exitCode, self._exitStatus = 9, QProcess.CrashExit
            EVENT_LOOP.post(lambda: self._end(crashed=True))

    def terminate(self) -> None:
        self.kill()


class _Killed(BaseException):
    """Raised inside a running in-process program when its process was killed (SIGKILL stops it wherever it is)."""
