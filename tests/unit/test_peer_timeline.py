"""benchmarks/peer.py's timeline: where a job's time goes, read from its events."""

from benchmarks.peer import step_seconds


def test_each_step_is_timed_from_the_end_of_the_one_before():
    events = [
        ("j1", "2026-12-01 10:00:00.000000", None, "PENDING"),  # submitted: not part of the run
        ("j1", "2026-12-01 10:00:05.000000", None, "RUNNING"),  # claimed
        ("j1", "2026-12-01 10:00:05.100000", "workspace", "IN_FLIGHT"),
        ("j1", "2026-12-01 10:00:05.200000", "workspace", "SUCCEEDED"),
        ("j1", "2026-12-01 10:00:05.200000", "endpoint_ready", "WAITING"),
        ("j1", "2026-12-01 10:00:05.300000", "endpoint_ready", "WAITING"),
        ("j1", "2026-12-01 10:00:05.900000", "endpoint_ready", "SUCCEEDED"),
        ("j1", "2026-12-01 10:00:05.900000", None, "SUCCEEDED"),
        ("j2", "2026-12-01 10:00:06.000000", None, "RUNNING"),
        ("j2", "2026-12-01 10:00:06.400000", "workspace", "SUCCEEDED"),
        ("j2", "2026-12-01 10:00:07.000000", "endpoint_ready", "SUCCEEDED"),
        ("j2", "2026-12-01 10:00:07.000000", None, "SUCCEEDED"),
        ("j3", "2026-12-01 10:00:06.000000", "workspace", "SUCCEEDED"),  # never claimed in this log
    ]
    assert step_seconds(events) == {"workspace": 0.3, "endpoint_ready": 0.65, "job": 0.95}
