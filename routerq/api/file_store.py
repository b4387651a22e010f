"""Uploaded batch input files: their bytes on disk under ROUTERQ_FILES_DIR, their file object in Redis.

A batch's output and error files are not stored: `file-out-{batch}` and `file-err-{batch}` are read
from the batch's outcomes in Redis when asked for, the same lines `routerq results` writes.

Keys:
  routerq:file:{id}   hash  the file object, its tenant, its line count and the endpoints its lines use
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, Field

from routerq.api.index import TenantIndex
from routerq.core.errors import SettingsError
from routerq.core.redis_client import as_text

# An upload is written, then validated, then recorded: a file older than this without a record is
# left over (its record expired, or its server died before writing it).
SWEEP_IDLE_S = 600.0
OUTPUT_PREFIX = "file-out-"
ERROR_PREFIX = "file-err-"


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


class StoredFile(BaseModel):
    id: str
    bytes: int
    filename: str
    purpose: str
    owner: str
    lines: int
    urls: list[str]
    created_at: float = Field(default_factory=time.time)

    def openai_object(self) -> dict[str, Any]:
        return file_object(self.id, self.bytes, self.created_at, self.filename, self.purpose)


def file_object(ident: str, size: int, created_at: float, filename: str, purpose: str) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "file",
        "bytes": size,
        "created_at": int(created_at),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def check_writable(directory: Path) -> None:
    """Raise SettingsError (one line, exit 2) when uploads cannot be kept in `directory`."""
    probe = directory / f".probe-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SettingsError(
            f"ROUTERQ_FILES_DIR {directory} is not writable ({exc.strerror or exc})"
        ) from None


class FileStore:
    def __init__(self, client: redis.Redis, directory: Path, ttl: int) -> None:
        self._redis = client
        self._ttl = ttl
        self.directory = directory
        self.index = TenantIndex(client, "files", ttl)
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    def add(self, stored: StoredFile) -> None:
        key = f"routerq:file:{stored.id}"
        self._redis.set(key, stored.model_dump_json(), ex=self._ttl)
        self.index.add(stored.owner, stored.id, stored.created_at)

    def get(self, file_id: str, tenant: str) -> StoredFile | None:
        """The file, when it exists and belongs to `tenant`."""
        raw = self._redis.get(f"routerq:file:{file_id}")
        if raw is None:
            return None
        stored = StoredFile.model_validate(json.loads(as_text(raw)))
        return stored if stored.owner == tenant else None

    def delete(self, stored: StoredFile) -> None:
        """The file first: if removing it fails, the record stays and the delete can be asked again."""
        self.path(stored.id).unlink(missing_ok=True)
        self._redis.delete(f"routerq:file:{stored.id}")
        self.index.remove(stored.owner, stored.id)

    def sweep(self, idle_s: float = SWEEP_IDLE_S) -> int:
        """Remove files whose record has expired (ROUTERQ_RESULT_TTL) or was never written (a server
        killed mid-upload); returns how many. A file written to in the last `idle_s` may be an upload
        still arriving, and stays."""
        now, removed = time.time(), 0
        for path in self.directory.glob("file-*"):
            try:
                if now - path.stat().st_mtime < idle_s or self._redis.exists(f"routerq:file:{path.name}"):
                    continue
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed
