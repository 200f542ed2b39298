"""Per-image do-no-harm rules applied offline to f2pad_sweep.py records refined with every result trusted.

Each rule keeps the backbone's mask unless it holds; it sees only inference-time quantities: ``explained``
(F2PAD's own rule), the IoU between the initial and the refined mask, and their area ratio. Prints the mean IoU
gain over categories (worst category) and the number of images kept at the backbone's mask, per model and
protocol. The last row is no rule but the bound on all of them: each image's better mask, by the ground truth.

    python benchmarks/f2pad_sweep.py run trust_brick '{"min_explained": 0, "max_unexplained_area": null}' --categories brick
    python benchmarks/f2pad_sweep.py run trust_grass '{"min_explained": 0, "max_unexplained_area": null}' --categories grass
    python benchmarks/f2pad_trust_rules.py trust_brick trust_grass
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from f2pad_sweep import OUT, iou  # noqa: E402

Rule = Callable[[dict], bool]
RULES: dict[str, Rule] = {
    "trust all": lambda r: True,
    **{f"explained >= {t}": (lambda t: lambda r: r["explained"] >= t)(t) for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)},
    **{f"explained >= 0.5, agreement >= {a}": (lambda a: lambda r: r["explained"] >= 0.5 and r["agreement"] >= a)(a)
       for a in (0.2, 0.3, 0.4)},
    **{f"explained >= 0.5, area ratio >= {q}": (lambda q: lambda r: r["explained"] >= 0.5 and r["ratio"] >= q)(q)
       for q in (0.3, 0.5)},
}
#: Not a rule (it reads the ground truth): the better of the two masks per image, the bound every rule stays under.
ORACLE: dict[str, Rule] = {"bound: better mask per image (ground truth)": lambda r: r["iou_after"] >= r["iou_before"]}
MASK_THRESHOLD = 0.1  # the sweep's mask_threshold: refined mask = |A| (median-filtered, as stored) above it


def records(tags: list[str]) -> list[dict]:
    """The sweep's per-image records with the agreement and area ratio of the initial and refined masks."""
    caches: dict[tuple[str, str], dict] = {}
    rows = []
    for tag in tags:
        for record in torch.load(OUT / f"run_{tag}.pt"):
            key = (record["model"], record["category"])
            if key not in caches:
                caches[key] = torch.load(OUT / f"{key[0]}_{key[1]}.pt")
            initial = caches[key][record["protocol"]][record["index"]]["initial"].numpy().astype(bool)
            refined = np.asarray(record["magnitude"], np.float32) > MASK_THRESHOLD
            ratio = refined.sum() / max(initial.sum(), 1)
            rows.append({**record, "agreement": iou(initial, refined), "ratio": ratio})
    return rows


def apply(rule: Rule, rows: list[dict]) -> dict[tuple[str, str], str]:
    """Per (model, protocol): mean gain over categories, the worst category's, and the images kept."""
    groups: dict[tuple[str, str, str], list[tuple[float, float, bool]]] = defaultdict(list)
    for row in rows:
        trusted = rule(row)
        after = row["iou_after"] if trusted else row["iou_before"]
        groups[(row["model"], row["protocol"], row["category"])].append((row["iou_before"], after, not trusted))
    result = {}
    for model, protocol in sorted({(m, p) for m, p, _ in groups}):
        cells = [cells for (m, p, _), cells in groups.items() if (m, p) == (model, protocol)]
        gains = [100 * (np.mean([a for _, a, _ in c]) - np.mean([b for b, _, _ in c])) for c in cells]
        kept = sum(k for c in cells for _, _, k in c)
        result[(model, protocol)] = f"{np.mean(gains):+.1f} ({min(gains):+.1f}) fb{kept}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tags", nargs="+", help="f2pad_sweep.py run tags refined with min_explained=0")
    rows = records(parser.parse_args().tags)
    columns = sorted({(row["model"], row["protocol"]) for row in rows})
    print("| rule | " + " | ".join(f"{m} {p}" for m, p in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, rule in {**RULES, **ORACLE}.items():
        cells = apply(rule, rows)
        print(f"| {name} | " + " | ".join(cells[c] for c in columns) + " |")
    print("\nimages losing more than 3 IoU with every refinement trusted:")
    for row in rows:
        change = 100 * (row["iou_after"] - row["iou_before"])
        if change < -3:
            print(f"{row['model']} {row['category']} {row['protocol']} {row['index']}: {change:+.1f}, "
                  f"explained {row['explained']:.2f}, agreement {row['agreement']:.2f}, ratio {row['ratio']:.2f}")


if __name__ == "__main__":
    main()
