"""Markdown tables of :class:`~anomalib_mlff.evaluation.measure.Row` results."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from anomalib_mlff.evaluation.measure import Row

__all__ = ["f2pad_summary", "f2pad_table", "markdown_table"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: ``header`` and one line per row (cells as given, ``str`` applied)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def f2pad_table(rows: Sequence[Row]) -> str:
    """One line per (model, category, protocol): IoU and DICE before/after F2PAD, times, masks kept."""
    header = ("model", "category", "protocol", "images", "IoU before", "IoU after", "gain", "DICE before",
              "DICE after", "gain", "s/img backbone", "s/img F2PAD", "kept backbone mask")
    return markdown_table(header, [
        (r.model, r.category, r.protocol, r.images, f"{r.iou_before:.1f}", f"{r.iou_after:.1f}",
         f"{r.iou_after - r.iou_before:+.1f}", f"{r.dice_before:.1f}", f"{r.dice_after:.1f}",
         f"{r.dice_after - r.dice_before:+.1f}", f"{r.seconds_backbone:.2f}", f"{r.seconds_f2pad:.2f}",
         "-" if math.isnan(r.fallbacks) else f"{int(r.fallbacks)}")
        for r in rows
    ])


def f2pad_summary(rows: Sequence[Row]) -> str:
    """Mean IoU gain per (model, protocol) with its worst category, and the same under ``calibration_veto``.

    ``calibration_veto=True`` keeps the backbone's masks where the calibration saw no gain, so its row
    is each category's gain where the calibration said "refines", 0 elsewhere.
    """
    lines = []
    for model, protocol in sorted({(row.model, row.protocol) for row in rows}):
        selected = [r for r in rows if (r.model, r.protocol) == (model, protocol)]
        gains = [r.iou_after - r.iou_before for r in selected]
        seconds = np.mean([r.seconds_f2pad for r in selected])
        lines.append((model, protocol, f"{np.mean(gains):+.1f}", f"{min(gains):+.1f}", f"{seconds:.2f}"))
        if all(row.refines is not None for row in selected):
            vetoed = [gain if row.refines else 0.0 for gain, row in zip(gains, selected, strict=True)]
            lines.append((f"{model}, calibration_veto", protocol, f"{np.mean(vetoed):+.1f}", f"{min(vetoed):+.1f}",
                          "-"))
    return markdown_table(("model", "protocol", "mean IoU gain", "worst category gain", "s/img F2PAD"), lines)
