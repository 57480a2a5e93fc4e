"""The built wheel (and sdist) carry what the commands read at run time, and an installed wheel works from an
empty directory: `muonft --help`, `muonft recipes`, a tiny `pretrain` from a shipped recipe, `diagnose --json`
on it, and the finetune and sweep commands diagnose prints, run as printed.

How the installed wheel is made to run without fetching anything (the dependencies are the project venv's):
the source tree is copied to a temporary folder (so a stale `build/` in the clone cannot leak into the
wheel) and built with `pip wheel --no-deps --no-build-isolation`. A fresh venv is created with the running
interpreter's `venv` module (`--without-pip`), and the wheel is installed into it with `--no-deps --no-index`
(`pip --python FRESH`, before the fresh venv can see anything else). Only then does a `.pth` file give the
fresh venv the running interpreter's site-packages (`site.getsitepackages()`, never a hard-coded path) as
plain path lines, appended to `sys.path` after the fresh venv's own site-packages. Plain lines are not site
directories, so the `.pth` files inside them -- among them the project's editable-install finder for
`muonft_cli` -- are never executed, and the wheel's `muonft_cli` comes first on the path anyway. The test
asserts `muonft_cli.__file__` lies in the fresh venv. PYTHONPATH is dropped from every child's environment.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (REPO / "muonft_cli" / "recipes").glob("*.yaml"))
DATA_FILES = ["muonft_cli/diagnose/calibration.json", "muonft_cli/native/thin_muon.c", "muonft_cli/native/gram_apply.c"] + [f"muonft_cli/recipes/{n}" for n in RECIPES]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "runs", ".cache",
                                    "__pycache__", ".pytest_cache", ".whl")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}, **extra)
    return env


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{shlex.join(map(str, args))} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the source tree (symlinks kept), so the builds below never write into the clone."""
    src = tmp_path_factory.mktemp("src") / "muonft"
    shutil.copytree(REPO, src, symlinks=True, ignore=NOT_SOURCE)
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", out, source], env=_env())
    (whl,) = out.glob("muonft-*.whl")
    return whl


def test_wheel_carries_the_calibration_and_every_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert len(RECIPES) >= 10
    missing = [f for f in DATA_FILES if f not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "muonft_cli/recipes/__init__.py" in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "muonft = muonft_cli.cli:app" in zipfile.ZipFile(wheel).read(entry).decode()


def test_sdist_carries_them_and_builds_a_complete_wheel(source, tmp_path):
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    name = _run([sys.executable, "-c", code, tmp_path], cwd=source, env=_env()).stdout.strip().splitlines()[-1]
    sdist = tmp_path / name
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert not [f for f in DATA_FILES if f not in members]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp_path / "w", sdist], env=_env())
    (whl,) = (tmp_path / "w").glob("muonft-*.whl")
    assert not [f for f in DATA_FILES if f not in zipfile.ZipFile(whl).namelist()]


@pytest.mark.slow
def test_installed_wheel_runs_every_printed_command_from_an_empty_directory(wheel, tmp_path):
    fresh = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", fresh], env=_env())
    py = fresh / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel],
         env=_env())
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        env=_env()).stdout.strip())
    deps = [p for p in site.getsitepackages() if Path(p).is_dir() and Path(p).resolve() != purelib.resolve()]
    assert deps
    (purelib / "_muonft_test_deps.pth").write_text("".join(f"{p}\n" for p in deps), encoding="utf-8")

    work = tmp_path / "empty"
    work.mkdir()
    env = _env(PATH=f"{fresh / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    where = _run([py, "-c", "import muonft_cli; print(muonft_cli.__file__)"], cwd=work, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(fresh.resolve()), where
    muonft = shutil.which("muonft", path=env["PATH"])
    assert muonft and Path(muonft).parent == fresh / "bin"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return _run([muonft, *args], cwd=work, env=env)

    assert "recipes" in cli("--help").stdout
    if shutil.which(os.environ.get("CC") or "cc"):  # the native kernels build from the installed sources
        cache = tmp_path / "native"
        for kernel in ("thin_kernel", "gram_kernel", "mirror_kernel"):
            code = f"import muonft_cli.native as n; k = n.{kernel}(); print(k.path if k else n.status())"
            built = _run([py, "-c", code], cwd=work, env=_env(MUONFT_NATIVE_DIR=str(cache))).stdout.strip()
            assert Path(built).parent == cache and Path(built).is_file(), built
    listing = cli("recipes").stdout
    assert {ln.split()[0] for ln in listing.splitlines()} == {n[:-5] for n in RECIPES}
    assert cli("recipes", "show", "sweep-finetune").stdout == (REPO / "recipes" / "sweep-finetune.yaml").read_text()

    pre = json.loads(cli("pretrain", "--config", "recipe:pretrain-tiny-adam", "--steps", "2", "--seq-len", "32",
                         "--batch-size", "4", "--micro-batch-size", "4", "--vocab-size", "300", "--eval-every", "0",
                         "--set", "eval.max_batches=1", "--out", "runs/pre", "--json", "--quiet").stdout)
    assert pre["steps"] == 2 and (work / "runs" / "pre" / "final").is_dir()

    report = json.loads(cli("diagnose", "runs/pre/final", "--json", "--quiet").stdout)
    rec = report["recommendation"]
    assert rec["pretrain_optimizer"] == "adam"  # provenance of the run it was given

    sweep = shlex.split(rec["sweep_command"])
    assert sweep[:3] == ["muonft", "sweep", "recipe:sweep-finetune"]
    cells = [json.loads(ln) for ln in _run([muonft, *sweep[1:], "--dry-run", "--json"], cwd=work,
                                           env=env).stdout.splitlines()]
    assert cells and all("-muon-" in c["id"] for c in cells)

    finetune = shlex.split(rec["command"])
    assert finetune[:2] == ["muonft", "finetune"]
    ft = json.loads(_run([muonft, *finetune[1:], "--steps", "1", "--seq-len", "32", "--batch-size", "2",
                          "--eval-every", "0", "--set", "eval.max_batches=1", "--json", "--quiet"],
                         cwd=work, env=env).stdout)
    assert ft["mode"] == "finetune" and ft["steps"] == 1
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing but the runs was needed or written
