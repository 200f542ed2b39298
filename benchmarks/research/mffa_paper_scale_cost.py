"""Cost of MFFA's feature path at the paper's scale, against the backbone that PatchCore and PaDiM run.

Builds MFFA at ``configs/mffa.yaml``'s settings (WideResNet-50 layers 1-3, ``cait_m36_384`` through 11
blocks, 256 px) with random weights (``pre_trained=False``: nothing is downloaded; FLOPs and time do not
depend on the weights) and measures, on one image, torch's ``FlopCounterMode`` GFLOP and the wall time of:

- the backbone up to layer3, which anomalib's PatchCore and PaDiM also run (their scoring comes on top);
- LGFFP on layer1's grid (the paper's, ``grid_layer="layer1"``) and on layer2's grid (the option).

Nothing is trained; the fitted branches (memory-bank search, Mahalanobis distances) are not included.

    python benchmarks/research/mffa_paper_scale_cost.py
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from anomalib_mlff.evaluation.cost import gflop
from anomalib_mlff.models.mffa.torch_model import MFFAModel

PAPER_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mffa.yaml"


def paper_settings() -> dict:
    """MFFAModel arguments from ``configs/mffa.yaml`` (Lightning-only ones dropped), random weights."""
    settings = yaml.safe_load(PAPER_CONFIG.read_text())["model"]["init_args"]
    model_arguments = inspect.signature(MFFAModel).parameters
    return {**{k: v for k, v in settings.items() if k in model_arguments}, "pre_trained": False}


def measure(step: Callable[[], object]) -> tuple[float, float]:
    """GFLOP and seconds of one call (the FLOP pass also warms up)."""
    flops = gflop(step)
    start = time.perf_counter()
    with torch.no_grad():
        step()
    return flops, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    settings = paper_settings()
    model = MFFAModel(**settings).eval()
    image = torch.randn(1, 3, args.image_size, args.image_size)
    with torch.no_grad():
        features = model.feature_extractor(image)
    shallow, middle, deep = (features[layer] for layer in model.layers)

    rows = [("backbone to layer3 (PatchCore and PaDiM run it too)", lambda: model.feature_extractor(image))]
    for grid_layer in model.layers[:2]:
        grid = features[grid_layer].shape[-2:]
        tokens = grid[0] * grid[1]
        name = f"LGFFP on {grid_layer}'s grid ({tokens} tokens of width {model.lgffp.width})"
        rows.append((name, lambda grid=grid: model.lgffp(shallow, middle, deep, grid)))

    print(f"\n{settings['backbone']} + {settings['cait_backbone']} ({settings['cait_blocks']} blocks), "
          f"{args.image_size} px, pre_trained=False, torch_threads={torch.get_num_threads()}\n")
    print("| part | GFLOP/image | s/image |")
    print("|---|---|---|")
    measured = [(name, *measure(step)) for name, step in rows]
    for name, part_gflop, seconds in measured:
        print(f"| {name} | {part_gflop:.1f} | {seconds:.2f} |")
    backbone_gflop = measured[0][1]
    for name, part_gflop, _ in measured[1:]:
        print(f"\n{name}: {part_gflop / backbone_gflop:.1f}x the backbone's GFLOP")


if __name__ == "__main__":
    main()
