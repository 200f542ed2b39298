"""The models reach anomalib's CLI and ``get_model`` after a plain or editable install."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, VENV_BIN, fresh_interpreter_env

CHECK_NOTHING_HEAVY = (
    "import sys; heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'anomalib', 'torch', 'timm'});"
    "print('mlff' if 'anomalib_mlff' in sys.modules else 'no-mlff', heavy)"
)
CHECK_GET_MODEL = (
    "from anomalib.models import get_model, list_models;"
    "m = get_model('mlff', backbone='resnet18', pre_trained=False, tem_levels=8, feature_dim=32);"
    "print(type(m).__module__, type(m).__name__, 'MLFF' in list_models(case='pascal'))"
)
# The CLI's own parser resolves the short name; --print_config stops right after parsing.
CHECK_CLI = (
    "import sys; from anomalib.cli.cli import main;"
    "sys.argv = ['anomalib', 'train', '--model', 'MLFF', '--model.pre_trained', 'false', '--data', 'MVTecAD',"
    " '--print_config'];"
    "main()"
)


def test_startup_hook_imports_nothing_heavy(run_python) -> None:  # noqa: ANN001
    """A program that never imports anomalib gets only the tiny hook module at start-up."""
    result = run_python(CHECK_NOTHING_HEAVY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mlff []"


@pytest.mark.slow  # fresh interpreters importing anomalib
def test_get_model_short_name_after_import(run_python) -> None:  # noqa: ANN001
    result = run_python(CHECK_GET_MODEL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["anomalib_mlff.models.mlff.lightning_model", "MLFF", "True"]


@pytest.mark.slow  # fresh interpreters importing anomalib
def test_cli_resolves_short_name_editable_install(tmp_path: Path) -> None:
    """`anomalib train --model MLFF` with the environment's own `anomalib` script."""
    result = subprocess.run(  # noqa: S603
        [str(VENV_BIN / "anomalib"), "train", "--model", "MLFF", "--model.pre_trained", "false", "--print_config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"class_path: anomalib_mlff(\.\w+)*\.MLFF\n", result.stdout), result.stdout[-3000:]


@pytest.fixture(scope="module")
def installed_wheel_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh venv that sees this environment's dependencies but has anomalib-mlff from a built wheel."""
    root = tmp_path_factory.mktemp("wheel_install")
    subprocess.run(  # noqa: S603
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "-w", str(root / "dist"), str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((root / "dist").glob("anomalib_mlff-*.whl"))
    assert "anomalib_mlff.pth" in zipfile.ZipFile(wheel).namelist()
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # noqa: S603
    site_packages = next(venv.glob("lib/python*/site-packages"))
    # Dependencies (torch, anomalib, ...) come from this environment as a plain path entry: its own
    # .pth files, including the editable install of this repo, are not processed.
    dependencies = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site_packages / "_dependencies.pth").write_text(dependencies + "\n")
    subprocess.run(  # noqa: S603
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    return str(venv / "bin" / "python")


@pytest.mark.slow  # fresh interpreters importing anomalib
def test_wheel_install_registers_models(installed_wheel_python: str, run_python) -> None:  # noqa: ANN001
    where = run_python("import anomalib_mlff; print(anomalib_mlff.__file__)", python=installed_wheel_python)
    assert where.returncode == 0, where.stderr
    assert str(REPO_ROOT) not in where.stdout, "the test must exercise the installed wheel, not the source tree"
    startup = run_python(CHECK_NOTHING_HEAVY, python=installed_wheel_python)
    assert startup.stdout.strip() == "mlff []", startup.stderr
    cli = run_python(CHECK_CLI, python=installed_wheel_python)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "anomalib_mlff" in cli.stdout
    model = run_python(CHECK_GET_MODEL, python=installed_wheel_python)
    assert model.returncode == 0, model.stderr[-3000:]
    assert model.stdout.split()[-2:] == ["MLFF", "True"]


@pytest.mark.slow  # fresh interpreters importing anomalib
def test_unknown_model_still_fails_cleanly(run_python) -> None:  # noqa: ANN001
    """Registration must not make anomalib accept names it does not know."""
    result = run_python("from anomalib.models import get_model; get_model('not_a_model')")
    assert result.returncode != 0
    assert "UnknownModelError" in result.stderr


FIRST_IMPORTS = [
    "anomalib_mlff.models.mlff.torch_model",
    "anomalib_mlff.components.backbone",
    "anomalib_mlff.components.texture",
    "anomalib_mlff.post_processing",
    "anomalib_mlff.post_processing.f2pad.scorers",
    "anomalib_mlff.components",
    "anomalib_mlff.pipelines",
    "anomalib.engine",
]


@pytest.fixture(scope="module")
def first_import_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.Popen]:
    """One fresh interpreter per first import, all started at once: each spends seconds importing anomalib, so
    side by side they take the cores' time instead of the sum of theirs."""
    cwd = tmp_path_factory.mktemp("first_import")
    return {
        module: subprocess.Popen(  # noqa: S603 - our own interpreter and code
            [
                sys.executable,
                "-c",
                "import warnings; warnings.simplefilter('error', RuntimeWarning);"
                f"import {module};"
                "import anomalib.models as zoo; print(hasattr(zoo, 'MLFF'), type(zoo.get_model('mlff',"
                " pre_trained=False, backbone='resnet18')).__name__)",
            ],
            cwd=cwd,
            env=fresh_interpreter_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in FIRST_IMPORTS
    }


@pytest.mark.slow  # fresh interpreters importing anomalib
@pytest.mark.parametrize("first_import", FIRST_IMPORTS)
def test_registration_whatever_is_imported_first(first_import_runs, first_import: str) -> None:  # noqa: ANN001
    """A module of ours that itself triggers anomalib's import must not half-register the models."""
    process = first_import_runs[first_import]
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.split()[-2:] == ["True", "MLFF"]


@pytest.mark.parametrize("name", ["faiss_patchcore", "FaissPatchcore"])
def test_anomalib_lookup_finds_faiss_patchcore(name: str) -> None:
    """anomalib's ``get_model`` looks only at direct subclasses of ``AnomalibModule``; FaissPatchcore is one."""
    from anomalib.models import Patchcore, get_model  # noqa: PLC0415 - registers the plugin's models

    from anomalib_mlff import FaissPatchcore  # noqa: PLC0415

    model = get_model(name, backbone="resnet18", pre_trained=False)
    assert type(model) is FaissPatchcore
    assert type(get_model("patchcore", backbone="resnet18", pre_trained=False)) is Patchcore  # still anomalib's own


def test_no_lower_layer_imports_the_models_for_ordering() -> None:
    """components/ and post_processing/ never import anomalib_mlff.models: the start-up hook owns the order."""
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for folder in ("components", "post_processing")
        for path in sorted((REPO_ROOT / "anomalib_mlff" / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"^\s*(import anomalib_mlff\.models|from anomalib_mlff\.models\b)", line)
    ]
    assert offenders == []


def test_no_model_imports_another_models_private_helpers() -> None:
    """What several models share lives in components/ (e.g. the layer checks), not behind a sibling's underscore."""
    models = REPO_ROOT / "anomalib_mlff" / "models"
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for path in sorted(models.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if (found := re.search(r"from anomalib_mlff\.models\.(\w+)\S* import .*\b_\w", line))
        and found.group(1) != path.relative_to(models).parts[0]
    ]
    assert offenders == []


def test_list_models_shows_every_registered_model() -> None:
    """Every model of the registry is listed, in anomalib's naming (``MLFF`` -> ``m_l_f_f``, like ``c_f_m``)."""
    from anomalib.models import list_models  # noqa: PLC0415
    from anomalib.utils.path import convert_to_snake_case  # noqa: PLC0415

    from anomalib_mlff.registry import MODELS, register_models  # noqa: PLC0415

    register_models()
    names = [class_name for _, class_name in MODELS]
    assert set(names) <= list_models(case="pascal")
    assert {convert_to_snake_case(name) for name in names} <= list_models(case="snake")
    assert "faiss_patchcore" in list_models(case="snake")
