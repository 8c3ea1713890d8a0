"""A stand-in for `slicer.i18n` (Slicer ≥ 5.4): `tr` and `translate` return the source text (no translation loaded)."""


def tr(text: str) -> str:
    return text


def translate(context: str, text: str) -> str:
    return text
