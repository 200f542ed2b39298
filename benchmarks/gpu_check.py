"""Every GPU path of the project in one run of at most about 8 minutes, with one table at the end.

    python benchmarks/gpu_check.py                  # a CUDA machine online: faiss GPU wheels from PyPI
    python benchmarks/gpu_check.py --wheels DIR     # offline: the faiss GPU wheels (and their needs) in DIR
    python benchmarks/gpu_check.py --dry-run        # anywhere: what it would run, nothing installed or run
    python benchmarks/gpu_check.py --smoke          # tiny sizes on whatever device there is (CPU here)

1. faiss: each candidate GPU wheel is installed into a folder of its own (the environment's faiss-cpu is
   never touched, so nothing needs restoring) and kept only if a ``GpuIndexFlatL2`` search runs on the GPU
   and finds what it should. Importing faiss or counting GPUs is not enough: a wheel built for older chips
   imports and counts the GPU, then fails at its first kernel.
2. The checks then run in a child interpreter that sees the chosen wheel, each in a time budget
   (``--budget-s``), most important first: exact FAISS search on the GPU against the CPU; IVF and fp16
   indexes on the GPU; FaissPatchcore, MFFA, MLFF, PatchCore and PaDiM fitted and tested on the GPU
   (anomalib's Engine, embedded brick data at 256 px), each with F2PAD attached, so F2PAD then refines a
   few test images with every registered scorer on CUDA (s/image, IoU before and after); the greedy
   coreset on CUDA against anomalib's ``KCenterGreedy``; a DDP fit where there are several GPUs.

Without CUDA (and without ``--smoke``) it stops at once with exit status 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NO_CUDA_EXIT = 2
ROW_PREFIX = "GPU_CHECK_ROW "
MODEL_SECONDS = 25.0  # the least time a model's fit, test and refinement can take on a GPU

#: faiss GPU wheels by the CUDA major version of torch's runtime, first choice first. A CUDA 13 driver also
#: runs CUDA 12 builds when their own runtime libraries (pip's nvidia-*-cu12 wheels) are installed.
FAISS_GPU_WHEELS: dict[str, tuple[str, ...]] = {
    "13": ("faiss-gpu-cuvs", "faiss-gpu-cu13-cuvs", "faiss-cuda", "faiss-gpu-cu12-cuvs", "faiss-gpu", "faiss-gpu-cu12"),
    "12": ("faiss-cuda", "faiss-gpu-cu12-cuvs", "faiss-gpu", "faiss-gpu-cu12"),
    "11": ("faiss-gpu-cu11",),
}

#: runs in a fresh interpreter: a search on the GPU that must find each vector itself.
KERNEL_PROBE = """
import faiss, numpy as np
vectors = np.random.default_rng(0).standard_normal((512, 64)).astype("float32")
index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), 64)
index.add(vectors)
_, found = index.search(vectors, 1)
assert (found[:, 0] == np.arange(512)).all(), "GpuIndexFlatL2 returned wrong neighbours"
print(faiss.__version__)
"""


@dataclass
class Check:
    """One row group of the table: its name, what it runs, a time estimate used against the budget, and what makes
    it pointless on this machine whatever the budget (a reason, or ``None`` where it can run)."""

    name: str
    what: str
    seconds: float
    run: Callable[[Path, bool, float], list[tuple[str, str, str]]]  # (root, smoke, deadline) -> rows
    cannot_run: Callable[[], str | None] = lambda: None


# ----------------------------------------------------------------------------------------------------------
# faiss wheel choice


def wheel_candidates(cuda_major: str, wheels: Path | None) -> list[str]:
    """Requirement names or wheel files to try, first choice first (faiss-cpu is never a candidate)."""
    names = list(FAISS_GPU_WHEELS.get(cuda_major, ()))
    if wheels is None:
        return names
    files = [path for path in sorted(wheels.glob("faiss*.whl")) if not path.name.startswith("faiss_cpu")]

    def rank(path: Path) -> int:
        project = path.name.split("-")[0].replace("_", "-")
        return names.index(project) if project in names else len(names)

    return [str(path) for path in sorted(files, key=rank)]


def probe_kernel(site: Path | None) -> tuple[bool, str]:
    """Whether faiss (from ``site`` first, if given) runs a GPU search; its version or the error's last line."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", KERNEL_PROBE], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode == 0:
        return True, result.stdout.strip()
    lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
    return False, lines[-1][:160]


def install_into(candidate: str, site: Path, wheels: Path | None) -> tuple[bool, str]:
    """pip-install one candidate into its own folder; with local wheels, fall back to ``--no-deps``.

    Offline, a wheel's CUDA libraries may already be on the machine under other package names, so a
    failed dependency resolution is not a verdict: the kernel probe decides.
    """
    base = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(site)]
    if wheels is not None:
        base += ["--no-index", "--find-links", str(wheels)]
    attempts = [base + [candidate]] + ([base + ["--no-deps", candidate]] if wheels is not None else [])
    error = ""
    for command in attempts:
        shutil.rmtree(site, ignore_errors=True)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)  # noqa: S603
        if result.returncode == 0:
            return True, "" if "--no-deps" not in command else "installed without its dependencies"
        error = (result.stderr.strip().splitlines() or ["pip failed"])[-1][:160]
    return False, error


def choose_faiss(cuda_major: str, wheels: Path | None, root: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """The folder of the first wheel whose GPU kernel runs (``None``: none), and one verdict per candidate."""
    works, detail = probe_kernel(None)
    if works:
        return None, [("installed faiss", f"GPU kernel runs (faiss {detail})")]
    verdicts = [("installed faiss", f"no GPU kernel: {detail}")]
    candidates = wheel_candidates(cuda_major, wheels)
    if not candidates:
        where = f"in {wheels}" if wheels is not None else f"known for CUDA {cuda_major or '(none)'}"
        verdicts.append(("GPU wheels", f"no faiss GPU wheel {where}: searches fall back to torch on the GPU"))
    for candidate in candidates:
        label = Path(candidate).name if wheels is not None else candidate
        site = root / f"faiss-{len(verdicts)}"
        installed, note = install_into(candidate, site, wheels)
        if not installed:
            verdicts.append((label, f"not installed: {note}"))
            continue
        works, detail = probe_kernel(site)
        verdicts.append((label, f"GPU kernel runs (faiss {detail}){'; ' + note if note else ''}" if works
                         else f"no GPU kernel: {detail}"))
        if works:
            return site, verdicts
    return None, verdicts


# ----------------------------------------------------------------------------------------------------------
# the checks (run in the child interpreter)


def _device() -> str:
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def _timed(function: Callable[[], object], device: str, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, the device synchronised around each, and the last result."""
    import torch  # noqa: PLC0415

    best, result = float("inf"), None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def check_search(_root: Path, smoke: bool, _deadline: float = float("inf")) -> list[tuple[str, str, str]]:
    """Exact FAISS search of a PatchCore-sized bank on the device against the same search on the CPU."""
    import torch  # noqa: PLC0415

    from anomalib_mlff import FaissMemoryBank  # noqa: PLC0415
    from anomalib_mlff.components.memory_bank import faiss_gpu_available  # noqa: PLC0415

    device = _device()
    rows, queries_n, dim = (2_000, 512, 64) if smoke else (20_000, 16_384, 1536)
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(rows, dim, generator=generator), torch.randn(queries_n, dim, generator=generator)
    cpu_s, (_, cpu_found) = _timed(lambda: FaissMemoryBank().set_memory(bank).search(queries, 9), "cpu")
    on_device = FaissMemoryBank().set_memory(bank).to(device)
    device_queries = queries.to(device)
    on_device.search(device_queries[:64], 9)  # builds the index
    seconds, (_, found) = _timed(lambda: on_device.search(device_queries, 9), device, repeats=3)
    agree = float((found[:, 0].cpu() == cpu_found[:, 0]).float().mean())
    on_gpu = "faiss-gpu" if faiss_gpu_available() else "torch on the GPU (no faiss-gpu)"
    engine = on_gpu if device == "cuda" else "CPU"
    return [(f"exact search {queries_n} x {rows} x {dim}, k=9", f"{engine} {seconds:.3f} s vs CPU {cpu_s:.3f} s",
             f"{cpu_s / seconds:.1f}x, nearest agrees on {agree:.4f}")]


def check_approximate(_root: Path, smoke: bool, _deadline: float = float("inf")) -> list[tuple[str, str, str]]:
    """IVF flat and IVF fp16 on the device: recall@1 against exact search, and time."""
    import torch  # noqa: PLC0415

    from anomalib_mlff import FaissMemoryBank  # noqa: PLC0415
    from anomalib_mlff.components.memory_bank import faiss_gpu_available  # noqa: PLC0415

    device = _device()
    rows, queries_n, dim = (4_000, 512, 64) if smoke else (50_000, 16_384, 1536)
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(rows, dim, generator=generator), torch.randn(queries_n, dim, generator=generator)
    queries = queries.to(device)  # once: the timed searches below leave the transfer out, as check_search does
    _, (_, exact) = _timed(lambda: FaissMemoryBank().set_memory(bank).to(device).search(queries, 1), device)
    engine = "faiss-gpu" if device == "cuda" and faiss_gpu_available() else "faiss CPU index (no faiss-gpu)"
    result = []
    for fp16 in (False, True):
        index = FaissMemoryBank(approximate=True, index_type="ivf", fp16=fp16, nprobe=16, seed=0)
        index.set_memory(bank).to(device)
        build_s, _ = _timed(lambda index=index: index.search(queries[:64], 1), device)
        seconds, (_, found) = _timed(lambda index=index: index.search(queries, 1), device, repeats=3)
        recall = float((found[:, 0].cpu() == exact[:, 0].cpu()).float().mean())
        result.append((f"IVF{' fp16' if fp16 else ''} nprobe 16, {queries_n} x {rows} x {dim}",
                       f"{engine} {seconds:.3f} s (build {build_s:.1f} s)", f"recall@1 {recall:.3f}"))
    return result


def _small_mvtec(root: Path, defects_per_kind: int, good: int) -> Path:
    """The embedded brick category with every training image and a few test images (F2PAD's subset)."""
    from anomalib_mlff.data import EMBEDDED_ROOT  # noqa: PLC0415

    source, target = EMBEDDED_ROOT / "brick", root / "brick"
    shutil.copytree(source / "train", target / "train")
    for kind in sorted(path.name for path in (source / "test").iterdir()):
        count = good if kind == "good" else defects_per_kind
        (target / "test" / kind).mkdir(parents=True)
        for image in sorted((source / "test" / kind).glob("*.png"))[:count]:
            shutil.copy(image, target / "test" / kind / image.name)
            mask = source / "ground_truth" / kind / f"{image.stem}_mask.png"
            if mask.exists():
                (target / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, target / "ground_truth" / kind / mask.name)
    return root


def _models(smoke: bool) -> dict[str, Callable[[object, object], object]]:
    """Each model with a registered F2PAD scorer, papers' backbones unless smoke; (pre_processor, F2PAD) -> model."""
    from anomalib.models import Padim, Patchcore  # noqa: PLC0415

    from anomalib_mlff import MFFA, MLFF, FaissPatchcore  # noqa: PLC0415

    wide = "resnet18" if smoke else "wide_resnet50_2"
    common = {"pre_trained": False, "visualizer": False}
    mffa_args = {"backbone": "resnet18", "cait_backbone": "cait_xxs24_224", "cait_blocks": 2,
                 "n_gaussian_features": 64} if smoke else {}
    return {
        f"FaissPatchcore ({wide})": lambda pre, post: FaissPatchcore(
            backbone=wide, pre_processor=pre, post_processor=post, **common),
        f"MFFA ({'smoke' if smoke else 'wide_resnet50_2 + cait_m36_384'})": lambda pre, post: MFFA(
            psg_epochs=1, pre_processor=pre, post_processor=post, **mffa_args, **common),
        f"MLFF ({'resnet18' if smoke else 'resnet50'})": lambda pre, post: MLFF(
            backbone="resnet18" if smoke else "resnet50", epochs=1, repeat=1, pre_processor=pre,
            post_processor=post, **common),
        f"PatchCore ({wide})": lambda pre, post: Patchcore(
            backbone=wide, pre_processor=pre, post_processor=post, **common),
        f"PaDiM ({wide})": lambda pre, post: Padim(
            backbone=wide, n_features=550 if not smoke else None, pre_processor=pre, post_processor=post, **common),
    }


def _iou(predictions: list) -> tuple[float, float, int]:
    """Mean IoU (%) of the initial and the refined masks against the ground truth, over defective images."""
    import torch  # noqa: PLC0415

    before, after = [], []
    for batch in predictions:
        for initial, refined, truth in zip(batch.initial_mask, batch.pred_mask, batch.gt_mask, strict=True):
            truth = truth.bool().squeeze()
            if not truth.any():
                continue
            for masks, mask in ((before, initial), (after, refined)):
                mask = mask.bool().squeeze().cpu()
                masks.append(float((mask & truth.cpu()).sum() / (mask | truth.cpu()).sum().clamp(min=1)))
    mean = lambda values: 100 * float(torch.tensor(values).mean()) if values else float("nan")  # noqa: E731
    return mean(before), mean(after), len(after)


def check_models(root: Path, smoke: bool, deadline: float = float("inf")) -> list[tuple[str, str, str]]:
    """Fit and test each model on the device with F2PAD attached, then let F2PAD refine a few images.

    Models are skipped (and say so) once fewer than ``MODEL_SECONDS`` are left before ``deadline``.
    """
    import torch  # noqa: PLC0415
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from anomalib.models import Patchcore  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_mlff import F2PAD  # noqa: PLC0415
    from anomalib_mlff.data import EMBEDDED_ROOT  # noqa: PLC0415

    device = _device()
    size = 64 if smoke else 256
    subset = _small_mvtec(root / "f2pad_subset", defects_per_kind=1 if smoke else 2, good=0)
    f2pad_args = {"max_iterations": 2, "reestimation_iterations": 1, "calibration_images": 1} if smoke else {}
    rows = []
    for name, build in _models(smoke).items():
        if deadline - time.perf_counter() < MODEL_SECONDS:
            rows.append((name, "skipped", "the time budget ran out"))
            continue
        try:
            seed_everything(0)
            pre = Patchcore.configure_pre_processor(image_size=(size, size))
            model = build(pre, F2PAD(**f2pad_args))
            engine = Engine(default_root_dir=root / "runs", logger=False, enable_progress_bar=False,
                            accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                            **({"limit_train_batches": 1} if smoke else {}))
            data = MVTecAD(root=EMBEDDED_ROOT, category="brick", train_batch_size=16, eval_batch_size=16,
                           num_workers=0)
            fit_s, _ = _timed(lambda: engine.fit(model, datamodule=data), device)
            model.post_processor.enabled = False
            test_s, metrics = _timed(lambda: engine.test(model, datamodule=data, verbose=False), device)
            count = len(data.test_data)
            model.post_processor.enabled = True
            small = MVTecAD(root=subset, category="brick", eval_batch_size=8, num_workers=0)
            f2pad_s, predictions = _timed(lambda: engine.predict(model, datamodule=small), device)
            before, after, refined = _iou(predictions)
            image_auroc = metrics[0].get("image_AUROC", float("nan"))
            pixel_auroc = metrics[0].get("pixel_AUROC", float("nan"))
            timing = f"fit {fit_s:.1f} s, test {1000 * test_s / count:.1f} ms/image"
            rows.append((f"{name} fit + test, {size} px", timing,
                         f"image AUROC {image_auroc:.3f}, pixel AUROC {pixel_auroc:.3f} ({count} images)"))
            rows.append((f"F2PAD on {name}", f"{f2pad_s / max(refined, 1):.2f} s/image",
                         f"IoU {before:.1f} -> {after:.1f} on {refined} defective images"))
        except Exception as error:  # noqa: BLE001 - one broken model must not hide the others
            rows.append((f"{name}", "FAILED", _last_line(error)))
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def check_coreset(_root: Path, smoke: bool, _deadline: float = float("inf")) -> list[tuple[str, str, str]]:
    """The project's greedy coreset on the device against anomalib's ``KCenterGreedy`` on the same device."""
    import torch  # noqa: PLC0415
    from anomalib.models.components import KCenterGreedy  # noqa: PLC0415

    from anomalib_mlff import greedy_coreset  # noqa: PLC0415
    from anomalib_mlff.evaluation.cost import coverage_radius  # noqa: PLC0415

    device = _device()
    rows, dim = (2_000, 64) if smoke else (40_000, 1536)
    embeddings = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)).to(device)

    def radius(indices: object) -> float:
        return coverage_radius(embeddings, torch.as_tensor(indices).to(device))

    torch.manual_seed(0)
    theirs_s, theirs = _timed(lambda: KCenterGreedy(embedding=embeddings, sampling_ratio=0.1).select_coreset_idxs(),
                              device)
    ours_s, ours = _timed(lambda: greedy_coreset(embeddings, 0.1, seed=0, progress=False), device)
    ratio = radius(ours) / radius(theirs)
    return [(f"coreset 10% of {rows} x {dim}", f"ours {ours_s:.2f} s vs anomalib {theirs_s:.2f} s",
             f"{theirs_s / ours_s:.1f}x, radius ratio {ratio:.3f}")]


def ddp_cannot_run() -> str | None:
    """Why the DDP check cannot run here (fewer than two GPUs), or ``None``."""
    import torch  # noqa: PLC0415

    gpus = torch.cuda.device_count()
    return None if gpus >= 2 else f"{gpus} GPU visible; DDP needs two (tests/test_ddp.py runs it on CPU, gloo)"


def check_ddp(root: Path, smoke: bool, _deadline: float = float("inf")) -> list[tuple[str, str, str]]:
    """A DDP fit of FaissPatchcore over every visible GPU (Lightning launches the ranks)."""
    result = subprocess.run(  # noqa: S603
        [sys.executable, __file__, "--ddp-child", str(root)], capture_output=True, text=True, check=False, timeout=600
    )
    line = next((line for line in result.stdout.splitlines() if line.startswith("DDP_SECONDS")), None)
    if line is None:
        raise RuntimeError(result.stderr[-1500:])
    _, seconds, world = line.split()
    return [("DDP fit FaissPatchcore", f"{seconds} s", f"{world} GPUs")]


def ddp_child(root: Path) -> None:
    """One FaissPatchcore fit with DDP over every visible GPU; rank 0 prints its seconds."""
    from anomalib.engine import Engine  # noqa: PLC0415

    from anomalib_mlff import FaissPatchcore  # noqa: PLC0415
    from anomalib_mlff.data import embedded_datamodule  # noqa: PLC0415

    engine = Engine(default_root_dir=root / "ddp", logger=False, enable_progress_bar=False, accelerator="gpu",
                    devices=-1, strategy="ddp")
    start = time.perf_counter()
    engine.fit(FaissPatchcore(pre_trained=False, visualizer=False), datamodule=embedded_datamodule("brick"))
    if engine.trainer.global_rank == 0:
        print(f"DDP_SECONDS {time.perf_counter() - start:.1f} {engine.trainer.world_size}")


CHECKS = (
    Check("faiss search", "exact search, device vs CPU", 30, check_search),
    Check("faiss IVF", "IVF flat and IVF fp16 on the device: recall@1, time", 40, check_approximate),
    Check("coreset", "greedy coreset vs anomalib KCenterGreedy on the device", 40, check_coreset),
    Check("models + F2PAD", "FaissPatchcore, MFFA, MLFF, PatchCore, PaDiM: fit, test, F2PAD refine", 120, check_models),
    Check("DDP", "FaissPatchcore DDP fit over every visible GPU", 60, check_ddp, ddp_cannot_run),
)


def _last_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[-1][:200]}"


def run_checks(root: Path, smoke: bool, budget_s: float) -> None:
    """Run the checks in order within the budget; print each row as soon as it exists (the parent collects them)."""
    start = time.perf_counter()
    for check in CHECKS:
        left = budget_s - (time.perf_counter() - start)
        reason = check.cannot_run()
        if reason is not None:
            print(ROW_PREFIX + json.dumps([check.name, "not run", reason]), flush=True)
            continue
        if left < check.seconds:
            reason = f"{left:.0f} s of the budget left, needs ~{check.seconds:.0f}"
            print(ROW_PREFIX + json.dumps([check.name, "skipped", reason]), flush=True)
            continue
        began = time.perf_counter()
        try:
            rows = check.run(root, smoke, start + budget_s)
        except Exception as error:  # noqa: BLE001 - one broken path must not hide the others
            rows = [(check.name, "FAILED", _last_line(error))]
        for row in rows:
            print(ROW_PREFIX + json.dumps(list(row)), flush=True)
        print(f"[{check.name}: {time.perf_counter() - began:.0f} s]", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# the parent


def dry_run(cuda_major: str, wheels: Path | None) -> None:
    """Say what a run would do, install and run nothing."""
    print(f"gpu_check would try these faiss GPU wheels for CUDA {cuda_major or '(none: torch has no CUDA build)'}, "
          "each in its own folder, keeping the first whose GpuIndexFlatL2 search runs:")
    for candidate in wheel_candidates(cuda_major, wheels) or ["(none)"]:
        print(f"  - {candidate}")
    print("then run, each within the time budget, most important first:")
    for check in CHECKS:
        print(f"  - {check.name} (~{check.seconds:.0f} s): {check.what}")
    print("and print one table: check | result | detail.")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="folder of faiss GPU wheels (and their needs) for offline machines")
    parser.add_argument("--no-install", action="store_true", help="use the installed faiss as it is")
    parser.add_argument("--dry-run", action="store_true", help="say what would run; install and run nothing")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for the checks (default 420)")
    parser.add_argument("--table", type=Path, help="also write the table (markdown) to this file")
    parser.add_argument("--checks-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checks_child is not None:
        run_checks(args.checks_child, args.smoke, args.budget_s)
        return
    if args.ddp_child is not None:
        ddp_child(args.ddp_child)
        return

    import torch  # noqa: PLC0415

    cuda_major = (torch.version.cuda or "").split(".")[0]
    if args.dry_run:
        dry_run(cuda_major, args.wheels)
        return
    if not torch.cuda.is_available() and not args.smoke:
        print(f"gpu_check: no CUDA device is visible to torch {torch.__version__} (built for CUDA "
              f"{torch.version.cuda}); run it on a machine with an NVIDIA GPU and its driver, or with --smoke. "
              "Nothing was installed or run.", file=sys.stderr)
        sys.exit(NO_CUDA_EXIT)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.no_install or not torch.cuda.is_available():
            site, verdicts = None, [("faiss wheels", "not tried (--no-install or no CUDA)")]
        else:
            site, verdicts = choose_faiss(cuda_major, args.wheels, root)
        env = dict(os.environ)
        if site is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))
        command = [sys.executable, __file__, "--checks-child", str(root), "--budget-s", str(args.budget_s)]
        child = subprocess.Popen(  # noqa: S603
            command + (["--smoke"] if args.smoke else []), env=env, stdout=subprocess.PIPE, text=True
        )
        rows = [(f"faiss: {label}", verdict, "") for label, verdict in verdicts]
        for line in child.stdout or ():
            if line.startswith(ROW_PREFIX):
                rows.append(tuple(json.loads(line[len(ROW_PREFIX):])))
                print("  " + " | ".join(rows[-1]), flush=True)
        child.wait()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke)"
    table = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} x {device}, "
             f"{time.perf_counter() - started:.0f} s in all", "", "| check | result | detail |", "|---|---|---|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    print("\n" + "\n".join(table))
    if args.table is not None:
        args.table.write_text("\n".join(table) + "\n")
    if child.returncode:
        sys.exit(child.returncode)


if __name__ == "__main__":
    main()
