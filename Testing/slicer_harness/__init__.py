"""Stand-ins for the parts of 3D Slicer's Python environment that the DeepRegistration module uses, so the widget,
its job process and its self-test run under pytest on slicer-core's real MRML scene.

Only what the module uses is here, and each stand-in follows the documented behaviour of the real thing:
- `qt`: PythonQt's object model (string-signature `connect`, slots called with as many arguments as they take, an
  exception in a slot printed to the console and not passed to the emitter, `blockSignals`), Qt's widgets as
  properties, `QTimer` and `deleteLater` through an event loop with virtual time, and `QProcess` (states, `started`,
  `errorOccurred(FailedToStart)` without `finished` when a program cannot start, `errorOccurred(Crashed)` then
  `finished(code, CrashExit)` when killed);
- `ctk`: `ctkCollapsibleButton`;
- `slicer.util`: `tryWithErrorDisplay` (shows the error, then re-raises), the message displays, `loadUI` from the
  .ui file, `childWidgetVariables`, and slicer-core's own array and observer helpers;
- `slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper`, `slicer.i18n`, and the `SampleData` and
  `PyTorchUtils` modules the widget reaches for.
`SlicerHarness` installs them, builds a scene like Slicer's (application logic, colour nodes, the Red/Yellow/Green
slice views), opens the module and drives it; see Testing/test_slicer_widget.py.
"""

from .harness import SlicerHarness  # noqa: F401
