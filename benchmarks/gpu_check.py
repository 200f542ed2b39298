"""Every GPU path of the project in one run of a few minutes, with one table at the end.

    python benchmarks/gpu_check.py                 # on a CUDA machine, from the repository root

1. Installs what it needs: a faiss GPU wheel for the CUDA runtime that pip's torch brings, in place of
   faiss-cpu (both wheels install the same ``faiss`` module, so they must not sit side by side).
   ``--no-install`` skips this step.
2. Times, on the first GPU: FAISS search on the GPU against the same index on the CPU; the CUDA greedy
   coreset against anomalib's ``KCenterGreedy`` on the GPU; MLFF, MFFA, PatchCore and PaDiM test forward
   ms per image at 256 px with the papers' backbones (random weights: no download); F2PAD seconds per
   image on PatchCore and PaDiM (``bench_f2pad.py``'s cut-paste protocol); and a DDP fit of MLFF over
   every visible GPU.

On a machine without CUDA it stops at once with exit status 2 and says so, before installing anything.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: faiss GPU wheels on PyPI, by the CUDA major version of torch's runtime, first choice first. faiss-gpu
#: (1.15) and faiss-gpu-cu12 link the CUDA 12 runtime (pip's nvidia-*-cu12 wheels, which sit beside torch's
#: CUDA 13 libraries; a CUDA 13 driver runs both); faiss-gpu-cu13-cuvs is the CUDA 13 build.
FAISS_GPU_WHEELS: dict[str, tuple[str, ...]] = {
    "13": ("faiss-gpu-cu13-cuvs", "faiss-gpu"),
    "12": ("faiss-gpu", "faiss-gpu-cu12"),
    "11": ("faiss-gpu-cu11",),
}
NO_CUDA_EXIT = 2


def require_cuda() -> None:
    """Exit with a clear message (status 2) where torch sees no CUDA device."""
    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device is visible to torch {torch.__version__} (built for CUDA {torch.version.cuda}); "
            "run it on a machine with an NVIDIA GPU and its driver. Nothing was installed or run.",
            file=sys.stderr,
        )
        sys.exit(NO_CUDA_EXIT)


def _faiss_sees_gpu(python: str = sys.executable) -> bool:
    """Whether a fresh interpreter's ``faiss`` has GPU support and sees a GPU."""
    probe = "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() else 1)"
    return subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0  # noqa: S603


def _pip(*args: str) -> bool:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False).returncode == 0  # noqa: S603


def install_faiss_gpu() -> str:
    """Put a faiss GPU wheel matching torch's CUDA in place of faiss-cpu; the wheel used, or why none."""
    if _faiss_sees_gpu():
        return "already installed"
    major = (torch.version.cuda or "").split(".")[0]
    candidates = FAISS_GPU_WHEELS.get(major, ())
    for wheel in candidates:
        _pip("uninstall", "-y", "-q", "faiss-cpu", *[w for w in sum(FAISS_GPU_WHEELS.values(), ()) if w != wheel])
        if _pip("install", "-q", wheel) and _faiss_sees_gpu():
            return wheel
    _pip("install", "-q", "faiss-cpu")  # leave a working (CPU) faiss behind
    return f"none worked for CUDA {torch.version.cuda} (tried {', '.join(candidates) or 'nothing'}); faiss-cpu restored"


def timed(function: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls with the GPU synchronised, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def check_search(rows: list[tuple[str, str, str]]) -> None:
    """Exact FAISS search of a PatchCore-sized bank: faiss-gpu against the CPU index."""
    from anomalib_mlff import FaissMemoryBank  # noqa: PLC0415 - after faiss may have been replaced
    from anomalib_mlff.components.memory_bank import faiss_gpu_available  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(20_000, 1536, generator=generator), torch.randn(16_384, 1536, generator=generator)
    cpu_s, (_, cpu_found) = timed(lambda: FaissMemoryBank().set_memory(bank).search(queries, 9))
    gpu_bank = FaissMemoryBank().set_memory(bank).cuda()
    gpu_queries = queries.cuda()
    gpu_bank.search(gpu_queries[:64], 9)  # builds the index
    gpu_s, (_, gpu_found) = timed(lambda: gpu_bank.search(gpu_queries, 9), repeats=3)
    agree = float((gpu_found[:, 0].cpu() == cpu_found[:, 0]).float().mean())
    engine = "faiss-gpu" if faiss_gpu_available() else "torch on CUDA (no faiss-gpu)"
    rows.append(("exact search 16k x 20k x 1536, k=9", f"{engine} {gpu_s:.3f} s vs CPU {cpu_s:.3f} s",
                 f"{cpu_s / gpu_s:.1f}x, nearest agrees {agree:.4f}"))


def check_coreset(rows: list[tuple[str, str, str]]) -> None:
    """greedy_coreset on CUDA against anomalib's KCenterGreedy on CUDA, 10% of 40,000 x 1536."""
    from anomalib.models.components import KCenterGreedy  # noqa: PLC0415
    from bench_memory_bank import coverage_radius  # noqa: PLC0415

    from anomalib_mlff import greedy_coreset  # noqa: PLC0415

    embeddings = torch.randn(40_000, 1536, generator=torch.Generator().manual_seed(0)).cuda()
    torch.manual_seed(0)
    theirs_s, theirs = timed(lambda: KCenterGreedy(embedding=embeddings, sampling_ratio=0.1).select_coreset_idxs())
    ours_s, ours = timed(lambda: greedy_coreset(embeddings, 0.1, seed=0, progress=False))
    ratio = coverage_radius(embeddings, ours) / coverage_radius(embeddings, torch.tensor(theirs, device="cuda"))
    rows.append(("coreset 10% of 40k x 1536", f"ours {ours_s:.2f} s vs anomalib {theirs_s:.2f} s",
                 f"{theirs_s / ours_s:.1f}x, radius ratio {ratio:.3f}"))


def paper_models() -> dict[str, Callable[[], object]]:
    """The four models with the papers' backbones, random weights, anomalib's 256 px pre-processing."""
    from anomalib.models import Padim, Patchcore  # noqa: PLC0415

    from anomalib_mlff import MFFA, MLFF  # noqa: PLC0415

    return {
        "MLFF (resnet50)": lambda: MLFF(pre_trained=False, epochs=1, repeat=1, visualizer=False),
        "MFFA (wide_resnet50_2 + cait_m36_384)": lambda: MFFA(pre_trained=False, psg_epochs=1, visualizer=False),
        "PatchCore (wide_resnet50_2)": lambda: Patchcore(pre_trained=False, visualizer=False),
        "PaDiM (wide_resnet50_2)": lambda: Padim(backbone="wide_resnet50_2", pre_trained=False, visualizer=False),
    }


def check_models(rows: list[tuple[str, str, str]], root: Path) -> None:
    """Fit each paper-size model for its shortest schedule on the embedded data, then time its test forward."""
    from anomalib.engine import Engine  # noqa: PLC0415
    from compare_models import preprocessed_test_batches  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_mlff.data import embedded_datamodule  # noqa: PLC0415

    for name, build in paper_models().items():
        seed_everything(0)
        model = build()
        data = embedded_datamodule("brick", train_batch_size=16, eval_batch_size=16)
        engine = Engine(default_root_dir=root / "models", logger=False, enable_progress_bar=False, devices=1)
        engine.fit(model, datamodule=data)
        batches = [batch.cuda() for batch in preprocessed_test_batches(model, data)]
        network = model.model.cuda().eval()
        count = sum(len(batch) for batch in batches)
        with torch.no_grad():
            network(batches[0])
            seconds, _ = timed(lambda: [network(batch) for batch in batches], repeats=3)
        rows.append((f"test forward {name}, 256 px", f"{1000 * seconds / count:.1f} ms/image",
                     f"{count} images, batch 16, {torch.cuda.get_device_name(0)}"))


def check_f2pad(rows: list[tuple[str, str, str]], root: Path) -> None:
    """F2PAD seconds per image on PatchCore and PaDiM (bench_f2pad's cut-paste protocol, resnet18, 256 px)."""
    from bench_f2pad import build_paper, run  # noqa: PLC0415

    images = 8
    build_paper(root / "cutpaste", "brick", images, seed=0)
    for name in ("PatchCore", "PaDiM"):
        row = run(name, "brick", root / "cutpaste", 0, root / "f2pad")
        rows.append((f"F2PAD on {name}", f"{row.seconds_f2pad:.2f} s/image (backbone {row.seconds_backbone:.3f})",
                     f"IoU {row.iou_before:.1f} -> {row.iou_after:.1f}"))


def ddp_fit() -> None:
    """Child run (``--ddp``): one MLFF epoch with DDP over every visible GPU; rank 0 prints seconds."""
    from anomalib.engine import Engine  # noqa: PLC0415

    from anomalib_mlff import MLFF  # noqa: PLC0415
    from anomalib_mlff.data import embedded_datamodule  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as root:
        engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, accelerator="gpu",
                        devices=-1, strategy="ddp")
        model = MLFF(backbone="resnet18", pre_trained=False, epochs=1, repeat=1, visualizer=False)
        start = time.perf_counter()
        engine.fit(model, datamodule=embedded_datamodule("brick", train_batch_size=16))
        if engine.trainer.global_rank == 0:
            print(f"DDP_SECONDS {time.perf_counter() - start:.1f} {engine.trainer.world_size}")


def check_ddp(rows: list[tuple[str, str, str]]) -> None:
    """DDP in its own process: Lightning re-launches the command for the other ranks."""
    result = subprocess.run(  # noqa: S603
        [sys.executable, __file__, "--ddp"], capture_output=True, text=True, check=False, timeout=900
    )
    line = next((line for line in result.stdout.splitlines() if line.startswith("DDP_SECONDS")), None)
    if line is None:
        raise RuntimeError(result.stderr[-1500:])
    _, seconds, world = line.split()
    rows.append(("DDP fit MLFF resnet18, 1 epoch", f"{seconds} s", f"{world} GPU(s)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-install", action="store_true", help="do not install a faiss GPU wheel")
    parser.add_argument("--ddp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_cuda()
    if args.ddp:
        ddp_fit()
        return
    faiss_wheel = "not attempted (--no-install)" if args.no_install else install_faiss_gpu()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        checks: list[tuple[str, Callable[[], None]]] = [
            ("faiss search", lambda: check_search(rows)),
            ("coreset", lambda: check_coreset(rows)),
            ("models", lambda: check_models(rows, Path(tmp))),
            ("F2PAD", lambda: check_f2pad(rows, Path(tmp))),
            ("DDP", lambda: check_ddp(rows)),
        ]
        for name, check in checks:
            start = time.perf_counter()
            try:
                check()
            except Exception as error:  # noqa: BLE001 - one broken path must not hide the others
                last_line = (str(error).strip().splitlines() or [""])[-1]
                rows.append((name, "FAILED", f"{type(error).__name__}: {last_line}"))
            print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
    print(f"\ntorch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} x "
          f"{torch.cuda.get_device_name(0)}, faiss GPU wheel: {faiss_wheel}\n")
    print("| check | result | detail |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
