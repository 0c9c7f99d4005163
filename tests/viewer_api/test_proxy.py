"""Behind a reverse proxy: the URLs kho writes (RetrieveURL, BulkDataURI, the viewer's
configuration, launch links) name the public address -- the one the proxy is reached at --
when the proxy is trusted or ``public_url`` is set, and never a host a client made up.

Real parts: nginx from Debian with its own configuration on a free loopback port (the
prefix ``/pacs`` stripped, the standard X-Forwarded-* headers, connecting from 127.0.0.2 so
kho can tell it from a direct client on 127.0.0.1), kho's HTTP server, headless Chromium
showing a study through the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kho.archive.config import Settings
from kho.viewer_api.proxy import forwarded_address, parse_public_url
from tests.helpers.browser import (
    Browser,
    Site,
    nginx_proxy,
    shared_browser,
    site_settings,
    viewer_site,
)
from tests.viewer_api.test_viewer import config_of

JSON = {"Accept": "application/dicom+json"}


class ProxySettings(Settings):
    """The two settings this needs, until the lead adds them to Settings itself (kho reads
    them with getattr, so it works either way)."""

    public_url: str = ""
    trusted_proxies: list[str] = []


def proxy_settings(data_dir: Path, **values: object) -> ProxySettings:
    base = site_settings(data_dir).model_dump()
    return ProxySettings(**{**base, **values})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    data_dir = tmp_path_factory.mktemp("proxy") / "data"
    with viewer_site(proxy_settings(data_dir, trusted_proxies=["127.0.0.2/32"])) as served:
        yield served


def urls_in(document: object) -> list[str]:
    """Every RetrieveURL (0008,1190) and BulkDataURI in a DICOM JSON answer."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "BulkDataURI":
                    found.append(value)
                elif key == "00081190":
                    found.extend(value.get("Value", []))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    return found


def written_urls(client: httpx.Client, prefix: str, site: Site) -> list[str]:
    ct = site.studies["ct"]
    urls = urls_in(client.get(f"{prefix}/dicom-web/studies", headers=JSON).json())
    urls += urls_in(
        client.get(f"{prefix}/dicom-web/studies/{ct.study}/series", headers=JSON).json()
    )
    metadata = f"{prefix}/dicom-web/studies/{ct.study}/series/{ct.series}/metadata"
    urls += urls_in(client.get(metadata, headers=JSON).json())
    assert any("/bulkdata/" in url for url in urls) and len(urls) >= 4
    return urls


def test_urls_name_the_proxy_that_kho_trusts(site: Site, tmp_path: Path) -> None:
    for proto in ("$scheme", "https"):  # https: a proxy terminating TLS
        with nginx_proxy(tmp_path / proto.strip("$"), site.server.port, proto=proto) as port:
            public = f"{'https' if proto == 'https' else 'http'}://127.0.0.1:{port}/pacs"
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                urls = written_urls(client, "/pacs", site)
                assert all(url.startswith(public + "/dicom-web/studies/") for url in urls), urls
                config = client.get("/pacs/viewer/app-config.js").text
                assert '"/pacs/dicom-web"' in config
                assert config_of(config)["routerBasename"] == "/pacs/viewer"
                page = client.get("/pacs/viewer/viewer?StudyInstanceUIDs=1.2.3").text
                assert 'window.PUBLIC_URL="/pacs/viewer/"' in page
                assert '<meta name="kho-base" content="/pacs">' in client.get("/pacs/").text
                # the IID answer for a back end: the public address
                ct = site.studies["ct"]
                answer = client.get(
                    "/pacs/IHEInvokeImageDisplay",
                    params={"requestType": "STUDY", "studyUID": ct.study},
                ).json()
                assert answer["url"] == f"{public}/viewer/viewer?StudyInstanceUIDs={ct.study}"
                # tenant paths keep both prefixes
                tenant_urls = written_urls(client, "/pacs/tenants/default", site)
                assert all(
                    u.startswith(public + "/tenants/default/dicom-web/") for u in tenant_urls
                )


def test_forwarded_host_and_prefix_from_anyone_else_are_ignored(site: Site) -> None:
    spoof = {
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Prefix": "/phish",
        "Forwarded": "host=evil.example",
    }
    with httpx.Client(base_url=site.base, headers=spoof) as client:
        urls = written_urls(client, "", site)
    assert all(url.startswith(site.base + "/dicom-web/") for url in urls), urls


def test_forwarded_proto_from_anyone_else_is_ignored(site: Site) -> None:
    spoof = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    with httpx.Client(base_url=site.base, headers=spoof) as client:
        urls = written_urls(client, "", site)
    assert all(url.startswith(site.base + "/dicom-web/") for url in urls), urls[:1]


def test_public_url_wins_over_headers(tmp_path: Path) -> None:
    settings = proxy_settings(tmp_path / "data", public_url="https://pacs.example.org/kho/")
    spoof = {"X-Forwarded-Host": "evil.example"}
    with viewer_site(settings) as served, httpx.Client(base_url=served.base, headers=spoof) as c:
        urls = written_urls(c, "", served)
        assert all(u.startswith("https://pacs.example.org/kho/dicom-web/") for u in urls)
        # a proxy that passes the prefix through is served as well
        assert written_urls(c, "/kho", served) == urls


def test_header_parsing() -> None:
    chain = 'for=192.0.2.1;proto=http, for="[2001:db8::1]:4711";proto=https;host=a.example'
    address = forwarded_address({"forwarded": chain})
    assert (address.scheme, address.host, address.client) == ("https", "a.example", "2001:db8::1")
    address = forwarded_address(
        {
            "x-forwarded-proto": "http, https",
            "x-forwarded-host": "pacs.example.org:8443",
            "x-forwarded-prefix": "/kho/",
            "x-forwarded-for": "10.1.1.1, 10.2.2.2",
        }
    )
    assert address == type(address)("https", "pacs.example.org:8443", "/kho", "10.2.2.2")
    hostile = forwarded_address(
        {
            "x-forwarded-host": "a.example/evil",
            "x-forwarded-prefix": "/../x",
            "x-forwarded-proto": "ftp",
        }
    )
    assert (hostile.scheme, hostile.host, hostile.prefix) == (None, None, "")
    assert parse_public_url("https://pacs.example.org/kho/").prefix == "/kho"
    for bad in ("pacs.example.org", "ftp://x", "https://x/?q=1"):
        with pytest.raises(ValueError):
            parse_public_url(bad)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Browser:
    return shared_browser(tmp_path_factory.mktemp("screenshots-proxy"))


def test_the_viewer_works_through_the_proxy(site: Site, browser: Browser, tmp_path: Path) -> None:
    ct = site.studies["ct"]
    with nginx_proxy(tmp_path / "nginx", site.server.port) as port:
        browser.get(f"http://127.0.0.1:{port}/pacs/viewer/viewer?StudyInstanceUIDs={ct.study}")
        pixels, _ = browser.wait_for_viewport("proxy-viewer")
        assert pixels.width > 300
        # every request the page made went through the proxy, under its prefix
        requests = browser.run("return performance.getEntriesByType('resource').map(e => e.name)")
        ours = [u for u in requests if u.startswith("http://127.0.0.1")]
        assert ours and all(u.startswith(f"http://127.0.0.1:{port}/pacs/") for u in ours), ours
        log = (tmp_path / "nginx" / "access.log").read_text()
        assert "/pacs/dicom-web/studies/" in log and "/frames/1" in log
