"""A regular (non-editable) install: the wheel carries the configs, and training runs from any directory."""

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import OFFLINE_ENV, ROOT, TINY_DATA, TINY_MODEL
from vlm.config import CONFIG_DIR, find_config_dir
from vlm.text_accounting import REFERENCE_DIR

SRC = ROOT / "src"


def files_under(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def pyproject_setuptools() -> dict:
    """pyproject.toml's [tool.setuptools], as setuptools itself reads it."""
    from setuptools.config.pyprojecttoml import read_configuration

    return read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, from a copy of the sources (no build/ or egg-info in the checkout),
    offline: the build uses this environment's setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for path in ROOT.iterdir():  # pyproject.toml, README.md (the readme) and any other top-level file
        if path.is_file():
            shutil.copy2(path, source)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(SRC, source / "src", ignore=ignore)
    shutil.copytree(ROOT / "conf", source / "conf", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    proc = subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = (tmp / "dist").glob("vlm-*.whl")
    return built


def test_the_checkout_uses_its_own_conf():
    assert CONFIG_DIR == ROOT / "conf"
    assert (CONFIG_DIR / "train.yaml").is_file() and (CONFIG_DIR / "eval.yaml").is_file()


def test_config_lookup_prefers_the_checkout_then_the_packaged_copy(tmp_path):
    installed = tmp_path / "site-packages" / "vlm"  # a regular install: vlm/conf/ beside the modules
    (installed / "conf").mkdir(parents=True)
    (installed / "conf" / "train.yaml").write_text("task_name: train\n")
    assert find_config_dir(installed) == installed / "conf"

    checkout = tmp_path / "repo"  # a source checkout: repo/conf/ is the source of truth
    (checkout / "src" / "vlm" / "conf").mkdir(parents=True)
    (checkout / "src" / "vlm" / "conf" / "train.yaml").write_text("stale: true\n")
    (checkout / "conf").mkdir()
    (checkout / "conf" / "train.yaml").write_text("task_name: train\n")
    (checkout / "pyproject.toml").write_text("")
    assert find_config_dir(checkout / "src" / "vlm") == checkout / "conf"

    # installed into a folder of some other project that has a conf/ of its own: still the packaged copy
    target = checkout / "lib" / "vlm"
    (target / "conf").mkdir(parents=True)
    (target / "conf" / "train.yaml").write_text("task_name: train\n")
    assert find_config_dir(target) == target / "conf"

    with pytest.raises(FileNotFoundError, match=r"train\.yaml"):
        find_config_dir(tmp_path / "empty" / "vlm")


def test_pyproject_lists_every_package_and_ships_conf():
    """Setuptools cannot combine `packages.find` with the mapped vlm.conf, so the packages are listed by
    hand: a new subpackage of src/vlm must be added there, or a regular install would lack it."""
    setuptools_cfg = pyproject_setuptools()
    assert setuptools_cfg["package-dir"] == {"": "src", "vlm.conf": "conf"}
    on_disk = {
        ".".join(d.relative_to(SRC).parts)
        for d in (SRC / "vlm").rglob("*")
        if d.is_dir() and "__pycache__" not in d.parts and any(d.glob("*.py"))
    } | {"vlm"}
    listed = set(setuptools_cfg["packages"])
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == {"vlm.conf"}, "packages listed in pyproject.toml that src/vlm lacks"


def test_the_wheel_carries_every_module_and_config(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    packaged = {name.removeprefix("vlm/conf/") for name in names if name.startswith("vlm/conf/")}
    assert packaged == files_under(ROOT / "conf"), "conf/ files the wheel lacks or adds (package-data)"
    modules = {name.removeprefix("vlm/") for name in names if name.startswith("vlm/")} - {
        f"conf/{name}" for name in packaged
    }
    assert modules == files_under(SRC / "vlm"), "files of src/vlm the wheel lacks or adds"

    conf = find_config_dir(tmp_path / "site" / "vlm")
    assert conf == tmp_path / "site" / "vlm" / "conf"
    GlobalHydra.instance().clear()
    try:  # Hydra finds every default (each group's option, hydra/default) in the packaged copy
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            assert compose("train", return_hydra_config=True).hydra.job.chdir is False
            assert "benchmark" in compose("eval")
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_a_regular_install_trains_from_another_directory(wheel, tmp_path):
    """`pip install .` into a fresh virtual environment (no source tree on its path; the dependencies are
    this environment's, through a .pth file), then `python train.py debug=fast_dev_run` in a directory that
    is not the checkout, with a copy of the checkout's train.py; `python <checkout>/train.py` works too.
    Data and logs go under that directory."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", "--python", str(python)]
    proc = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    overrides = ["debug=fast_dev_run", "logger=csv", *TINY_DATA, *TINY_MODEL]
    gpt2 = REFERENCE_DIR / "gpt2.tiktoken"  # reference tokenizer: `python -m vlm.app.text_accounting install`
    if gpt2.is_file():  # puts it under sys.prefix; copied here, offline
        (env_dir / "share" / "vlm" / "reference_tokenizers").mkdir(parents=True)
        shutil.copy2(gpt2, env_dir / "share" / "vlm" / "reference_tokenizers")
    else:
        overrides.append("reference_tokenizers=[bytes]")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(ROOT / "train.py", elsewhere)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLM_ROOT", "VIRTUAL_ENV")}
    env |= OFFLINE_ENV | {"PYTHONUNBUFFERED": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [python, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900
        )

    where = run("-c", "import vlm.config as c; print(c.__file__); print(c.CONFIG_DIR)")
    assert where.returncode == 0, where.stderr[-3000:]
    installed = Path(purelib) / "vlm"
    assert where.stdout.split() == [str(installed / "config.py"), str(installed / "conf")]

    job = run(str(ROOT / "train.py"), "stage=2", "--cfg", "job")
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: '2'" in job.stdout

    proc = run("train.py", *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((elsewhere / "logs" / "train" / "runs").glob("*/.hydra/config.yaml"))
    assert (elsewhere / "data" / "synthetic").is_dir()
