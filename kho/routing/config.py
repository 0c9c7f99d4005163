"""What forwarding is told: :class:`RoutingConfig` reads the settings' destinations, rules
and de-identification projects (models in kho.archive.forwarding, fields of the one
Settings object) and checks that the names they refer to exist."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kho.archive.forwarding import (
    SCHEMES,
    DeidProject,
    ForwardDestination,
    ForwardRule,
    parse_dicom_url,
)
from kho.errors import ConfigError


def _field(settings: Any, name: str, default: Any) -> Any:
    value = getattr(settings, name, default)
    return default if value is None else value


@dataclass
class RoutingConfig:
    """Forwarding's part of the settings, validated together (names that refer to each
    other must exist)."""

    rules: list[ForwardRule] = field(default_factory=list)
    destinations: dict[str, ForwardDestination] = field(default_factory=dict)
    projects: dict[str, DeidProject] = field(default_factory=dict)
    threads: int = 4

    def __post_init__(self) -> None:
        self.rules = [r if isinstance(r, ForwardRule) else ForwardRule(**r) for r in self.rules]
        self.destinations = {
            name: d if isinstance(d, ForwardDestination) else ForwardDestination(**d)
            for name, d in self.destinations.items()
        }
        self.projects = {
            name: p if isinstance(p, DeidProject) else DeidProject(**p)
            for name, p in self.projects.items()
        }
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ConfigError("forward_rules: rule names must be unique")
        for rule in self.rules:
            if rule.destination not in self.destinations:
                raise ConfigError(
                    f"forward_rules {rule.name}: no destination {rule.destination!r} in "
                    "forward_destinations"
                )
            if rule.deidentify and rule.deidentify not in self.projects:
                raise ConfigError(
                    f"forward_rules {rule.name}: no project {rule.deidentify!r} in deid_projects"
                )

    @classmethod
    def from_settings(cls, settings: Any) -> RoutingConfig:
        """Read ``forward_rules``, ``forward_destinations``, ``deid_projects`` and
        ``forward_threads`` from a settings object (absent: none)."""
        try:
            return cls(
                rules=list(_field(settings, "forward_rules", [])),
                destinations=dict(_field(settings, "forward_destinations", {})),
                projects=dict(_field(settings, "deid_projects", {})),
                threads=int(_field(settings, "forward_threads", 4)),
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


__all__ = [
    "SCHEMES",
    "DeidProject",
    "ForwardDestination",
    "ForwardRule",
    "RoutingConfig",
    "parse_dicom_url",
]
