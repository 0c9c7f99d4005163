"""Regression (found by the atheris HL7 harness): an MSH segment that ends right after
"MSH" (a segment separator where the field separator belongs) made read_header index
past the end: an IndexError instead of the MessageError (AR) the listener answers.  Fixed
in read_header; the HL7 fuzz target runs on past it now."""

from __future__ import annotations

import pytest

from kho.hl7.message import MessageError, read_header


def test_an_msh_without_a_field_separator_is_a_message_error() -> None:
    with pytest.raises(MessageError):
        read_header(b"MSH\rPID|1||P-1\r")
