"""The OHIF viewer build (npm package ``@ohif/app``): fetched, checked, unpacked, found.

kho serves OHIF v3 at ``/viewer/`` (kho.viewer_api.viewer).  The prebuilt static site is the
``dist/`` folder of the npm package; it is not vendored into kho (about 50 MB packed) but
installed into ``<data_dir>/viewer/ohif-<version>/`` (setting ``viewer_dir`` to put it
elsewhere) by ``kho viewer install``, or by ``kho serve`` in a background thread on first
start when it is missing.

Integrity: kho pins one version and its npm ``dist.integrity`` (SRI, SHA-512) in this
file, so an install is reproducible and a registry (or a mirror) that serves other bytes
is refused.  The registry's published integrity for the version must equal the pin, and
the downloaded tarball must hash to it, before anything is unpacked.  Another version
(``--version``) is checked against the integrity the registry publishes for it; an offline
tarball (``--from FILE``) against ``--sha512`` or, by default, the pin.

Unpacking keeps ``dist/`` (minus source maps) and the package's ``LICENSE`` (OHIF is MIT
licensed: the licence travels with the copy), through tarfile's ``data`` filter (no
absolute paths, links out of the tree or device files).  Two changes are made to the
unpacked copy, both recorded in its manifest (``kho-viewer.json``):

- the build's webpack public path (``"/"``: built to be served at a site's root) becomes
  the URL the page was served under (``window.PUBLIC_URL``, which kho writes into
  ``index.html``), or, in a web worker, the worker script's own folder, so the chunks,
  workers and WebAssembly codecs load from ``/viewer/`` or from behind any proxy prefix;
  the style sheets' and the web app manifest's root-relative URLs (a font, the icons)
  become relative to the file, for the same reason;
- every text or WebAssembly file gets a gzip twin (``.gz``), sent to browsers that accept
  it: the application bundle is 17 MB, 4 MB gzipped.

A new install is written beside the old one and switched to atomically (the ``current``
file), so a running server never sees a half-unpacked viewer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kho.errors import KhoError

log = logging.getLogger(__name__)

PACKAGE = "@ohif/app"
#: the version kho installs and its npm dist.integrity (registry.npmjs.org, 2026-12)
PINNED_VERSION = "3.13.2"
PINNED_INTEGRITY = (
    "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PP"
    "e6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
)
REGISTRY = "https://registry.npmjs.org"
LICENCE = "MIT"

#: the manifest in each installed build; the file naming the build in use
MANIFEST = "kho-viewer.json"
#: what this installer does to an unpacked build (patches, twins): a build made by an
#: older installer is installed again (kho serve does so on start)
LAYOUT = 2
CURRENT = "current"
#: the webpack runtime's public path as OHIF's production build writes it
_PUBLIC_PATH = re.compile(rb'__webpack_require__\.p = "/";')
#: what it becomes: the page's PUBLIC_URL (index.html), else the script's folder (workers)
_RUNTIME_PUBLIC_PATH = (
    b"__webpack_require__.p = (function(){try{if(typeof window!=='undefined'&&"
    b"window.PUBLIC_URL){return window.PUBLIC_URL}var u=String(self.location.href)"
    b".split(/[?#]/)[0];return u.slice(0,u.lastIndexOf('/')+1)}catch(e){return '/'}})();"
)
#: files worth a gzip twin (WebAssembly compresses ~3x, JavaScript ~4x)
_COMPRESSIBLE = frozenset(
    {".js", ".mjs", ".css", ".html", ".json", ".jsonc", ".svg", ".wasm", ".map", ".txt", ".xml"}
)
_GZIP_MIN_BYTES = 1024
#: refuse tarballs larger than this (the pinned one is 50 MB)
MAX_TARBALL_BYTES = 512 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 60.0


class ViewerInstallError(KhoError):
    """The viewer could not be installed: the registry unreachable, a hash that does not
    match, a tarball that is not an OHIF build."""


@dataclass(frozen=True, slots=True)
class OhifBuild:
    """One installed OHIF build."""

    root: Path  # <viewer_dir>/ohif-<version>
    version: str
    integrity: str
    source: str  # the tarball's URL, or the file it was installed from
    licence: str
    installed_at: float
    size: int  # bytes unpacked (gzip twins not counted)
    layout: int = 0  # the installer's LAYOUT that made it

    @property
    def current(self) -> bool:
        """Made by this installer (else installing again adapts it to this kho)."""
        return self.layout == LAYOUT

    @property
    def dist(self) -> Path:
        return self.root / "dist"

    @property
    def licence_file(self) -> Path:
        return self.root / "LICENSE"

    def describe(self) -> dict[str, Any]:
        return {
            "package": PACKAGE,
            "version": self.version,
            "integrity": self.integrity,
            "source": self.source,
            "licence": self.licence,
            "licence_file": str(self.licence_file),
            "installed_at": self.installed_at,
            "size": self.size,
            "layout": self.layout,
            "path": str(self.root),
            "pinned": self.version == PINNED_VERSION and self.integrity == PINNED_INTEGRITY,
        }


def viewer_dir(settings: Any) -> Path:
    """Where builds are installed: the ``viewer_dir`` setting, else ``<data_dir>/viewer``."""
    configured = settings.viewer_dir or ""
    return Path(configured) if str(configured) else Path(settings.data_dir) / "viewer"


def installed(directory: Path) -> OhifBuild | None:
    """The build in use under ``directory`` (its ``current`` file), or None."""
    try:
        name = (directory / CURRENT).read_text().strip()
    except OSError:
        return None
    if not name or "/" in name or name.startswith("."):
        return None
    root = directory / name
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not (root / "dist" / "index.html").is_file():
        return None
    return OhifBuild(
        root=root,
        version=str(manifest["version"]),
        integrity=str(manifest["integrity"]),
        source=str(manifest.get("source", "")),
        licence=str(manifest.get("licence", LICENCE)),
        installed_at=float(manifest.get("installed_at", 0)),
        size=int(manifest.get("size", 0)),
        layout=int(manifest.get("layout", 0)),
    )


# --- integrity (Subresource Integrity strings, as npm publishes them) --------------------


def sha512_sri(digest: bytes) -> str:
    return "sha512-" + base64.b64encode(digest).decode()


def expected_sha512(value: str) -> bytes:
    """The SHA-512 digest an SRI string (``sha512-<base64>``, several space-separated
    allowed: the sha512 one counts) or a 128-digit hex string names."""
    text = value.strip()
    if re.fullmatch(r"[0-9a-fA-F]{128}", text):
        return bytes.fromhex(text)
    for token in text.split():
        algorithm, _, encoded = token.partition("-")
        if algorithm == "sha512":
            try:
                digest = base64.b64decode(encoded.split("?")[0], validate=True)
            except ValueError:
                break
            if len(digest) == 64:
                return digest
    raise ViewerInstallError(
        f"{value!r} is not a SHA-512 integrity (sha512-<base64> as npm publishes it, or 128 "
        "hex digits)"
    )


# --- the registry -------------------------------------------------------------------------


def _get(url: str, timeout: float) -> Any:
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "kho"}
    )
    return urllib.request.urlopen(request, timeout=timeout)


def registry_dist(
    version: str, *, registry: str = REGISTRY, timeout: float = DOWNLOAD_TIMEOUT_S
) -> tuple[str, str]:
    """(tarball URL, published integrity) of ``@ohif/app@version`` from the registry's
    package metadata."""
    if not re.fullmatch(r"[0-9A-Za-z.+-]{1,64}", version):
        raise ViewerInstallError(f"{version!r} is not a version")
    url = f"{registry.rstrip('/')}/{urllib.parse.quote(PACKAGE, safe='@')}/{version}"
    try:
        with _get(url, timeout) as response:
            document = json.load(response)
    except (OSError, ValueError) as exc:
        raise ViewerInstallError(f"cannot read {PACKAGE}@{version} from {url}: {exc}") from exc
    dist = document.get("dist") if isinstance(document, dict) else None
    if not isinstance(dist, dict) or not dist.get("tarball") or not dist.get("integrity"):
        raise ViewerInstallError(f"{url} names no tarball and integrity for {version}")
    return str(dist["tarball"]), str(dist["integrity"])


def download(url: str, into: BinaryIO, timeout: float) -> bytes:
    """Stream ``url`` into ``into``; the SHA-512 of what came."""
    digest = hashlib.sha512()
    total = 0
    request = urllib.request.Request(url, headers={"User-Agent": "kho"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                total += len(chunk)
                if total > MAX_TARBALL_BYTES:
                    raise ViewerInstallError(f"{url} is larger than {MAX_TARBALL_BYTES} bytes")
                digest.update(chunk)
                into.write(chunk)
    except OSError as exc:
        raise ViewerInstallError(f"cannot download {url}: {exc}") from exc
    return digest.digest()


def _file_sha512(path: Path) -> bytes:
    digest = hashlib.sha512()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


# --- install ------------------------------------------------------------------------------


def install(
    directory: Path,
    *,
    version: str = PINNED_VERSION,
    tarball: Path | None = None,
    sha512: str | None = None,
    registry: str = REGISTRY,
    progress: Callable[[str], None] = log.info,
) -> OhifBuild:
    """Install OHIF into ``directory`` and make it the build in use; returns it.

    From the registry (``tarball`` None): ``version``'s published integrity must equal
    kho's pin when it is the pinned version, and the tarball must match it.  From a file:
    its SHA-512 must equal ``sha512`` (SRI or hex), or the pin when none is given.
    Raises ViewerInstallError before anything is unpacked when a check fails."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as scratch:
        if tarball is None:
            url, published = registry_dist(version, registry=registry)
            if version == PINNED_VERSION and expected_sha512(published) != expected_sha512(
                PINNED_INTEGRITY
            ):
                raise ViewerInstallError(
                    f"the registry publishes {published} for {PACKAGE}@{version}; kho pins "
                    f"{PINNED_INTEGRITY}: refusing (a changed package or a wrong mirror)"
                )
            expected = published
            source = url
            path = Path(scratch) / "package.tgz"
            progress(f"downloading {PACKAGE}@{version} from {url}")
            with path.open("wb") as fh:
                got = download(url, fh, DOWNLOAD_TIMEOUT_S)
        else:
            expected = sha512 or PINNED_INTEGRITY
            source = str(Path(tarball).resolve())
            path = Path(tarball)
            got = _file_sha512(path)
        if got != expected_sha512(expected):
            raise ViewerInstallError(
                f"{source} has SHA-512 {sha512_sri(got)}, not {expected}: refusing to unpack it"
            )
        progress(f"integrity {sha512_sri(got)} checked; unpacking")
        return _unpack(directory, path, sha512_sri(got), source, progress)


def _unpack(
    directory: Path, tarball: Path, integrity: str, source: str, progress: Callable[[str], None]
) -> OhifBuild:
    staging = Path(tempfile.mkdtemp(prefix=".ohif-", dir=directory))
    try:
        package = _extract(tarball, staging)
        version = str(package.get("version", ""))
        if package.get("name") != PACKAGE or not re.fullmatch(r"[0-9A-Za-z.+-]{1,64}", version):
            raise ViewerInstallError(f"{source} is not an {PACKAGE} package")
        dist = staging / "dist"
        if not (dist / "index.html").is_file():
            raise ViewerInstallError(f"{source} has no dist/index.html: not a built viewer")
        patched = _patch_public_path(dist) + _patch_root_relative_urls(dist)
        size = sum(p.stat().st_size for p in dist.rglob("*") if p.is_file())
        gzipped = _gzip_twins(dist)
        manifest = {
            "package": PACKAGE,
            "version": version,
            "integrity": integrity,
            "source": source,
            "licence": str(package.get("license", LICENCE)),
            "installed_at": time.time(),
            "size": size,
            "layout": LAYOUT,
            "patched_for_prefix": patched,
            "gzip_twins": gzipped,
            "source_maps": "not installed",
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        name = f"ohif-{version}"
        target = directory / name
        if target.exists():  # a reinstall: the old copy goes once the new one is in place
            retired = directory / f".retired-{name}-{os.getpid()}-{time.monotonic_ns()}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
        _write_atomically(directory / CURRENT, name + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    build = installed(directory)
    if build is None:  # pragma: no cover - what was just written reads back
        raise ViewerInstallError(f"the install in {directory} does not read back")
    progress(f"OHIF {build.version} installed in {build.root} ({size / 1e6:.0f} MB, {LICENCE})")
    return build


def _extract(tarball: Path, staging: Path) -> dict[str, Any]:
    """``package/dist/**`` (no source maps), LICENSE and package.json into ``staging``;
    the package.json document."""
    package: dict[str, Any] = {}
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            members = []
            for member in archive.getmembers():
                name = member.name
                if not name.startswith("package/"):
                    continue
                inner = name[len("package/") :]
                if inner == "package.json" and member.isfile():
                    handle = archive.extractfile(member)
                    if handle is not None:
                        package = json.loads(handle.read(1 << 20))
                    continue
                wanted = inner in ("LICENSE", "README.md") or inner.startswith("dist/")
                if not wanted or inner.endswith(".map") or not (member.isfile() or member.isdir()):
                    continue
                member.name = inner
                members.append(member)
            archive.extractall(staging, members=members, filter="data")
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise ViewerInstallError(f"cannot unpack {tarball}: {exc}") from exc
    if not (staging / "LICENSE").is_file():
        raise ViewerInstallError(f"{tarball} carries no LICENSE file")
    return package


def _patch_public_path(dist: Path) -> list[str]:
    """The webpack runtimes' fixed public path made relative to where the page is served
    (see the module's note); the files changed.  None found: not a layout kho knows."""
    patched = []
    for path in sorted(dist.glob("*.js")):
        data = path.read_bytes()
        new, count = _PUBLIC_PATH.subn(_RUNTIME_PUBLIC_PATH, data)
        if count:
            path.write_bytes(new)
            patched.append(path.name)
    if not any(name.startswith("app.bundle.") for name in patched):
        raise ViewerInstallError(
            "the build's application bundle sets no public path kho recognises: this OHIF "
            "version cannot be served under /viewer/ (install the pinned version)"
        )
    return patched


def _patch_root_relative_urls(dist: Path) -> list[str]:
    """``url(/x)`` in the style sheets and ``"/assets/..."`` in the web app manifest made
    relative to the file (both sit at dist's top, as the page's base does)."""
    patched = []
    rules = [("*.css", rb"url\(\s*(['\"]?)/(?!/)", rb"url(\1")]
    rules.append(("manifest.json", rb'"/(?!/)(assets/)', rb'"\1'))
    for pattern, find, replace in rules:
        for path in sorted(dist.glob(pattern)):
            data = path.read_bytes()
            new, count = re.subn(find, replace, data)
            if count:
                path.write_bytes(new)
                patched.append(path.name)
    return patched


def _gzip_twins(dist: Path) -> int:
    """A ``.gz`` beside every compressible file where gzip saves at least a tenth; on
    every core (zlib releases the GIL)."""
    candidates = [
        p
        for p in dist.rglob("*")
        if p.suffix in _COMPRESSIBLE and p.is_file() and p.stat().st_size >= _GZIP_MIN_BYTES
    ]

    def twin(path: Path) -> bool:
        data = path.read_bytes()
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip framing
        packed = compressor.compress(data) + compressor.flush()
        if len(packed) > 0.9 * len(data):
            return False
        path.with_name(path.name + ".gz").write_bytes(packed)
        return True

    # the largest first, so one big file does not finish last on its own
    candidates.sort(key=lambda p: p.stat().st_size, reverse=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return sum(pool.map(twin, candidates))


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# --- kho serve: install on first start ------------------------------------------------------


class BackgroundInstall:
    """An install running in a daemon thread (``kho serve`` on first start): what the
    viewer's placeholder page says meanwhile."""

    def __init__(self, directory: Path, registry: str = REGISTRY) -> None:
        self.directory = directory
        self.registry = registry
        self.status = f"downloading OHIF {PINNED_VERSION} from {registry}"
        self.error: str | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kho-viewer-install", daemon=True)

    def start(self) -> BackgroundInstall:
        self._thread.start()
        return self

    def _run(self) -> None:
        def progress(message: str) -> None:
            self.status = message
            log.info("viewer: %s", message)

        try:
            install(self.directory, registry=self.registry, progress=progress)
        except Exception as exc:  # reported on the placeholder page and in the log
            self.error = str(exc)
            log.warning(
                "viewer: OHIF could not be installed (%s); /viewer/ says how to install it "
                "by hand (kho viewer install [--from FILE])",
                exc,
            )
        finally:
            self.done.set()


def auto_install(settings: Any) -> bool:
    """The setting ``viewer_auto_install`` (default on)."""
    return bool(settings.viewer_auto_install)


def install_in_background(settings: Any) -> BackgroundInstall | None:
    """Start installing the pinned OHIF when none (or one made by an older installer) is
    installed and the setting ``viewer_auto_install`` (default on) allows, from the
    registry ``viewer_registry`` (default registry.npmjs.org; a hospital's npm mirror);
    None when nothing needs doing."""
    directory = viewer_dir(settings)
    build = installed(directory)
    if (build is not None and build.current) or not auto_install(settings):
        return None
    registry = str(settings.viewer_registry or REGISTRY)
    if build is None:
        log.info("viewer: OHIF is not installed in %s; installing %s", directory, PINNED_VERSION)
    else:
        log.info(
            "viewer: OHIF %s was installed by an older kho; installing it again", build.version
        )
    return BackgroundInstall(directory, registry).start()
