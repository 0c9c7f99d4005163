"""The OHIF viewer: installed with its integrity checked, served at /viewer/ under kho's
configuration, and rendering kho's images in a real browser (headless Chromium).

Real parts: the npm registry's package metadata and the pinned tarball (cached once per
machine, tests/helpers/browser.py), kho's HTTP server, Chromium with software WebGL.
Installer edge cases use small tarballs built here with the layout of the real one."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from kho.access.api_keys import ApiKeys
from kho.archive.config import Settings
from kho.viewer_api import ohif
from kho.viewer_api.viewer import app_config, render_index
from tests.helpers.browser import (
    Browser,
    Site,
    ohif_build,
    ohif_tarball,
    shared_browser,
    site_settings,
    viewer_site,
)

# --- the installer ------------------------------------------------------------------------


def fake_package(
    path: Path,
    *,
    name: str = "@ohif/app",
    version: str = "9.9.9",
    extra: dict[str, bytes] | None = None,
    public_path: bool = True,
) -> str:
    """An npm tarball with the layout of @ohif/app's; its SRI SHA-512."""
    runtime = b'__webpack_require__.p = "/";\n' if public_path else b""
    files = {
        "package/package.json": json.dumps({"name": name, "version": version}).encode(),
        "package/LICENSE": b"MIT License\n",
        "package/dist/index.html": b'<!doctype html><html><head><script>window.PUBLIC_URL="/"'
        b'</script><script src="/app.bundle.0123456789abcdef.js"></script></head></html>',
        "package/dist/app.bundle.0123456789abcdef.js": runtime + b"var x = 1;\n" * 400,
        "package/dist/app.bundle.0123456789abcdef.js.map": b"{}",
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as archive:
        for member_name, data in files.items():
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_registry_publishes_the_pinned_integrity() -> None:
    """The pin in kho's source is what registry.npmjs.org publishes for the version (a
    registry that is unreachable fails this test: the viewer is part of what kho ships)."""
    url, integrity = ohif.registry_dist(ohif.PINNED_VERSION)
    assert integrity == ohif.PINNED_INTEGRITY
    assert url.endswith(f"/app-{ohif.PINNED_VERSION}.tgz")


def test_the_cached_build_is_the_pinned_one() -> None:
    build = ohif_build()
    described = build.describe()
    assert described["pinned"] and build.licence == "MIT"
    assert "MIT License" in build.licence_file.read_text()
    assert (build.dist / "index.html").is_file()
    assert not list(build.dist.rglob("*.map")), "source maps are not installed"
    manifest = json.loads((build.root / ohif.MANIFEST).read_text())
    assert any(name.startswith("app.bundle.") for name in manifest["patched_for_prefix"])


def test_install_from_a_file_checks_its_hash_first(tmp_path: Path) -> None:
    tarball = tmp_path / "app.tgz"
    integrity = fake_package(tarball)
    target = tmp_path / "viewer"
    # the pin is the default: this file is not the pinned tarball
    with pytest.raises(ohif.ViewerInstallError, match="refusing to unpack"):
        ohif.install(target, tarball=tarball)
    assert ohif.installed(target) is None
    assert not [p for p in target.iterdir() if not p.name.startswith(".")]
    # a hash in hex or SRI form, given: installed
    build = ohif.install(target, tarball=tarball, sha512=integrity)
    assert build.version == "9.9.9" and build.integrity == integrity
    assert ohif.installed(target) == build
    bundle = build.dist / "app.bundle.0123456789abcdef.js"
    assert b"window.PUBLIC_URL" in bundle.read_bytes()  # the public path made relative
    assert gzip.decompress(bundle.with_name(bundle.name + ".gz").read_bytes()) == (
        bundle.read_bytes()
    )
    assert not (build.dist / "app.bundle.0123456789abcdef.js.map").exists()
    # one byte changed: refused, and the installed build stays
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tarball.write_bytes(bytes(data))
    with pytest.raises(ohif.ViewerInstallError, match="SHA-512"):
        ohif.install(target, tarball=tarball, sha512=integrity)
    assert ohif.installed(target) == build


def test_install_refuses_what_is_not_a_viewer(tmp_path: Path) -> None:
    target = tmp_path / "viewer"
    for case, kwargs in {
        "another package": {"name": "left-pad"},
        "no public path to adapt": {"public_path": False},
    }.items():
        tarball = tmp_path / f"{case}.tgz"
        integrity = fake_package(tarball, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ohif.ViewerInstallError):
            ohif.install(target, tarball=tarball, sha512=integrity)
        assert ohif.installed(target) is None, case
    with pytest.raises(ohif.ViewerInstallError, match="not a SHA-512"):
        ohif.expected_sha512("sha1-abc")


def test_install_keeps_every_file_inside_its_folder(tmp_path: Path) -> None:
    """A member naming a path outside the package (``../``) or an absolute one is not
    written anywhere (tarfile's data filter)."""
    tarball = tmp_path / "evil.tgz"
    integrity = fake_package(
        tarball, extra={"package/dist/../../../escaped.txt": b"x", "/tmp/absolute.txt": b"x"}
    )
    target = tmp_path / "viewer"
    with contextlib.suppress(ohif.ViewerInstallError):
        ohif.install(target, tarball=tarball, sha512=integrity)
    assert not (tmp_path / "escaped.txt").exists()
    assert not list(tmp_path.rglob("escaped.txt"))


def test_kho_viewer_install_and_status_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kho.cli import main

    tarball = tmp_path / "app.tgz"
    integrity = fake_package(tarball)
    data_dir = tmp_path / "data"
    assert main(["viewer", "status", "--data-dir", str(data_dir)]) == 1
    assert main(["viewer", "install", "--data-dir", str(data_dir), "--from", str(tarball)]) == 2
    assert "refusing to unpack" in capsys.readouterr().err
    install = ["viewer", "install", "--data-dir", str(data_dir), "--from", str(tarball)]
    code = main([*install, "--sha512", integrity, "--json"])
    assert code == 0
    out = capsys.readouterr().out
    assert "integrity" in out and "checked" in out  # the progress lines
    described = json.loads(out[out.index("{") :])
    assert described["version"] == "9.9.9" and described["integrity"] == integrity
    assert main(["viewer", "status", "--data-dir", str(data_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["installed"] and status["version"] == "9.9.9"
    assert status["integrity"] == integrity and status["licence"] == "MIT"
    assert Path(status["path"]).parent == data_dir / "viewer"


# --- the configuration ---------------------------------------------------------------------


def settings_like(**values: object) -> SimpleNamespace:
    """The settings the viewer reads, as the real Settings' defaults, with ``values``."""
    real = Settings()
    defaults: dict[str, object] = {name: getattr(real, name) for name in type(real).model_fields}
    defaults["auth_on"] = False
    return SimpleNamespace(**{**defaults, **values})


def config_of(script: str) -> dict[str, object]:
    start = script.index("var config = ") + len("var config = ")
    end = script.index(";\n", start)
    return json.loads(script[start:end])  # type: ignore[no-any-return]


def test_app_config_reads_kho_dicomweb_under_the_prefix() -> None:
    script = app_config(settings_like(), "/pacs/tenants/hosp-b")
    assert 'window.location.origin + "/pacs/tenants/hosp-b/dicom-web"' in script
    config = config_of(script)
    assert config["routerBasename"] == "/pacs/tenants/hosp-b/viewer"
    (source,) = config["dataSources"]  # type: ignore[misc]
    settings = source["configuration"]
    assert settings["imageRendering"] == "wadors"
    assert settings["thumbnailRendering"] == "thumbnailDirect"  # no credential needed
    assert settings["enableStudyLazyLoad"] and settings["qidoSupportsIncludeField"]
    assert "oidc" not in config


def test_app_config_signs_in_through_the_issuer_when_auth_is_on() -> None:
    issuer = "https://login.example.org/realms/hospital"
    settings = settings_like(auth_on=True, oidc_issuer=issuer, viewer_oidc_client_id="kho-viewer")
    config = config_of(app_config(settings, ""))
    (oidc,) = config["oidc"]  # type: ignore[misc]
    assert oidc["authority"] == issuer and oidc["client_id"] == "kho-viewer"
    assert oidc["response_type"] == "code"  # PKCE, a public client
    # thumbnails are fetched with the bearer token (an <img> cannot send one)
    assert config["dataSources"][0]["configuration"]["thumbnailRendering"] == "thumbnail"  # type: ignore[index]
    # a browser an EMR launched carries its own session: no sign-in of OHIF's own
    assert "oidc" not in config_of(app_config(settings, "", launched=True))
    assert "oidc" not in config_of(app_config(settings_like(auth_on=True, oidc_issuer=issuer), ""))


def test_index_html_is_served_under_the_prefix() -> None:
    build = ohif_build()
    page = render_index((build.dist / "index.html").read_text(), "/pacs/viewer/")
    assert 'window.PUBLIC_URL="/pacs/viewer/"' in page
    assert 'window.PUBLIC_URL="/"' not in page
    assert 'src="/pacs/viewer/app-config.js"' in page
    assert "init-service-worker" not in page  # no CDN, no service worker
    assert ' src="/app' not in page and ' href="/assets' not in page
    assert page.index("kho.token") < page.index("app-config.js")  # the launch script first


# --- serving --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with viewer_site(site_settings(tmp_path_factory.mktemp("viewer") / "data")) as served:
        yield served


def test_static_files_types_caching_and_compression(site: Site) -> None:
    build = ohif_build()
    bundle = next(build.dist.glob("app.bundle.*.js"))
    wasm = next(build.dist.glob("*.wasm"))
    with httpx.Client(base_url=site.base) as client:
        plain = client.get(f"/viewer/{bundle.name}", headers={"Accept-Encoding": "identity"})
        assert plain.status_code == 200
        assert plain.headers["content-type"].startswith("text/javascript")
        assert "immutable" in plain.headers["cache-control"]
        assert plain.content == bundle.read_bytes()
        packed = client.get(f"/viewer/{bundle.name}", headers={"Accept-Encoding": "gzip"})
        assert packed.headers["content-encoding"] == "gzip"
        assert packed.content == bundle.read_bytes()  # httpx decoded it
        assert int(packed.headers["content-length"]) < len(plain.content) / 2
        again = client.get(
            f"/viewer/{bundle.name}",
            headers={"Accept-Encoding": "gzip", "If-None-Match": packed.headers["etag"]},
        )
        assert again.status_code == 304
        assert client.get(f"/viewer/{wasm.name}").headers["content-type"] == "application/wasm"
        config = client.get("/viewer/app-config.js")
        assert config.headers["content-type"].startswith("text/javascript")
        assert config.headers["cache-control"] == "no-store"
        # OHIF's routes are its page; a file that is not there is a plain 404
        for route in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3", "/viewer/index.html"):
            page = client.get(route)
            assert page.status_code == 200, route
            assert 'window.PUBLIC_URL="/viewer/"' in page.text
            assert page.headers["referrer-policy"] == "no-referrer"
        assert client.get("/viewer").status_code == 308
        # a tenant's viewer reads that tenant's DICOMweb
        tenant = client.get("/tenants/default/viewer/app-config.js")
        assert '"/tenants/default/dicom-web"' in tenant.text
        assert config_of(tenant.text)["routerBasename"] == "/tenants/default/viewer"
        tenant_page = client.get("/tenants/default/viewer/viewer?StudyInstanceUIDs=1.2.3")
        assert 'window.PUBLIC_URL="/tenants/default/viewer/"' in tenant_page.text
        assert client.get("/viewer/nothing-here.js").status_code == 404
        for escape in ("/viewer/../../etc/passwd", "/viewer/%2e%2e/%2e%2e/etc/passwd",
                       "/viewer/.hidden", f"/viewer/../{ohif.MANIFEST}"):  # fmt: skip
            response = client.get(escape)
            assert response.status_code in (200, 404), escape
            assert "root:" not in response.text and '"integrity"' not in response.text


def test_without_a_build_the_viewer_says_how_to_install_one(tmp_path: Path) -> None:
    from kho.viewer_api.viewer import ViewerFiles

    with viewer_site(site_settings(tmp_path / "data"), corpus=False) as served:
        served.server.app.state.viewer_files = ViewerFiles(tmp_path / "empty")
        with httpx.Client(base_url=served.base) as client:
            page = client.get("/viewer/viewer?StudyInstanceUIDs=1.2.3")
            assert page.status_code == 503
            assert "kho viewer install" in page.text and ohif.PINNED_VERSION in page.text
            assert client.get("/viewer/app.bundle.js").status_code == 404


def test_with_auth_on_the_viewer_files_are_public_and_the_data_is_not(tmp_path: Path) -> None:
    settings = site_settings(tmp_path / "data", auth="on")
    with (
        viewer_site(settings, corpus=False) as served,
        httpx.Client(base_url=served.base) as client,
    ):
        assert client.get("/viewer/").status_code == 200
        assert client.get("/viewer/app-config.js").status_code == 200
        config = config_of(client.get("/viewer/app-config.js").text)
        source = config["dataSources"][0]["configuration"]  # type: ignore[index]
        assert source["thumbnailRendering"] == "thumbnail"
        assert client.get("/dicom-web/studies").status_code == 401
        _, key = ApiKeys(served.archive.catalog, ["default"]).create("reader", ["viewer@default"])
        reader = {"X-API-Key": key}
        assert client.get("/dicom-web/studies", headers=reader).status_code == 200


# --- in a browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Browser:
    return shared_browser(tmp_path_factory.mktemp("screenshots-viewer"))


def test_the_pixel_check_tells_an_image_from_a_blank_area(tmp_path: Path) -> None:
    """The screenshot check itself: a uniform area, or one with a line of text on black
    (a viewport's overlay), is no image; a real one is."""
    from PIL import Image, ImageDraw

    from tests.helpers.browser import image_pixels

    black = tmp_path / "black.png"
    Image.new("RGB", (400, 300)).save(black)
    assert not image_pixels(black).is_image()
    text = Image.new("RGB", (400, 300))
    ImageDraw.Draw(text).text((10, 10), "05-Jan-2024 Head CT W:80 L:40", fill="white")
    text.save(tmp_path / "text.png")
    assert not image_pixels(tmp_path / "text.png").is_image()
    ramp = Image.linear_gradient("L").resize((400, 300))
    ramp.save(tmp_path / "ramp.png")
    assert image_pixels(tmp_path / "ramp.png").is_image()
    assert not image_pixels(tmp_path / "ramp.png", (0, 0, 400, 2)).is_image()  # one grey row


def test_ohif_shows_a_study_from_kho(site: Site, browser: Browser) -> None:
    study = site.studies["ct"]
    browser.get(site.url(f"/viewer/viewer?StudyInstanceUIDs={study.study}"))
    pixels, png = browser.wait_for_viewport("ohif-ct")
    assert pixels.width > 300 and pixels.height > 300, pixels
    # OHIF's panel names the series it shows: the study asked for
    browser.wait(lambda: study.series_description in browser.run("return document.body.innerText"))
    assert png.is_file()


# --- kho serve: the viewer installed on first start -------------------------------------------


@contextlib.contextmanager
def local_registry(tarball: Path, integrity: str) -> Iterator[str]:
    """An npm registry on a loopback port serving @ohif/app's metadata and ``tarball``
    (a hospital's mirror, as kho's installer meets it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Registry(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            port = self.server.server_address[1]
            if self.path == f"/@ohif%2Fapp/{ohif.PINNED_VERSION}":
                body = json.dumps(
                    {
                        "name": "@ohif/app",
                        "version": ohif.PINNED_VERSION,
                        "dist": {
                            "tarball": f"http://127.0.0.1:{port}/app.tgz",
                            "integrity": integrity,
                        },
                    }
                ).encode()
            elif self.path == "/app.tgz":
                body = tarball.read_bytes()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_kho_serve_installs_the_viewer_in_the_background(tmp_path: Path) -> None:
    """What ``kho serve`` does on first start: /viewer/ says the viewer is being installed
    and then is the viewer; a registry (mirror) that publishes another hash for the pinned
    version is refused, and the page says so."""
    from kho.viewer_api.viewer import ViewerFiles

    real = ohif_tarball()
    with viewer_site(site_settings(tmp_path / "data"), corpus=False) as served:
        files = ViewerFiles(tmp_path / "viewer")
        served.server.app.state.viewer_files = files
        with httpx.Client(base_url=served.base) as client:
            # a mirror serving other bytes under the pinned version: refused
            fake = tmp_path / "fake.tgz"
            with local_registry(fake, fake_package(fake)) as registry:
                settings = settings_like(data_dir=tmp_path / "data", viewer_registry=registry)
                settings.viewer_dir = str(tmp_path / "viewer")
                files.pending = ohif.install_in_background(settings)
                assert files.pending is not None and files.pending.done.wait(60)
            page = client.get("/viewer/")
            assert page.status_code == 503 and "kho pins" in page.text
            # the real tarball from the mirror: installed, then served
            with local_registry(real, ohif.PINNED_INTEGRITY) as registry:
                settings.viewer_registry = registry
                files.pending = ohif.install_in_background(settings)
                assert files.pending is not None
                assert client.get("/viewer/").status_code in (200, 503)  # being installed
                assert files.pending.done.wait(120) and files.pending.error is None
            assert ohif.install_in_background(settings) is None  # nothing left to do
            page = client.get("/viewer/")
            assert page.status_code == 200 and "window.PUBLIC_URL" in page.text
