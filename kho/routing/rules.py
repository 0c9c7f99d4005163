"""Which rules select a received instance: the matcher the ingest observer runs (in the
instance's own transaction, so it reads nothing but the instance's attributes)."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Sequence

from pydicom.uid import UID_dictionary

from kho.archive.catalog import InstanceAttributes
from kho.routing.config import ForwardRule


@functools.cache
def _sop_keyword(uid: str) -> str:
    entry = UID_dictionary.get(uid)
    return str(entry[4]) if entry else ""


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> tuple[bool, re.Pattern[str]]:
    """(excluding, regular expression) of one pattern (see ForwardRule)."""
    excluding = pattern.startswith("!")
    body = pattern[1:] if excluding else pattern
    if body.startswith("re:"):
        return excluding, re.compile(body[3:], re.IGNORECASE)
    # a glob matches the whole value (fnmatch's translation is anchored at the end)
    return excluding, re.compile("^" + fnmatch.translate(body), re.IGNORECASE)


def matches_any(patterns: Sequence[str], *values: str) -> bool:
    """Whether the values pass a condition: some including pattern (or none given)
    matches one of them, and no excluding pattern matches any."""
    if not patterns:
        return True
    included = False
    has_including = False
    for pattern in patterns:
        excluding, expression = _compiled(pattern)
        found = any(expression.search(value) for value in values)
        if excluding:
            if found:
                return False
        else:
            has_including = True
            included = included or found
    return included or not has_including


def rule_selects(
    rule: ForwardRule, attrs: InstanceAttributes, *, calling_ae: str, tenant: str
) -> bool:
    """Whether ``rule`` forwards this instance, received from ``calling_ae`` into
    ``tenant``."""
    if not rule.enabled:
        return False
    if rule.tenants and tenant not in rule.tenants:
        return False
    sop_class = attrs.sop_class_uid
    return (
        matches_any(rule.calling_ae, calling_ae.strip())
        and matches_any(rule.modality, attrs.modality)
        and matches_any(rule.sop_class, sop_class, _sop_keyword(sop_class))
        and matches_any(rule.body_part, attrs.body_part_examined)
        and matches_any(rule.series_description, attrs.series_description)
        and matches_any(rule.study_description, attrs.study_description)
    )


__all__ = ["matches_any", "rule_selects"]
