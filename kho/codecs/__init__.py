"""Lossless codecs (numba) and rendering kernels: arrays <-> bytes, nothing else of kho."""

from kho.codecs.base import FrameCodec
from kho.codecs.registry import available_codecs, get_codec, get_codec_by_name, register_codec

__all__ = ["FrameCodec", "available_codecs", "get_codec", "get_codec_by_name", "register_codec"]
