"""The codec registry: lazy registration by module path, cached instances, clear errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import pytest

from kho.codecs import (
    FrameCodec,
    available_codecs,
    get_codec,
    get_codec_by_name,
    register_codec,
    registry,
)
from kho.codecs.rle import RleCodec
from kho.errors import CodecUnavailableError

RLE_UID = "1.2.840.10008.1.2.5"
DUMMY_UID = "1.2.826.0.1.3680043.9.7433.99.1"  # test-only UIDs
DUMMY_UNAVAILABLE_UID = "1.2.826.0.1.3680043.9.7433.99.2"


class DummyCodec(FrameCodec):
    """Identity 'codec' on uint8 bytes, to test registration of foreign classes."""

    name: ClassVar[str] = "dummy"
    transfer_syntax_uid: ClassVar[str] = DUMMY_UID

    def encode(self, frame: np.ndarray, *, bits_stored: int | None = None) -> bytes:
        return np.ascontiguousarray(frame, dtype=np.uint8).tobytes()

    def decode(self, data, *, rows=None, columns=None, samples_per_pixel=None, bits_allocated=None):
        return np.frombuffer(bytes(data), dtype=np.uint8).reshape(rows, columns)


class UnavailableCodec(DummyCodec):
    name: ClassVar[str] = "dummy-unavailable"
    transfer_syntax_uid: ClassVar[str] = DUMMY_UNAVAILABLE_UID

    @classmethod
    def is_available(cls) -> bool:
        return False


NotACodec = object  # registered under a class name that is not a FrameCodec


@pytest.fixture
def dummies() -> Iterator[None]:
    """Register the dummy codecs for one test and take them out again."""
    register_codec(DUMMY_UID, __name__, "DummyCodec")
    register_codec(DUMMY_UNAVAILABLE_UID, __name__, "UnavailableCodec")
    yield
    for uid in (DUMMY_UID, DUMMY_UNAVAILABLE_UID):
        registry.unregister_codec(uid)


def test_rle_is_registered_and_cached() -> None:
    codec = get_codec(RLE_UID)
    assert isinstance(codec, RleCodec)
    assert codec.name == "rle" and codec.transfer_syntax_uid == RLE_UID
    assert get_codec(RLE_UID) is codec
    assert get_codec_by_name("rle") is codec
    assert available_codecs()[RLE_UID] is True
    frame = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(
        codec.decode(codec.encode(frame), rows=3, columns=4, samples_per_pixel=1, bits_allocated=8),
        frame,
    )


def test_jpeg_ls_is_pre_registered() -> None:
    assert "1.2.840.10008.1.2.4.80" in available_codecs()
    assert registry.registered()["1.2.840.10008.1.2.4.80"] == ("kho.codecs.jpegls", "JpegLsCodec")


def test_unknown_syntax_and_name() -> None:
    with pytest.raises(CodecUnavailableError):
        get_codec("1.2.3.4")
    with pytest.raises(CodecUnavailableError):
        get_codec_by_name("no-such-codec")


def test_dummy_codec_registration(dummies: None) -> None:
    codec = get_codec(DUMMY_UID)
    assert isinstance(codec, DummyCodec)
    assert get_codec_by_name("dummy") is codec
    assert available_codecs()[DUMMY_UID] is True
    assert available_codecs()[DUMMY_UNAVAILABLE_UID] is False
    with pytest.raises(CodecUnavailableError, match="not available"):
        get_codec(DUMMY_UNAVAILABLE_UID)
    with pytest.raises(CodecUnavailableError):
        get_codec_by_name("dummy-unavailable")
    # registering again replaces the class and drops the cached instance
    register_codec(DUMMY_UID, __name__, "UnavailableCodec")
    with pytest.raises(CodecUnavailableError):
        get_codec(DUMMY_UID)


def test_broken_registrations(dummies: None) -> None:
    register_codec(DUMMY_UID, "kho.codecs.no_such_module", "X")
    with pytest.raises(CodecUnavailableError, match="cannot be loaded"):
        get_codec(DUMMY_UID)
    register_codec(DUMMY_UID, __name__, "NoSuchClass")
    with pytest.raises(CodecUnavailableError):
        get_codec(DUMMY_UID)
    register_codec(DUMMY_UID, __name__, "NotACodec")
    with pytest.raises(CodecUnavailableError, match="not a FrameCodec"):
        get_codec(DUMMY_UID)
    assert available_codecs()[DUMMY_UID] is False


def test_importing_kho_codecs_loads_no_codec_module() -> None:
    """Registration is by name: importing the package compiles and imports nothing."""
    code = (
        "import sys, kho.codecs\n"
        "loaded = [m for m in ('kho.codecs.rle', 'kho.codecs.jpegls', 'kho.codecs.render',"
        " 'numba') if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
