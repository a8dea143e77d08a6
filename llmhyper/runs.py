"""The run folder: the one owner of its format. A run of `generate`, a trust study or any resumable job
keeps everything in one folder and picks up where it stopped:

    RUN/config.json     the settings; a rerun with other settings is refused (written with the first record)
    RUN/<records>/      one JSON record per finished item (default `ads/`), written atomically
    RUN/calls.jsonl     every LLM call, one JSON per line, tagged with the item and the session
    RUN/weights/        the servable artifact (when the job makes one)
    RUN/manifest.json   what produced the run, its times and totals
    RUN/.lock           held while a process works in the folder: two processes never share a run

Item ids become file names through `store.safe_name`, so no id can write outside the folder.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any, Callable

from llmhyper.errors import DataError, LLMHyperError
from llmhyper.store import (
    append_jsonl,
    now,
    read_json,
    read_jsonl,
    remove_stale_temps,
    safe_name,
    write_json_atomic,
)

DONE = ("ok", "partial")  # record statuses that count as finished; "failed" items are retried


class RunBusy(LLMHyperError):
    """Another process holds the run folder."""


class SettingsMismatch(LLMHyperError):
    """The folder holds a run made with other settings."""


def settings_diff(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    keys = (set(old) | set(new)) - set(ignore)
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


class RunDir:
    CONFIG, CALLS, MANIFEST, WEIGHTS, LOCK = "config.json", "calls.jsonl", "manifest.json", "weights", ".lock"

    def __init__(self, path: str | Path, records: str = "ads"):
        self.path = Path(path)
        self.records_dir = self.path / records
        self.session = f"{now()}#{os.getpid()}"  # tags this process's call-log lines
        self._lock_fd: int | None = None

    # -- one process at a time ------------------------------------------------------------------
    def __enter__(self) -> RunDir:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise LLMHyperError(f"{self.path} is a file, not a run folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a parent is a file
            raise LLMHyperError(f"cannot make the run folder {self.path}: {exc.strerror}") from None
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunBusy(
                f"{self.path} is in use by another llmhyper process (pid {holder}); "
                "wait for it or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        remove_stale_temps(self.path)
        if self.records_dir.exists():
            remove_stale_temps(self.records_dir)

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- settings guard -------------------------------------------------------------------------
    def settings(self) -> dict[str, Any] | None:
        path = self.path / self.CONFIG
        return read_json(path, "run settings") if path.exists() else None

    def check_settings(
        self, settings: dict[str, Any], *, force: bool = False, ignore: tuple[str, ...] = ()
    ) -> None:
        """Refuse to continue a run made with other settings (keys in `ignore` may differ). Writes
        nothing: the settings are saved with the first record, so a start that fails early leaves the
        folder free for a corrected command."""
        old = self.settings()
        if old is None or force:
            return
        diff = settings_diff(old, settings, ignore)
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, b_a in diff.items() for a, b in [b_a])
            raise SettingsMismatch(
                f"{self.path} holds a run with other settings ({shown[:400]}); use another "
                "folder, or --force to continue anyway"
            )

    def save_settings(self, settings: dict[str, Any]) -> None:
        write_json_atomic(self.path / self.CONFIG, settings)

    # -- records --------------------------------------------------------------------------------
    def record_path(self, item_id: str) -> Path:
        return self.records_dir / f"{safe_name(item_id)}.json"

    def read_record(self, item_id: str) -> dict[str, Any] | None:
        path = self.record_path(item_id)
        return read_json(path, "run record") if path.exists() else None

    def records(self, key: Callable[[dict[str, Any]], str] | None = None) -> dict[str, dict[str, Any]]:
        """Every record in the folder by item id (the id stored inside, not the file name; `key` makes the
        id of a record when an item is more than an ad, e.g. ad x feature x type)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.records_dir.is_dir():
            return out
        for p in sorted(self.records_dir.glob("*.json")):
            rec = read_json(p, "run record")
            try:
                item_id = key(rec) if key else (rec["ad_id"] if "ad_id" in rec else rec["id"])
            except (KeyError, TypeError, AttributeError):
                raise DataError("run record without an id", file=str(p)) from None
            out[str(item_id)] = rec
        return out

    def finished(
        self, statuses: tuple[str, ...] = DONE, key: Callable[[dict[str, Any]], str] | None = None
    ) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.records(key).items() if r.get("status", "ok") in statuses}

    def write_record(
        self, item_id: str, record: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> None:
        """Save one item's record atomically (and the run's settings with the first one)."""
        if settings is not None and not (self.path / self.CONFIG).exists():
            self.save_settings(settings)
        write_json_atomic(self.record_path(item_id), {**record, "session": self.session})

    # -- call log -------------------------------------------------------------------------------
    def append_calls(self, item_id: str, calls: list[dict[str, Any]]) -> None:
        """Log an item's LLM calls before its record is written; calls of an item killed before its
        record stay in the log under their session, and a record names the session whose calls made it."""
        append_jsonl(
            self.path / self.CALLS, [{"ad_id": item_id, "session": self.session, **c} for c in calls]
        )

    def calls(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / self.CALLS)

    # -- manifest -------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.path / self.MANIFEST
        return read_json(path, "run manifest") if path.exists() else {}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.path / self.MANIFEST, manifest)

    def session_times(self, resuming: bool) -> dict[str, Any]:
        """`started` (kept from the first session) and `resumed` (one entry per later session)."""
        prev = self.manifest()
        resumed = list(prev.get("resumed", [])) + ([now()] if prev and resuming else [])
        return {"started": prev.get("started") or now(), "resumed": resumed}

    @property
    def weights_dir(self) -> Path:
        return self.path / self.WEIGHTS


def elapsed(t0: float) -> float:
    return round(time.time() - t0, 2)
