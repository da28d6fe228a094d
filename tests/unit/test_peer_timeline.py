"""benchmarks/peer.py's timeline (where a job's time goes, read from its events) and its bounds."""

import argparse

from benchmarks.peer import bounds, step_seconds


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


def test_bounds_set_the_targets_beside_the_cap_and_the_floors():
    args = argparse.Namespace(concurrency=100, ready_after=0.5, instance_ready_after=0.2)
    median = {"fabricflow": {"jobs_per_s": 76.4, "cpu_ms_per_job": 10.5, "run_cpu_ms_per_job": 8.8,
                             "requests_per_job": 16.9},
              "dbos": {"jobs_per_s": 21.8, "cpu_ms_per_job": 44.2}}
    assert bounds(args, median, {"cpu_us_per_request": 130.0}) == {
        "jobs_per_s_cap": 142.9,  # 100 jobs at a time, none shorter than 0.5 s + 0.2 s
        "target_jobs_per_s": 218.0,
        "cap_over_dbos": 6.553,
        "target_cpu_ms_per_job": 4.42,
        "http_request_cpu_us": 130.0,
        "http_client_ms_per_job": 2.2,  # 130 us x 16.9 requests
        "startup_ms_per_job": 1.7,
    }


def test_bounds_without_the_peer_or_the_floor_give_the_cap_alone():
    args = argparse.Namespace(concurrency=20, ready_after=0.5, instance_ready_after=0.5)
    assert bounds(args, {"fabricflow": {"jobs_per_s": 10.0}}, None) == {"jobs_per_s_cap": 20.0}
