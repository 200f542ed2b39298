"""Train and test MLFF, MFFA, anomalib's Patchcore, FaissPatchcore and anomalib's Padim on one datamodule.

All models use the same backbone and the same random initialisation (``seed_everything``
before each model is built; ``pre_trained=False`` by default, since no ImageNet weights can be
downloaded here), the same evaluator and no visualiser. Prints one table: image AUROC, pixel
AUROC, PRO (anomalib's AUPRO), fit seconds, test milliseconds per image (anomalib's
``Engine.test``: data loading, pre-processing, the model, post-processing and the metrics),
model milliseconds per image (the torch model's forward alone on the pre-processed test images,
batch 16, best of 3 passes) and the model's GFLOP per image (torch's ``FlopCounterMode``). A
checksum of each backbone's first convolution before training shows that the initialisations agree.

MFFA runs at the settings of ``configs/mffa_cpu.yaml`` (resnet18 + cait_xxs24_224, 2 PSG epochs,
100 Gaussian dimensions). ``--ablations`` adds MFFA's ablation rows (paper Tables 1 and 2:
NNS only / Gaussian only / AMC, with and without PSG, with and without LGFFP) as a second table.

    python benchmarks/compare_models.py                       # embedded "brick" data, all five models
    python benchmarks/compare_models.py --models MFFA Patchcore --ablations
    python benchmarks/compare_models.py --models --ablations  # the ablation table alone
    python benchmarks/compare_models.py --category grass --mlff-epochs 10
    python benchmarks/compare_models.py --datamodule-root ./datasets/MVTecAD --category bottle --image-size 256
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Padim, Patchcore
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from torch.utils.flop_counter import FlopCounterMode

from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.demo import demo_evaluator
from anomalib_mlff.models.faiss_patchcore import FaissPatchcore
from anomalib_mlff.models.mffa import MFFA
from anomalib_mlff.models.mlff import MLFF

MODELS = ("MLFF", "MFFA", "Patchcore", "FaissPatchcore", "Padim")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MFFA_CPU_CONFIG = CONFIGS / "mffa_cpu.yaml"

#: MFFA ablation rows: the paper's Table 1 (branches) and Table 2 (PSG, LGFFP) switches; NNS does not use
#: LGFFP. The last row is not in the paper: LGFFP and the Gaussians on layer2's grid (a quarter of the tokens).
_OFF = {"use_psg": False, "use_lgffp": False}
ABLATIONS: tuple[tuple[str, dict], ...] = (
    ("NNS only", {**_OFF, "use_gaussian": False}),
    ("Gaussian only", {**_OFF, "use_nns": False}),
    ("AMC (NNS x Gaussian)", _OFF),
    ("Gaussian only + LGFFP", {"use_psg": False, "use_nns": False}),
    ("AMC + LGFFP", {"use_psg": False}),
    ("NNS only + PSG", {"use_lgffp": False, "use_gaussian": False}),
    ("Gaussian only + PSG", {"use_lgffp": False, "use_nns": False}),
    ("AMC + PSG", {"use_lgffp": False}),
    ("Gaussian only + PSG + LGFFP", {"use_nns": False}),
    ("AMC + PSG + LGFFP (MFFA)", {}),
    ("MFFA, grid_layer=layer2 (not in the paper)", {"grid_layer": "layer2"}),
)


@dataclass
class Result:
    """One table row."""

    name: str
    image_auroc: float
    pixel_auroc: float
    pro: float
    fit_seconds: float
    test_ms_per_image: float
    model_ms_per_image: float
    model_gflop_per_image: float
    backbone_checksum: float


def backbone_checksum(model: AnomalibModule) -> float:
    """Sum of the backbone's first convolution weights (equal sums: equal initialisations)."""
    for name, parameter in model.model.named_parameters():
        if "feature_extractor" in name and name.endswith("conv1.weight"):
            return float(parameter.detach().double().sum())
    return float("nan")


def preprocessed_test_batches(model: AnomalibModule, datamodule: MVTecAD) -> list[torch.Tensor]:
    """The test images as the torch model sees them (after the model's pre-processor)."""
    transform = model.pre_processor.transform
    return [transform(batch.image) for batch in datamodule.test_dataloader()]


def model_ms_per_image(model: AnomalibModule, batches: list[torch.Tensor], repeats: int = 3) -> float:
    """Forward time of the torch model alone on the pre-processed test ``batches`` (best of ``repeats``)."""
    count = sum(len(batch) for batch in batches)
    network = model.model.eval()
    best = float("inf")
    with torch.no_grad():
        network(batches[0])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                network(batch)
            best = min(best, time.perf_counter() - start)
    return 1000 * best / count


def model_gflop_per_image(model: AnomalibModule, image: torch.Tensor) -> float:
    """GFLOP of the torch model's forward on one pre-processed ``(1, C, H, W)`` image (``FlopCounterMode``).

    Counts convolutions and matrix products; FAISS searches (FaissPatchcore, MFFA's NNS branch) run
    outside torch and are not counted.
    """
    return gflop(lambda: model.model.eval()(image))


def gflop(step: Callable[[], object]) -> float:
    """GFLOP of one call without autograd (torch's ``FlopCounterMode``: convolutions and matrix products)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        step()
    return counter.get_total_flops() / 1e9


def run(
    name: str, build: Callable[[], AnomalibModule], datamodule: MVTecAD, epochs: int | None, seed: int, out: Path
) -> Result:
    """Fit and test one model, timing both phases (``epochs=None``: the model's own default epochs)."""
    seed_everything(seed, workers=True)
    model = build()
    checksum = backbone_checksum(model)
    extra = {} if epochs is None else {"max_epochs": epochs}
    folder = out / re.sub(r"[^A-Za-z0-9]+", "_", name)
    engine = Engine(default_root_dir=folder, logger=False, enable_progress_bar=False, **extra)
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
    test_seconds = time.perf_counter() - start
    batches = preprocessed_test_batches(model, datamodule)
    result = Result(
        name=name,
        image_auroc=metrics["image_AUROC"],
        pixel_auroc=metrics["pixel_AUROC"],
        pro=metrics["pixel_AUPRO"],
        fit_seconds=fit_seconds,
        test_ms_per_image=1000 * test_seconds / len(datamodule.test_data),
        model_ms_per_image=model_ms_per_image(model, batches),
        model_gflop_per_image=model_gflop_per_image(model, batches[0][:1]),
        backbone_checksum=checksum,
    )
    print(f"{name}: {result}", flush=True)
    return result


def config_init_args(config: Path) -> dict:
    """The ``model.init_args`` of a config file."""
    return yaml.safe_load(config.read_text())["model"]["init_args"]


def mffa_cpu_settings() -> dict:
    """MFFA's init_args from ``configs/mffa_cpu.yaml`` without its pre-processor (built here for the image size)."""
    settings = config_init_args(MFFA_CPU_CONFIG)
    settings.pop("pre_processor", None)
    return settings


def print_table(rows: list[Result], first_column: str = "model") -> None:
    columns = "image AUROC | pixel AUROC | PRO | fit s | test ms/image | model ms/image | GFLOP/image"
    print(f"| {first_column} | {columns} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.image_auroc:.3f} | {r.pixel_auroc:.3f} | {r.pro:.3f} | {r.fit_seconds:.1f} | "
              f"{r.test_ms_per_image:.1f} | {r.model_ms_per_image:.1f} | {r.model_gflop_per_image:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datamodule-root", type=Path, default=EMBEDDED_ROOT)
    parser.add_argument("--category", default="brick")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--pre-trained", action="store_true")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS),
                        help="models of the main table (default: all; none: only the ablations)")
    parser.add_argument("--ablations", action="store_true", help="also run MFFA's ablation rows (second table)")
    parser.add_argument("--mlff-epochs", type=int, default=6)
    parser.add_argument("--mlff-repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args()

    size = (args.image_size, args.image_size)
    backbone = {"backbone": args.backbone, "pre_trained": args.pre_trained}

    def common() -> dict:
        """Backbone settings and fresh components: the same evaluator (metrics), no visualiser."""
        return {**backbone, "evaluator": demo_evaluator(), "visualizer": False}

    def mffa(**switches: object) -> MFFA:
        pre_processor = MFFA.configure_pre_processor(image_size=size)
        return MFFA(**{**mffa_cpu_settings(), **common(), "pre_processor": pre_processor, **switches})

    def patchcore_pre() -> dict:
        return {"pre_processor": Patchcore.configure_pre_processor(image_size=size, center_crop_size=size)}

    builders: dict[str, tuple[Callable[[], AnomalibModule], int | None]] = {
        "MLFF": (
            lambda: MLFF(
                **common(),
                feature_dim=128,
                tem_levels=32,
                repeat=args.mlff_repeat,
                epochs=args.mlff_epochs,
                learning_rate=0.01,
                pre_processor=MLFF.configure_pre_processor(image_size=size),
            ),
            None,  # the model's `epochs`
        ),
        "MFFA": (mffa, None),  # psg_epochs + 1 epochs, set by the model
        "Patchcore": (lambda: Patchcore(**common(), coreset_sampling_ratio=0.1, **patchcore_pre()), 1),
        "FaissPatchcore": (lambda: FaissPatchcore(**common(), coreset_sampling_ratio=0.1, **patchcore_pre()), 1),
        "Padim": (lambda: Padim(**common(), pre_processor=Padim.configure_pre_processor(image_size=size)), 1),
    }

    def datamodule() -> MVTecAD:
        return MVTecAD(
            root=args.datamodule_root, category=args.category, train_batch_size=16, eval_batch_size=16, num_workers=0
        )

    rows = []
    for name in (name for name in MODELS if name in args.models):
        build, epochs = builders[name]
        rows.append(run(name, build, datamodule(), epochs, args.seed, args.output))
    ablation_rows = []
    if args.ablations:
        for name, switches in ABLATIONS:
            ablation_rows.append(
                run(name, lambda s=switches: mffa(**s), datamodule(), None, args.seed, args.output / "mffa_ablations")
            )

    header = (f"backbone={args.backbone} pre_trained={args.pre_trained} image_size={args.image_size} "
              f"category={args.category} seed={args.seed} torch_threads={torch.get_num_threads()}")
    print(f"\n{header}\n")
    if rows:
        print_table(rows)
        by_name = {r.name: r for r in rows}
        if "MFFA" in by_name and "Patchcore" in by_name:
            mffa_row, patchcore_row = by_name["MFFA"], by_name["Patchcore"]
            test_ratio = mffa_row.test_ms_per_image / patchcore_row.test_ms_per_image
            model_ratio = mffa_row.model_ms_per_image / patchcore_row.model_ms_per_image
            print(f"\nMFFA / Patchcore: test ms/image {test_ratio:.2f}x, model ms/image {model_ratio:.2f}x")
        print("\nbackbone checksums before training: "
              + ", ".join(f"{r.name} {r.backbone_checksum:.6f}" for r in rows))
    if ablation_rows:
        print(f"\nMFFA ablations ({MFFA_CPU_CONFIG.name} settings, switches as named)\n")
        print_table(ablation_rows, "MFFA variant")
    args.output.mkdir(parents=True, exist_ok=True)
    summary = {"settings": header, "models": [asdict(r) for r in rows], "ablations": [asdict(r) for r in ablation_rows]}
    (args.output / "compare_models.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
