"""The bundled examples: `fabricflow example` prints them from anywhere, and the tests' fixed-names
copy of the quick start stays the example in everything but its workspace's name."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.examples import EXAMPLES_DIR
from tests.conftest import EXAMPLE_QUICKSTART, QUICKSTART, ROOT


def body(text: str) -> list[str]:
    """The lines after the leading comment."""
    lines = text.splitlines()
    return lines[next(n for n, line in enumerate(lines) if not line.startswith("#")):]


def test_the_fixed_names_copy_differs_from_the_example_only_in_the_workspace_name():
    example, fixed = EXAMPLE_QUICKSTART.read_text(), QUICKSTART.read_text()
    assert body(fixed) == body(example.replace('{name: "quickstart-{job}",', "{name: apieworkspace,"))
    assert yaml.safe_load(example)["workspace"]["name"] == "quickstart-{job}"


def test_in_a_checkout_the_examples_are_the_repositorys():
    assert EXAMPLES_DIR == ROOT / "examples"


def test_example_prints_the_file_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any directory
    for name in ("quickstart", "quickstart.yaml"):
        result = CliRunner().invoke(main, ["example", name], catch_exceptions=False)
        assert result.exit_code == 0
        assert result.stdout == EXAMPLE_QUICKSTART.read_text()
    assert list(tmp_path.iterdir()) == []


def test_example_without_a_name_lists_the_examples():
    result = CliRunner().invoke(main, ["example"], catch_exceptions=False)

    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        'quickstart  The DataArts Fabric "create an inference service" procedure, as one fabricflow job.']


def test_an_unknown_example_is_not_found_exit_3():
    result = CliRunner().invoke(main, ["example", "nope"], catch_exceptions=False)

    assert result.exit_code == 3
    assert result.stderr == "error: no example 'nope' (examples: quickstart)\n"
