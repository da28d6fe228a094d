"""The ``fabricflow`` entry point, kept light so signals are handled from the first moment."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Run the command line.

    SIGTERM before a command has installed its own handler (while the imports and migrations
    run) means "stop": nothing has started yet, so exit 0 like a drained daemon would. Commands
    that hold work (run, daemon) replace this with their own draining handlers. Ctrl-C exits
    130, as a shell reports it, not click's 1 (which means a failed job).
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        from orchestrator.cli import main as cli_main

        cli_main(prog_name="fabricflow")
    except KeyboardInterrupt:  # Ctrl-C before a command started (commands handle their own)
        sys.stderr.write("\ninterrupted\n")
        sys.exit(128 + signal.SIGINT)
