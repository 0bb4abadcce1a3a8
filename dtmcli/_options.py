"""Options of a global transaction, validated and rendered exactly as DTM decodes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ._validate import check_headers, check_non_negative_int

__all__ = ["TransOptions"]

_INT_FIELDS = ("timeout_to_fail", "retry_interval", "request_timeout", "retry_limit")


@dataclass
class TransOptions:
    """Options DTM stores with a global transaction (all times in seconds).

    ``None`` leaves the server default in force; a set value is sent as a top-level JSON key,
    the way the Go client flattens its ``TransOptions``.
    """

    wait_result: bool = False
    timeout_to_fail: Optional[int] = None
    retry_interval: Optional[int] = None
    request_timeout: Optional[int] = None
    retry_limit: Optional[int] = None
    branch_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise DtmInvalidInput unless every option has the type and range DTM accepts."""
        from .errors import DtmInvalidInput

        if not isinstance(self.wait_result, bool):
            raise DtmInvalidInput(f"wait_result must be a bool, not {self.wait_result!r}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                check_non_negative_int(value, name)
        self.branch_headers = check_headers(self.branch_headers)

    def update(self, **options: Any) -> None:
        """Set several options by keyword; unknown names raise DtmInvalidInput."""
        from .errors import DtmInvalidInput

        unknown = set(options) - set(self.__dataclass_fields__)
        if unknown:
            raise DtmInvalidInput(f"unknown transaction option(s): {', '.join(sorted(unknown))}")
        old = {name: getattr(self, name) for name in options}
        for name, value in options.items():
            setattr(self, name, value)
        try:
            self.validate()
        except Exception:
            for name, value in old.items():
                setattr(self, name, value)
            raise

    def to_wire(self) -> dict[str, Any]:
        """The option keys of a prepare/submit/abort body (zero values left out, as Go does)."""
        out: dict[str, Any] = {}
        if self.wait_result:
            out["wait_result"] = True
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.branch_headers:
            out["branch_headers"] = dict(self.branch_headers)
        return out

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> TransOptions:
        """Build from keyword options, rejecting unknown names."""
        opts = cls()
        if options:
            opts.update(**dict(options))
        return opts
