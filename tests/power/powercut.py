"""Cut the power as a disk would: writes that no fsync covered are gone after the "reboot".

Processes run with ``env_with_shim`` have ``shim.so`` preloaded: for every regular file under
``POWERCUT_DIR`` (``-shm`` files aside) each write or truncate first appends an undo record
(offset, old bytes, old size) to ``POWERCUT_DIR/.undo/<name>.undo``, and a successful
fsync/fdatasync of the file empties its log. ``cut_power`` runs once every such process has been
SIGKILLed: it applies each log in reverse, so every file is back to what its last sync made
durable, and deletes the ``-shm`` files (a reboot leaves no shared memory; SQLite rebuilds its
WAL index from the WAL).

The model, and where it is kinder or harsher than a real disk:
- per file, every write since that file's last successful fsync/fdatasync is lost, all of them
  and nothing else: no torn sectors, no reordering (a real disk may keep any subset; this keeps
  none, which is one outcome a real disk may produce);
- metadata is durable at once: creating, unlinking and renaming a file need no directory fsync
  (a real file system may lose a new or renamed entry without one); truncation by
  ``open(O_TRUNC)`` is not seen at all (SQLite never uses it; the project's daemon lock file is
  opened with "a+");
- only writes through write/pwrite/pwrite64/writev/pwritev/pwritev64/ftruncate/ftruncate64 are
  seen, which is all SQLite uses (it syncs with fdatasync). Not seen: stores through a shared
  ``mmap`` of a tracked file (SQLite maps only the ``-shm`` file; its ``mmap_size`` is 0 here),
  ``pwritev2``, ``fallocate``, ``copy_file_range``/``sendfile``/``splice``, ``sync``/``syncfs``,
  and libc-internal writes (stdio's ``fwrite`` to a tracked file). Files opened O_SYNC/O_DSYNC
  are durable on every write.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote

HERE = Path(__file__).resolve().parent
SHIM_SOURCE = HERE / "shim.c"

#: The undo record header written by shim.c: magic, kind, offset, length, old_len, old_size.
RECORD = struct.Struct("<IIQQQQ")
MAGIC = 0x31554350
KINDS = {0: "write", 1: "truncate"}
UNDO = ".undo"


def build_shim(tmp_path: Path) -> Path:
    """Compile shim.c into ``tmp_path/shim.so`` (gcc must be there: see ``require_gcc``)."""
    out = Path(tmp_path) / "shim.so"
    cmd = ["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM_SOURCE), "-ldl"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")
    return out


def env_with_shim(shim: Path, directory: Path) -> dict[str, str]:
    """The variables that put a child process under the model for ``directory``."""
    preload = str(Path(shim).resolve())
    inherited = os.environ.get("LD_PRELOAD")
    return {
        "LD_PRELOAD": f"{preload}:{inherited}" if inherited else preload,
        "POWERCUT_DIR": str(Path(directory).resolve()),
    }


def read_undo_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of one undo log in the order written, and the bytes of a torn last record.

    A record is appended (one write call) before the operation it guards starts, so a record cut
    short by the SIGKILL guards an operation that never ran and is safely ignored.
    """
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    at = 0
    while at + RECORD.size <= len(data):
        magic, kind, offset, length, old_len, old_size = RECORD.unpack_from(data, at)
        if magic != MAGIC or kind not in KINDS:
            raise RuntimeError(f"{path}: bad undo record at byte {at}")
        if at + RECORD.size + old_len > len(data):
            break
        old = data[at + RECORD.size: at + RECORD.size + old_len]
        records.append({"kind": KINDS[kind], "offset": offset, "length": length, "old": old, "old_size": old_size})
        at += RECORD.size + old_len
    return records, len(data) - at


def open_writers(directory: Path) -> list[str]:
    """Processes that still hold a file under ``directory`` open (there must be none at a cut)."""
    root = str(Path(directory).resolve())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target == root or target.startswith(root + "/"):
                    found.append(f"pid {proc.name}: {target}")
        except OSError:  # gone, or not ours to look at
            continue
    mine = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target == root or target.startswith(root + "/"):
            mine.append(f"this test process: {target}")
    return found + mine


def cut_power(directory: Path) -> dict[str, Any]:
    """Drop every unsynced write under ``directory``, as a power cut would, and say what went.

    Call it only after every process that wrote there has been SIGKILLed (it checks that none
    still holds a file open there). Returns ``{"records": N, "bytes": N, "files": {relative
    path: {"records", "bytes", "restored_bytes", "size_before", "size_after", "torn_bytes"}},
    "logs": [every undo log found, empty ones included], "shm_deleted": [...]}``, where
    ``bytes`` counts the bytes the dropped writes had written.
    """
    root = Path(directory).resolve()
    still_open = open_writers(root)
    if still_open:
        raise RuntimeError("cut_power: processes still have files open there:\n" + "\n".join(still_open))
    summary: dict[str, Any] = {"records": 0, "bytes": 0, "files": {}, "logs": [], "shm_deleted": []}
    undo_dir = root / UNDO
    for log in sorted(undo_dir.glob("*.undo")) if undo_dir.is_dir() else []:
        relative = unquote(log.name[: -len(".undo")])
        summary["logs"].append(relative)
        records, torn = read_undo_log(log)
        target = root / relative
        if records:
            if not target.exists():
                raise RuntimeError(f"cut_power: {log} holds {len(records)} records for {target}, which is gone")
            fd = os.open(target, os.O_RDWR)
            try:
                size_before = os.fstat(fd).st_size
                for rec in reversed(records):
                    if rec["old"]:
                        os.pwrite(fd, rec["old"], rec["offset"])
                    os.ftruncate(fd, rec["old_size"])
                os.fsync(fd)
                size_after = os.fstat(fd).st_size
            finally:
                os.close(fd)
            dropped = sum(r["length"] for r in records if r["kind"] == "write")
            summary["files"][relative] = {
                "records": len(records), "bytes": dropped, "restored_bytes": sum(len(r["old"]) for r in records),
                "writes": sum(1 for r in records if r["kind"] == "write"),
                "truncates": sum(1 for r in records if r["kind"] == "truncate"),
                "size_before": size_before, "size_after": size_after, "torn_bytes": torn,
            }
            summary["records"] += len(records)
            summary["bytes"] += dropped
        log.unlink()
    if undo_dir.is_dir():
        shutil.rmtree(undo_dir)
    for shm in sorted(root.rglob("*-shm")):
        shm.unlink()
        summary["shm_deleted"].append(str(shm.relative_to(root)))
    return summary
