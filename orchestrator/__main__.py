"""``python -m orchestrator`` is the ``fabricflow`` command."""

from orchestrator.cli import main

main(prog_name="fabricflow")
