"""The bundled job specs (``fabricflow example``), reachable from any directory.

examples/ stays at the repository's top level, where the README's commands name it; a wheel
carries the same files inside the package as orchestrator/_examples (pyproject.toml maps the
directory there, as it does config/), which is where this module looks first.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import NotFoundError

_PACKAGE = Path(__file__).resolve().parent
EXAMPLES_DIR = _PACKAGE / "_examples"
if not EXAMPLES_DIR.is_dir():
    EXAMPLES_DIR = _PACKAGE.parent / "examples"
SUFFIXES = (".yaml", ".yml", ".json")


def example_files() -> dict[str, Path]:
    """Every bundled example by name (its file name without the suffix), sorted by name."""
    if not EXAMPLES_DIR.is_dir():
        return {}
    return {path.stem: path for path in sorted(EXAMPLES_DIR.iterdir())
            if path.suffix in SUFFIXES and path.is_file()}


def example_text(name: str) -> str:
    """The text of the example called ``name``; NotFoundError naming the ones there are."""
    files = example_files()
    path = files.get(Path(name).stem if Path(name).suffix in SUFFIXES else name)  # quickstart.yaml too
    if path is None:
        known = ", ".join(files) or "none are installed"
        raise NotFoundError(f"no example {name!r} (examples: {known})")
    return path.read_text(encoding="utf-8")


def summary(path: Path) -> str:
    """What an example is: its first comment line, without the ``#``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""
