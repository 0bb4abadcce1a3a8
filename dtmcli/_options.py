"""Options of a global transaction, validated and rendered exactly as DTM decodes them."""

from __future__ import annotations

import difflib
import re
import weakref
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Mapping, Optional, Protocol

from ._validate import check_headers, check_non_negative_int
from .errors import DtmAttributeError, DtmInvalidInput

__all__ = ["TransOptions", "did_you_mean"]

_INT_FIELDS = ("timeout_to_fail", "retry_interval", "request_timeout", "retry_limit")
OPTION_NAMES = ("wait_result", *_INT_FIELDS, "branch_headers")

_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a misspelt or Go-spelt (``WaitResult``) name, else ``""``."""
    names = list(candidates)
    snake = _CAMEL_RE.sub("_", name).lower()
    if snake != name and snake in names:
        return f" (did you mean {snake!r}? dtmcli uses the Python spelling of Go's {name})"
    close = difflib.get_close_matches(snake, names, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _checked(name: str, value: Any) -> Any:
    """``value`` validated for option ``name`` (branch headers become a read-only copy)."""
    if name == "wait_result":
        if not isinstance(value, bool):
            raise DtmInvalidInput(f"wait_result must be a bool, not {value!r}")
        return value
    if name in _INT_FIELDS:
        return None if value is None else check_non_negative_int(value, name)
    if name == "branch_headers":
        # Read-only, so that no header reaches a request without passing check_headers.
        return MappingProxyType(check_headers(value))
    raise _unknown(name)


def _unknown(name: str) -> DtmAttributeError:
    return DtmAttributeError(f"transaction options have no {name!r}{did_you_mean(name, OPTION_NAMES)}")


class _Owner(Protocol):
    def set_options(self, **options: Any) -> Any: ...


@dataclass
class TransOptions:
    """Options DTM stores with a global transaction (all times in seconds).

    ``None`` leaves the server default in force; a set value is sent as a top-level JSON key,
    the way the Go client flattens its ``TransOptions``. Every assignment is validated, an
    unknown name raises :class:`~dtmcli.errors.DtmAttributeError`, and ``branch_headers`` is a
    read-only mapping (assign a new one to change it). The options of a transaction
    (``trans.options``) change through the transaction, so ``trans.options.timeout_to_fail = 9``
    is refused as ``trans.timeout_to_fail = 9`` is once DTM holds the transaction.
    """

    wait_result: bool = False
    timeout_to_fail: Optional[int] = None
    retry_interval: Optional[int] = None
    request_timeout: Optional[int] = None
    retry_limit: Optional[int] = None
    branch_headers: Mapping[str, str] = field(default_factory=dict)
    # The transaction these options belong to (a weak reference: no cycle), if any.
    _owner: ClassVar[Optional[weakref.ReferenceType[_Owner]]] = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in OPTION_NAMES:
            raise _unknown(name)
        self.update(**{name: value})

    def _bind(self, owner: Optional[_Owner]) -> None:
        """Route later assignments through ``owner.set_options`` (``None``: detach)."""
        object.__setattr__(self, "_owner", None if owner is None else weakref.ref(owner))

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # copy, deepcopy and pickle rebuild through validation (a mappingproxy cannot be pickled).
        state = {name: getattr(self, name) for name in OPTION_NAMES}
        state["branch_headers"] = dict(self.branch_headers)
        return (TransOptions.from_mapping, (state,))

    def validate(self) -> None:
        """Raise DtmInvalidInput unless every option has the type and range DTM accepts."""
        for name in OPTION_NAMES:
            _checked(name, getattr(self, name))

    def update(self, **options: Any) -> None:
        """Set several options by keyword, all or none; unknown names raise DtmInvalidInput."""
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            owner.set_options(**options)  # checks the transaction's lifecycle, then calls _apply
        else:
            self._apply(options)

    def _apply(self, options: Mapping[str, Any]) -> None:
        unknown = [name for name in options if name not in OPTION_NAMES]
        if unknown:
            hints = "".join(did_you_mean(name, OPTION_NAMES) for name in unknown)
            raise DtmInvalidInput(f"unknown transaction option(s): {', '.join(sorted(unknown))}{hints}")
        checked = {name: _checked(name, value) for name, value in options.items()}
        for name, value in checked.items():
            object.__setattr__(self, name, value)

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
        opts = cls.__new__(cls)
        opts.__dict__.update(_DEFAULTS)  # already valid: skips six checks on every transaction built
        if options:
            opts.update(**dict(options))
        return opts


# The validated defaults (branch_headers is a read-only mapping, so one instance is shared safely).
_DEFAULTS: dict[str, Any] = dict(vars(TransOptions()))
