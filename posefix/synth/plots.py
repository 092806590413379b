"""Charts of a diagnosis report (from :func:`synth.diagnose.diagnose`), as PNG files.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so no global figure state
is created or left behind.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..fileio import atomic_path
from .profile import ERRORS

COLORS = {"jitter": "#8C4646", "inversion": "#D96459", "swap": "#F2AE72", "miss": "#E8C547",
          "alone": "#4F82BD", "cumulative": "#2E8B57"}
DPI = 110


def write_plots(report: dict, out_dir) -> list[Path]:
    """Write the report's charts into ``out_dir`` (created if needed) and return their paths.

    - ``keypoint_errors.png``: each error's share of the labelled keypoints, per keypoint (stacked bars);
    - ``ap_gains.png``: AP gained by correcting each error type alone and cumulatively (when the
      report has AP figures);
    - ``crowding.png``: each error's share per crowding × labelled-keypoints cell (heatmaps).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = report["summary"]
    figures = [("keypoint_errors.png", _keypoint_errors(summary, Path(report.get("source", "results")).name))]
    if summary.get("ap") and summary["ap"].get("original") is not None:
        figures.append(("ap_gains.png", _ap_gains(summary["ap"])))
    figures.append(("crowding.png", _crowding(summary["crowding"])))
    return [_save(fig, out_dir / name) for name, fig in figures]


def _save(fig: Figure, path: Path) -> Path:
    """Render ``fig`` as a PNG, written atomically to ``path``."""
    FigureCanvasAgg(fig)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        fig.clear()
    return path


def _keypoint_errors(summary: dict, source: str) -> Figure:
    per = summary["per_keypoint"]
    names = list(per)
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for err in ERRORS:
        share = np.array([per[n]["shares"][err] or 0.0 for n in names]) * 100
        ax.bar(x, share, bottom=bottom, color=COLORS[err], label=err, edgecolor="white", linewidth=0.5)
        bottom += share
    labelled = [per[n]["labelled"] for n in names]
    ax.set_xticks(x, [f"{n.replace('_', ' ')}\n(n={c})" for n, c in zip(names, labelled)], rotation=60,
                  ha="right", fontsize=8)
    ax.set_ylabel("share of labelled keypoints (%)")
    ax.set_xlabel("keypoint (n = labelled keypoints of matched detections)")
    k = summary["keypoints"]
    overall = ", ".join(f"{e} {100 * (k['shares'][e] or 0):.1f}%" for e in ERRORS)
    ax.set_title(f"Keypoint errors by joint — {source}\noverall: {overall} of {k['labelled']} keypoints")
    ax.legend(title="error", loc="upper left", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig


def _ap_gains(ap: dict) -> Figure:
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    order = list(ap["cumulative"])
    x = np.arange(len(order))
    width = 0.38
    for offset, kind, label in ((-width / 2, "alone", "corrected alone"),
                                (width / 2, "cumulative", "cumulative (" + " → ".join(order) + ")")):
        gains = np.array([(ap[kind][e]["gain"] or 0.0) for e in order]) * 100
        bars = ax.bar(x + offset, gains, width, color=COLORS[kind], label=label)
        ax.bar_label(bars, fmt="%+.1f", fontsize=8, padding=2)
    ax.set_xticks(x, order)
    ax.set_xlabel("error type corrected (keypoints moved onto their GT joint)")
    ax.set_ylabel("AP gain (points, OKS .50:.95)")
    final = ap["cumulative"][order[-1]]["ap"]
    ax.set_title(f"AP gain per error type: AP {100 * ap['original']:.1f} as is, "
                 f"{100 * final:.1f} with every error corrected")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(loc="upper right", frameon=False)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig


def _crowding_shares(crowding: dict) -> dict:
    """error → (rows, cols) share (%) of labelled keypoints per cell, NaN for empty cells."""
    rows, cols, cells = crowding["overlap_bins"], crowding["visible_bins"], crowding["cells"]
    out = {}
    for err in ERRORS:
        share = np.full((len(rows), len(cols)), np.nan)
        for r, rb in enumerate(rows):
            for c, cb in enumerate(cols):
                if cells[rb][cb]["labelled"]:
                    share[r, c] = 100 * cells[rb][cb][err] / cells[rb][cb]["labelled"]
        out[err] = share
    return out


def _crowding(crowding: dict) -> Figure:
    rows, cols, cells = crowding["overlap_bins"], crowding["visible_bins"], crowding["cells"]
    shares = _crowding_shares(crowding)
    top = max([10.0] + [float(np.nanmax(s)) for s in shares.values() if np.isfinite(s).any()])
    fig = Figure(figsize=(13, 3.2 + 0.5 * len(rows)), layout="constrained")
    axes = fig.subplots(1, len(ERRORS), sharey=True)
    image = None
    for ax, err in zip(axes, ERRORS):
        share = shares[err]
        image = ax.imshow(share, cmap="Reds", vmin=0, vmax=top, aspect="auto")
        for r, rb in enumerate(rows):
            for c, cb in enumerate(cols):
                cell = cells[rb][cb]
                text = f"{share[r, c]:.0f}%\n{cell[err]}/{cell['labelled']}" if cell["labelled"] else "–"
                ax.text(c, r, text, ha="center", va="center", fontsize=7,
                        color="white" if share[r, c] > 0.6 * top else "black")
        ax.set_title(err)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_xlabel("labelled keypoints of the GT")
    axes[0].set_yticks(range(len(rows)), rows)
    axes[0].set_ylabel("overlapping persons")
    fig.colorbar(image, ax=axes, label="share of labelled keypoints (%)", shrink=0.9)
    fig.suptitle("Keypoint errors by crowding × labelled keypoints (count / labelled keypoints per cell)")
    return fig
