"""The ``fabricflow`` entry point, kept light so signals are handled from the first moment."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Run the command line.

    SIGTERM before a command has installed its own handler (while the imports and migrations
    run) means "stop": nothing has started yet, so exit 0 like a drained daemon would. Commands
    that hold work (run, daemon) replace this with their own draining handlers.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from orchestrator.cli import main as cli_main

    cli_main(prog_name="fabricflow")
