"""F2PAD benchmark on the embedded data: how much F2PAD improves anomalib's masks, on two protocols.

Protocols (:mod:`anomalib_mlff.evaluation.protocols`; one MVTec-layout folder each, built
deterministically from the seed; masks exact):

- ``paper`` (F2PAD Sec. IV-A, Eq. 16): normal test images with a flat-colour cut-paste defect in the
  shape of a real defect mask of the category.
- ``realistic``: the embedded data's own defect images (scratch, stain, hole), taken evenly across kinds,
  plus material defects on normal test images (crack, contamination, worn texture, colour shift). None of
  them is drawn by F2PAD's calibration (CutPaste, scar, confetti).

Models: anomalib's PatchCore (resnet18 layers 2+3) and PaDiM (resnet18), random initialisation, 256 px.
Each (model, category) is fitted once (with ``--calibration-images`` the fit ends with F2PAD's calibration, and
the summary adds the ``calibration_veto`` rows); each protocol's test set then sets anomalib's F1-optimal pixel
threshold (the paper's oracle threshold) and is tested with F2PAD disabled (the backbone's mask) and enabled.
Reports IoU/DICE (x100, mean over images) before/after, seconds per image of the test pass, and how many images
the do-no-harm rule kept at the backbone's mask.

    python benchmarks/bench_f2pad.py                         # both categories, both models
    python benchmarks/bench_f2pad.py --categories brick --models PaDiM --paper-images 2 --real-images 2 \\
        --material-images 2
    python benchmarks/bench_f2pad.py --f2pad '{"preset": "paper"}'    # F2PAD settings as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from anomalib_mlff.evaluation.measure import MODELS, fit_and_measure
from anomalib_mlff.evaluation.protocols import build_paper, build_realistic
from anomalib_mlff.evaluation.tables import f2pad_summary, f2pad_table


def main() -> None:
    """Build both protocols per category, fit and measure every model on them, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["brick", "grass"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--paper-images", type=int, default=4, help="cut-paste images per category")
    parser.add_argument("--real-images", type=int, default=4, help="embedded defect images per category")
    parser.add_argument("--material-images", type=int, default=4, help="material defect images per category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-images", type=int, help="F2PAD's calibration_images (default: its own)")
    parser.add_argument("--f2pad", type=json.loads, default={}, help="F2PAD arguments as a JSON object")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    f2pad = dict(args.f2pad)
    if args.calibration_images is not None:
        f2pad["calibration_images"] = args.calibration_images
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for category in args.categories:
            roots = {"paper": out / "paper", "realistic": out / "realistic"}
            build_paper(roots["paper"], category, args.paper_images, args.seed)
            build_realistic(roots["realistic"], category, args.real_images, args.material_images, args.seed)
            for name in args.models:
                new_rows, model = fit_and_measure(name, category, roots, args.seed, out / "results", f2pad)
                rows.extend(new_rows)
                calibration = model.post_processor.calibration
                if calibration:
                    best = max(score for _, score in calibration["trials"])
                    print(f"{name} {category}: calibration {calibration['weights']}, IoU on synthetic defects "
                          f"{100 * calibration['initial_iou']:.1f} -> {100 * best:.1f}, "
                          f"refines: {calibration['refines']}", file=sys.stderr, flush=True)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}, "
          f"seed {args.seed}, F2PAD arguments {f2pad or 'defaults'}")
    rows.sort(key=lambda r: (r.model, r.protocol, r.category))
    print(f2pad_table(rows))
    print()
    print(f2pad_summary(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))


if __name__ == "__main__":
    main()
