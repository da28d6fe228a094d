"""The power-cut harness itself: unsynced writes are dropped, synced ones survive, SQLite agrees.

Each test runs a tiny Python child under the shim, lets it do its writes, SIGKILLs it once it
says "ready" (a kill alone loses nothing: the page cache survives it), then cuts the power.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.power.powercut import cut_power, env_with_shim, read_undo_log

PRELUDE = textwrap.dedent("""
    import os, sys
    disk = os.environ["POWERCUT_DIR"]
    def f(name, flags=os.O_RDWR | os.O_CREAT):
        return os.open(os.path.join(disk, name), flags, 0o644)
    def ready():
        print("ready", flush=True)
        sys.stdin.read()  # until SIGKILL
""")


def run_killed(shim: Path, disk: Path, code: str, *args: str) -> None:
    """Run ``code`` in a Python child under the shim; SIGKILL it once it calls ready()."""
    env = {**os.environ, **env_with_shim(shim, disk)}
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"child did not get ready ({line!r}):\n{out}\n{err}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def disk_of(tmp_path: Path) -> Path:
    disk = tmp_path / "disk"
    disk.mkdir()
    return disk


def test_fsynced_write_survives(tmp_path, shim):
    disk = disk_of(tmp_path)
    run_killed(shim, disk, """
        fd = f("file")
        os.write(fd, b"durable")
        os.fsync(fd)
        ready()
    """)
    cut = cut_power(disk)
    assert (disk / "file").read_bytes() == b"durable"
    assert cut["records"] == 0 and cut["logs"] == ["file"], cut  # the shim saw the file; nothing to drop


def test_write_without_fsync_is_gone(tmp_path, shim):
    disk = disk_of(tmp_path)
    run_killed(shim, disk, """
        fd = f("file")
        os.write(fd, b"durable")
        os.fdatasync(fd)
        os.write(fd, b" but not this")
        new = f("never-synced")
        os.write(new, b"gone")
        ready()
    """)
    assert (disk / "file").read_bytes() == b"durable but not this"  # SIGKILL alone loses nothing
    records, torn = read_undo_log(disk / ".undo" / "file.undo")
    assert [(r["kind"], r["offset"], r["length"], r["old_size"]) for r in records] == [("write", 7, 13, 7)]
    assert torn == 0
    cut = cut_power(disk)
    assert (disk / "file").read_bytes() == b"durable"
    # Creating a file is durable at once (metadata); its unsynced contents are not.
    assert (disk / "never-synced").read_bytes() == b""
    assert cut["files"]["file"]["records"] == 1 and cut["files"]["file"]["bytes"] == 13, cut
    assert cut["files"]["never-synced"]["bytes"] == 4, cut
    assert cut["records"] == 2
    assert not (disk / ".undo").exists()


def test_overwrite_without_fsync_is_restored(tmp_path, shim):
    disk = disk_of(tmp_path)
    run_killed(shim, disk, """
        fd = f("file")
        os.write(fd, b"AAAAAAAA")
        os.fsync(fd)
        os.pwrite(fd, b"BB", 2)      # overwrites old bytes
        os.pwrite(fd, b"CCCC", 6)    # half over old bytes, half past the end
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"D")           # write(2) at the file offset
        os.writev(fd, [b"E", b"F"])  # and writev
        ready()
    """)
    assert (disk / "file").read_bytes() == b"DEFBAACCCC"
    cut = cut_power(disk)
    assert (disk / "file").read_bytes() == b"AAAAAAAA"
    assert cut["files"]["file"]["writes"] == 4, cut


def test_truncate_without_fsync_is_undone(tmp_path, shim):
    disk = disk_of(tmp_path)
    run_killed(shim, disk, """
        fd = f("file")
        os.write(fd, b"0123456789")
        os.fsync(fd)
        os.ftruncate(fd, 4)
        os.pwrite(fd, b"xy", 4)
        os.ftruncate(fd, 100)  # growing is undone too
        ready()
    """)
    assert (disk / "file").stat().st_size == 100
    cut = cut_power(disk)
    assert (disk / "file").read_bytes() == b"0123456789"
    assert cut["files"]["file"]["truncates"] == 2, cut


def test_sync_in_one_process_covers_the_writes_of_another(tmp_path, shim):
    disk = disk_of(tmp_path)
    run_killed(shim, disk, """
        os.write(f("file"), b"a")  # this process never syncs
        ready()
    """)
    run_killed(shim, disk, """
        fd = f("file")
        os.pwrite(fd, b"b", 1)
        os.fsync(fd)               # the file's data is durable, whoever wrote it
        os.pwrite(fd, b"c", 2)
        ready()
    """)
    cut_power(disk)
    assert (disk / "file").read_bytes() == b"ab"


def test_unlink_is_durable_and_a_new_file_of_the_same_name_starts_clean(tmp_path, shim):
    disk = disk_of(tmp_path)
    run_killed(shim, disk, """
        fd = f("file")
        os.write(fd, b"old contents, never synced")
        os.close(fd)
        os.unlink(os.path.join(disk, "file"))
        fd = f("file")
        os.write(fd, b"new")
        os.fsync(fd)
        os.write(f("x.db-shm"), b"shared memory is not modelled")
        os.write(f("moved"), b"synced")
        os.fsync(f("moved"))
        os.write(f("moved"), b"!")
        os.rename(os.path.join(disk, "moved"), os.path.join(disk, "renamed"))  # its writes go along
        ready()
    """)
    cut = cut_power(disk)
    assert (disk / "file").read_bytes() == b"new"
    assert not (disk / "x.db-shm").exists()  # a reboot leaves no shared memory
    assert cut["shm_deleted"] == ["x.db-shm"]
    assert (disk / "renamed").read_bytes() == b"synced"
    assert sorted(cut["logs"]) == ["file", "renamed"], cut


SQLITE_CHILD = """
    import sqlite3
    path, mode, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("INSERT INTO t VALUES (0, 'baseline')")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute(f"PRAGMA synchronous={mode}")
    for i in range(1, rows + 1):
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, f"row {i}"))  # one commit each
    ready()  # committed, connection still open: killed without a checkpoint on close
"""

ROWS = 20


def sqlite_rows(db: Path) -> tuple[int, str]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT COUNT(*) FROM t").fetchone()[0], conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def copy_db(db: Path, to: Path) -> Path:
    to.mkdir()
    for suffix in ("", "-wal"):
        if Path(f"{db}{suffix}").exists():
            shutil.copyfile(f"{db}{suffix}", to / f"{db.name}{suffix}")
    return to / db.name


def test_sqlite_synchronous_off_loses_committed_rows(tmp_path, shim):
    """The harness bites: commits that SQLite never fsynced are gone after the cut."""
    disk = disk_of(tmp_path)
    db = disk / "data" / "test.db"
    db.parent.mkdir()
    run_killed(shim, disk, SQLITE_CHILD, str(db), "OFF", str(ROWS))
    # SIGKILL alone loses nothing: a copy of the files as they stand has every row.
    assert sqlite_rows(copy_db(db, tmp_path / "before-cut")) == (ROWS + 1, "ok")
    cut = cut_power(disk)
    assert cut["files"]["data/test.db-wal"]["records"] >= ROWS, cut
    assert sqlite_rows(db) == (1, "ok")  # the baseline, checkpointed and synced, is all that is left


def test_sqlite_synchronous_full_keeps_every_committed_row(tmp_path, shim):
    disk = disk_of(tmp_path)
    db = disk / "data" / "test.db"
    db.parent.mkdir()
    run_killed(shim, disk, SQLITE_CHILD, str(db), "FULL", str(ROWS))
    cut = cut_power(disk)
    assert "data/test.db-wal" in cut["logs"], cut  # the shim saw SQLite's WAL writes
    assert sqlite_rows(db) == (ROWS + 1, "ok"), cut
