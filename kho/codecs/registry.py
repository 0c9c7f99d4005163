"""Codecs keyed by transfer syntax UID, imported lazily.

Registering names a module and a class; nothing is imported (and no numba kernel is
compiled) until a codec is first asked for.  ``available_codecs`` tells which can run here.

The at-rest codec for colour (DESIGN.md: a later decision, e.g. HTJ2K) plugs in the same
way: ``register_codec(uid, "kho.codecs.<module>", "<Class>")`` with a ``FrameCodec``
subclass whose ``is_available`` checks its optional dependency.
"""

from __future__ import annotations

import importlib
import threading

from kho.codecs.base import FrameCodec
from kho.errors import CodecUnavailableError

_REGISTRY: dict[str, tuple[str, str]] = {}
_INSTANCES: dict[str, FrameCodec] = {}
_LOCK = threading.Lock()


def register_codec(transfer_syntax_uid: str, module: str, class_name: str) -> None:
    """Register (or replace) the codec class for a transfer syntax."""
    with _LOCK:
        _REGISTRY[transfer_syntax_uid] = (module, class_name)
        _INSTANCES.pop(transfer_syntax_uid, None)


def unregister_codec(transfer_syntax_uid: str) -> None:
    """Forget a transfer syntax's codec (no error if none was registered)."""
    with _LOCK:
        _REGISTRY.pop(transfer_syntax_uid, None)
        _INSTANCES.pop(transfer_syntax_uid, None)


def registered() -> dict[str, tuple[str, str]]:
    """Transfer syntax UID -> (module, class name), without importing anything."""
    with _LOCK:
        return dict(_REGISTRY)


def _load(transfer_syntax_uid: str) -> type[FrameCodec]:
    try:
        module_name, class_name = _REGISTRY[transfer_syntax_uid]
    except KeyError:
        raise CodecUnavailableError(f"no codec for transfer syntax {transfer_syntax_uid}") from None
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise CodecUnavailableError(
            f"codec {module_name}.{class_name} cannot be loaded: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, FrameCodec)):
        raise CodecUnavailableError(f"{module_name}.{class_name} is not a FrameCodec")
    return cls


def get_codec(transfer_syntax_uid: str) -> FrameCodec:
    """The (shared) codec instance for a transfer syntax; CodecUnavailableError if none."""
    with _LOCK:
        codec = _INSTANCES.get(transfer_syntax_uid)
        if codec is not None:
            return codec
        cls = _load(transfer_syntax_uid)
        if not cls.is_available():
            raise CodecUnavailableError(f"codec {cls.__name__} is not available here")
        codec = _INSTANCES[transfer_syntax_uid] = cls()
        return codec


def get_codec_by_name(name: str) -> FrameCodec:
    """The codec whose ``name`` is given ("jpeg-ls", "rle")."""
    for uid in list(_REGISTRY):
        try:
            cls = _load(uid)
        except CodecUnavailableError:
            continue
        if cls.name == name:
            return get_codec(uid)
    raise CodecUnavailableError(f"no codec named {name!r}")


def available_codecs() -> dict[str, bool]:
    """Transfer syntax UID -> whether its codec loads and runs here."""
    out: dict[str, bool] = {}
    for uid in list(_REGISTRY):
        try:
            out[uid] = _load(uid).is_available()
        except CodecUnavailableError:
            out[uid] = False
    return out


register_codec("1.2.840.10008.1.2.4.80", "kho.codecs.jpegls", "JpegLsCodec")
register_codec("1.2.840.10008.1.2.5", "kho.codecs.rle", "RleCodec")
