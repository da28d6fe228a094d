"""Packaging: the wheel and the sdist carry everything fabricflow needs at run time.

migrations/ and config/ live at the repository's top level; pyproject.toml maps them into the
package (orchestrator/_migrations, orchestrator/_config), where the code looks first. These tests
build from a copy of the checkout (so nothing is written into it), offline: no build isolation,
with the setuptools of this environment (the test extra requires one that builds wheels).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Run-time files outside the package directory, and where the wheel puts them.
MAPPED = {"migrations": "orchestrator/_migrations", "config": "orchestrator/_config",
          "examples": "orchestrator/_examples"}
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis",
             ".ruff_cache", ".mypy_cache"}


def _files(top: Path) -> list[str]:
    """Files under ``ROOT/top`` as paths relative to ROOT, caches left out."""
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / top).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names
            if n in SKIP_DIRS or n.endswith(".egg-info") or ".db" in n
            or (Path(directory, n) / "pyvenv.cfg").exists()}


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _require_wheel_building_setuptools() -> None:
    """Without build isolation, pip builds with this environment's setuptools; fail clearly if
    it is one from before the test extra's bound (no bdist_wheel of its own)."""
    have = version("setuptools")
    assert tuple(int(p) for p in have.split(".")[:2]) >= (70, 1), (
        f"setuptools {have} here cannot build wheels alone; the test extra wants setuptools>=70.1: "
        "pip install -e '.[test]'")


def _pip_wheel(src: Path, out: Path) -> Path:
    _run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", out, cwd=src)
    (wheel,) = out.glob("fabricflow-*.whl")
    return wheel


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheel built from (a copy of) the checkout, an sdist, and a wheel built from that sdist."""
    _require_wheel_building_setuptools()
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    wheel = _pip_wheel(src, tmp / "wheel")
    sdist_dir = tmp / "sdist"
    sdist_dir.mkdir()
    # PEP 517's build_sdist, as `python -m build --sdist --no-isolation` would call it.
    name = _run(sys.executable, "-c",
                "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))",
                sdist_dir, cwd=src).strip().splitlines()[-1]
    sdist = sdist_dir / name
    with tarfile.open(sdist) as tar:
        # The "data" filter (no links out, no odd modes) exists from Python 3.11.4 on.
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp / "unpacked").iterdir()
    return {"wheel": wheel, "sdist": sdist, "wheel_from_sdist": _pip_wheel(unpacked, tmp / "wheel2"),
            "tmp": tmp}


def test_checkout_has_the_run_time_files():
    migrations = _files(Path("migrations"))
    assert "migrations/env.py" in migrations and "migrations/script.py.mako" in migrations
    assert any(f.startswith("migrations/versions/") and f.endswith(".py") for f in migrations)
    assert "config/default.toml" in _files(Path("config"))


@pytest.mark.parametrize("which", ["wheel", "wheel_from_sdist"])
def test_wheel_carries_migrations_config_and_every_module(built, which):
    names = set(zipfile.ZipFile(built[which]).namelist())
    for top, inside in MAPPED.items():
        for f in _files(Path(top)):
            assert inside + f[len(top):] in names, f"{built[which].name} lacks {f}"
    # pyproject.toml lists the subpackages by hand: a new one must be added there.
    missing = [f for f in _files(Path("orchestrator")) if f.endswith(".py") and f not in names]
    assert missing == []
    assert "orchestrator/py.typed" in names  # PEP 561: type checkers read the package's annotations
    # The live page's assets (fabricflow ui): served from the package, nothing from a CDN.
    assets = [f for f in _files(Path("orchestrator/ui_static"))]
    assert {Path(f).name for f in assets} >= {"index.html", "app.js", "style.css"}
    assert [f for f in assets if f not in names] == []
    assert not any(n.startswith(("migrations/", "config/", "tests/")) for n in names)


def test_sdist_carries_migrations_config_and_examples(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = [*_files(Path("migrations")), *_files(Path("config")), *_files(Path("examples")),
              "alembic.ini", "pyproject.toml", "MANIFEST.in"]
    assert [f for f in wanted if f not in names] == []
    assert "examples/quickstart.yaml" in names


def test_code_in_the_wheel_reads_the_wheels_own_files(built):
    """Unpacked alone (no checkout on the path), the wheel finds its migrations and defaults."""
    site = built["tmp"] / "site"
    zipfile.ZipFile(built["wheel"]).extractall(site)
    elsewhere = built["tmp"] / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FABRICFLOW_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)
    probe = ("import json, orchestrator; from orchestrator.store import db; "
             "from orchestrator.config import DEFAULT_CONFIG_FILE, load_settings; "
             "print(json.dumps({'package': orchestrator.__file__, 'migrations': str(db.MIGRATIONS_DIR), "
             "'config': str(DEFAULT_CONFIG_FILE), 'files': load_settings().config_files, "
             "'head': db.head_revision()}))")
    shown = json.loads(_run(sys.executable, "-c", probe, cwd=elsewhere, env=env))
    assert Path(shown["package"]).is_relative_to(site)
    assert Path(shown["migrations"]) == site / "orchestrator" / "_migrations"
    assert Path(shown["config"]) == site / "orchestrator" / "_config" / "default.toml"
    assert shown["files"] == [shown["config"]]
    from orchestrator.store import db
    assert shown["head"] == db.head_revision()
    out = _run(sys.executable, "-m", "orchestrator", "db", "upgrade", "--db",
               f"sqlite+aiosqlite:///{elsewhere / 'x.db'}", cwd=elsewhere, env=env)
    assert f"schema at {db.head_revision()} (current)" in out


def test_the_wheel_prints_its_examples_from_any_directory(built):
    """`fabricflow example quickstart` works from the installed wheel alone, anywhere."""
    site = built["tmp"] / "site-examples"
    zipfile.ZipFile(built["wheel"]).extractall(site)
    elsewhere = built["tmp"] / "elsewhere-examples"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FABRICFLOW_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)
    where = _run(sys.executable, "-c", "from orchestrator.examples import EXAMPLES_DIR; print(EXAMPLES_DIR)",
                 cwd=elsewhere, env=env)
    assert Path(where.strip()) == site / "orchestrator" / "_examples"
    printed = _run(sys.executable, "-m", "orchestrator", "example", "quickstart", cwd=elsewhere, env=env)
    assert printed == (ROOT / "examples" / "quickstart.yaml").read_text()
