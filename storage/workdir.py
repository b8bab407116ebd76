"""The work dir as an fsspec location: a local path, or a URL (s3://bucket/prefix, gs://, file://)
that stages on different machines share.

Stages read and write files through a local mirror: for a local work dir the mirror is the work dir
itself and every call below is a no-op or a plain file operation; for a remote one it is a
per-machine scratch folder, `publish` uploads a finished folder (its completion marker last: object
stores have no rename, so the marker is written only once everything else is in place) and `fetch`
downloads what a stage needs. Whether an output exists is always asked of the work dir itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath

import fsspec


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def scratch_root() -> Path:
    """Where machines keep local mirrors of remote work dirs ($SAEFLOW_SCRATCH, else ~/.cache/saeflow)."""
    return Path(os.environ.get("SAEFLOW_SCRATCH") or Path.home() / ".cache" / "saeflow").resolve()


class Workdir:
    def __init__(self, location: str, options: dict | None = None):
        self.remote = is_url(location)
        self.options = dict(options or {})
        if self.remote:
            self.url = location.rstrip("/")
            self.fs, self._root = fsspec.core.url_to_fs(self.url, **self.options)
            digest = hashlib.sha256(self.url.encode()).hexdigest()[:12]
            self.local_root = scratch_root() / "workdirs" / digest
        else:
            path = Path(location.removeprefix("file://")).resolve()
            self.url, self.fs, self._root, self.local_root = str(path), None, str(path), path

    def __repr__(self) -> str:
        return f"Workdir({self.url!r})"

    @property
    def _remote_fs(self):
        """The file system of a URL work dir (the methods below use it only when `remote`)."""
        if self.fs is None:
            raise ValueError(f"{self.url} is a local work dir: it has no remote file system")
        return self.fs

    # names ------------------------------------------------------------------------------------------
    def location(self, rel: str) -> str:
        """The URL (or local path) of `rel` inside the work dir, for messages and metadata."""
        return f"{self.url}/{rel}" if rel else self.url

    def local(self, rel: str = "") -> Path:
        """The local path where `rel` is read and written (the work dir itself when it is local)."""
        return self.local_root / rel if rel else self.local_root

    def _remote(self, rel: str) -> str:
        return str(PurePosixPath(self._root) / rel)

    # questions asked of the work dir itself ---------------------------------------------------------
    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (self.local_root / rel).exists()
        return self._remote_fs.exists(self._remote(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names directly under `rel` (empty when it does not exist)."""
        if not self.remote:
            path = self.local_root / rel
            return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        try:
            entries = self._remote_fs.ls(self._remote(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(e).name for e in entries)

    def read_bytes(self, rel: str) -> bytes:
        if not self.remote:
            return (self.local_root / rel).read_bytes()
        return self._remote_fs.cat_file(self._remote(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Writes one file into the mirror (whole, or not at all) and, for a remote work dir, uploads it."""
        path = self.local(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        if self.remote:
            self._remote_fs.put_file(str(path), self._remote(rel))

    # moving folders between the mirror and the work dir ---------------------------------------------
    def publish(self, rel: str, marker: str | None = None) -> None:
        """Uploads the mirror's folder `rel` (the file `marker` last, so that it appears only once the rest
        is complete). A local work dir is its own mirror: nothing to do."""
        if not self.remote:
            return
        folder = self.local(rel)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
        files.sort(key=lambda p: p.relative_to(folder).as_posix() == marker)
        for path in files:
            self._remote_fs.put_file(str(path), self._remote(f"{rel}/{path.relative_to(folder).as_posix()}"))

    def fetch(self, rel: str) -> Path:
        """The work dir's folder `rel` in the mirror (downloaded afresh for a remote work dir)."""
        target = self.local(rel)
        if self.remote:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True, exist_ok=True)
            for name in self._remote_fs.find(self._remote(rel)):
                relative = PurePosixPath(name).relative_to(self._remote(rel))
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                self._remote_fs.get_file(name, str(target / relative))
        return target

    def remove(self, rel: str) -> None:
        """Removes a folder from the work dir (and the mirror)."""
        shutil.rmtree(self.local(rel), ignore_errors=True)
        if self.remote and self._remote_fs.exists(self._remote(rel)):
            self._remote_fs.rm(self._remote(rel), recursive=True)


class StorageProblem(OSError):
    """A work dir or store location that cannot be used: `kind` is unreachable, credentials, missing."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def probe(location: str, options: dict | None = None, timeout: float = 5.0) -> None:
    """Reads the root of a URL location once, with a short timeout and no retries, so that an
    unreachable endpoint, missing credentials or a missing bucket are found in seconds, before any
    work. Local paths are left to the work dir's own checks."""
    if not is_url(location):
        return
    options = dict(options or {})
    protocol = location.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.update(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
        options.update(config_kwargs=config, skip_instance_cache=True)
    fs, path = fsspec.core.url_to_fs(location, **options)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True) if protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs") else fs.exists(path)
    except FileNotFoundError as e:
        raise StorageProblem("missing", f"{bucket} does not exist ({_first_line(e)})") from None
    except PermissionError as e:
        raise StorageProblem("credentials", f"access denied ({_first_line(e)})") from None
    except Exception as e:  # the clients' own types: botocore's NoCredentialsError, EndpointConnectionError, ...
        name = type(e).__name__
        if "Credential" in name or "Signature" in str(e) or "AccessKey" in str(e):
            raise StorageProblem("credentials", f"no usable credentials ({name}: {_first_line(e)})") from None
        raise StorageProblem("unreachable", f"{name}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
