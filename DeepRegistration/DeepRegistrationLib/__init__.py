"""DeepRegistration backend: geometry-correct I/O, warping, losses, metrics and networks.

Importable without Slicer's GUI. Conventions (axis order, units, directions) are in docs/CONVENTIONS.md.
"""

__version__ = "0.2.0"
