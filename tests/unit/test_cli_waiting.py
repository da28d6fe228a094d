"""The daemon command the waiting commands' notice suggests: this database, the Fabric options
given, quoted for a shell, never a password."""

from __future__ import annotations

import shlex

from orchestrator.cli_waiting import daemon_command, no_daemon_notice


def test_the_command_names_the_database_and_the_fabric_options_given():
    assert daemon_command("sqlite:////var/lib/ff/jobs.db", {}) == "fabricflow daemon --db sqlite:////var/lib/ff/jobs.db"
    given = {"fabric_url": "http://127.0.0.1:8080", "config": "my config.toml", "log_level": "debug",
             "db": "ignored: the resolved URL is passed"}
    assert daemon_command("sqlite:////tmp/a b/jobs.db", given) == (
        "fabricflow daemon --db 'sqlite:////tmp/a b/jobs.db' --config 'my config.toml' "
        "--fabric-url http://127.0.0.1:8080")
    assert shlex.split(daemon_command("sqlite:////tmp/a b/jobs.db", given))[3] == "sqlite:////tmp/a b/jobs.db"


def test_a_password_is_never_shown():
    command = daemon_command("postgresql+asyncpg://ff:s3cret@db.example/fabricflow", {"region": "cn-north-4"})
    assert command == "fabricflow daemon --db 'postgresql+asyncpg://ff:***@db.example/fabricflow' --region cn-north-4"
    assert "s3cret" not in no_daemon_notice(command)


def test_the_notice_reads_as_one_line():
    assert no_daemon_notice("fabricflow daemon --db sqlite:///j.db") == (
        "fabricflow: no daemon is alive on this database (fabricflow status shows the registry); "
        "start one with: fabricflow daemon --db sqlite:///j.db")
