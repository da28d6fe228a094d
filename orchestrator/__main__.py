"""``python -m orchestrator`` is the ``fabricflow`` command."""

from orchestrator.entry import main

main()
