"""Per-structure box plots of a benchmark run, one PNG per pair kind and label set (as in the papers' Dice
figures)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def structure_boxplots(records: list[dict[str, Any]], out_dir: Path, metric: str = "dice") -> list[Path]:
    """`<metric>_<kind>_<label set>.png`: per structure, one box per method over the pairs of that kind scored on
    that label set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if "structures" in record:
            groups[(record["kind"], record["label_set"])].append(record)
    written = []
    for (kind, label_set), group in sorted(groups.items()):
        methods = list(dict.fromkeys(r["method"] for r in group))
        structures = list(dict.fromkeys(s["structure"] for r in group for s in r["structures"]))
        pairs = sorted({r["pair"] for r in group})
        width = 0.8 / len(methods)
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.16 * len(structures) * len(methods) + 2)), 4.5))
        colours = plt.get_cmap("tab10")
        for m, method in enumerate(methods):
            values = [[s[metric] for r in group if r["method"] == method for s in r["structures"]
                       if s["structure"] == name and np.isfinite(s[metric])] for name in structures]
            positions = np.arange(len(structures)) + (m - (len(methods) - 1) / 2) * width
            box = ax.boxplot(values, positions=positions, widths=width * 0.9, patch_artist=True,
                             showfliers=True, flierprops={"markersize": 3})
            for patch in box["boxes"]:
                patch.set_facecolor(colours(m % 10))
                patch.set_alpha(0.75)
            ax.plot([], [], "s", color=colours(m % 10), label=method)
        ax.set_xticks(np.arange(len(structures)))
        ax.set_xticklabels([s.replace("_", " ") for s in structures], rotation=40, ha="right", fontsize=8)
        ax.set_ylabel({"dice": "Dice", "hd95": "HD95 (mm)", "assd": "ASSD (mm)"}.get(metric, metric))
        if metric == "dice":
            ax.set_ylim(0, 1)
        ax.set_title(f"{kind.replace('_', ' ')}, {label_set}: {len(pairs)} pair(s) ({', '.join(pairs)})", fontsize=8)
        ax.legend(fontsize=8, ncol=min(len(methods), 5), loc="lower left")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = Path(out_dir) / f"{metric}_{kind}_{label_set}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
