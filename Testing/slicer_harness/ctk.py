"""A stand-in for Slicer's `ctk` module: the CTK widgets DeepRegistration's .ui uses."""

from __future__ import annotations

from .qt import QWidget


class ctkCollapsibleButton(QWidget):
    """A button that shows or hides its contents; changing `collapsed` emits contentsCollapsed(bool)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = ""
        self._collapsed = False

    @property
    def collapsed(self) -> bool:
        return self._collapsed

    @collapsed.setter
    def collapsed(self, value: bool) -> None:
        value = bool(value)
        if value != self._collapsed:
            self._collapsed = value
            self.emit("contentsCollapsed(bool)", value)

    def click(self) -> None:
        if self.enabled:
            self.collapsed = not self._collapsed
