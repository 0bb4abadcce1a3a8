"""Redis barrier backend: one atomic Lua script per call, run by SHA (protocol.md §7).

Key layouts:

* ``"go"`` (default): ``<gid>-<branch_id>-<op>-<barrier_id>``, the Go client's keys, so Go and
  Python branches of one transaction see each other's markers. These keys are ambiguous, as
  ``-`` may appear in gids and branch ids: msg ``order-X`` branch ``01-01`` and saga
  ``order-X-01`` branch ``01`` share the marker ``order-X-01-01-action-01``, and the later
  transaction's effect is skipped as a duplicate. Kept for interoperability; avoid ``-`` in
  gids when using this layout, or use ``"cluster"``.
* ``"cluster"``: ``{<tag>}<n>:<gid>-<n>:<branch_id>-<n>:<op>-<n>:<barrier_id>``, each field
  prefixed with its length ``<n>`` so that different fields never give one key, and ``{<tag>}``
  puts the marker in the business key's Redis Cluster slot, as a script's keys must share one slot.
  ``<tag>`` is the text Redis Cluster hashes for the business key (the text inside its first
  ``{...}`` when that is not empty, else the whole key), except when that text contains ``}``
  (it could not stand inside ``{...}``): then it is the only 14-character string of ``0`` and
  ``1`` that hashes to the same slot (see :func:`slot_tag`).

The script checks everything that can fail (arguments, the stored value, int64 overflow) before
its first write, because Redis does not undo the writes of a script that fails halfway: a failed
call leaves no marker, so DTM's redelivery applies the effect once the cause is fixed. Unlike Go's
script, it checks the markers (duplicate, null compensation) before the balance, so only the call
that applies the amount can fail on it: a redelivered applied op or a null compensation never
answers FAILURE, whatever the balance.

Each call is a flow (:func:`adjust_flow`, :func:`prepared_flow`) whose effects are method calls on
the Redis client (EVALSHA, and SCRIPT LOAD after a NOSCRIPT answer): the blocking functions here run
it on a ``redis.Redis``, the asyncio ones (:mod:`dtmcli.asyncio.barrier`) on a ``redis.asyncio.Redis``,
with the same scripts, keys and decisions.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Optional

from .. import _flow, _otel
from .._consts import MSG_BRANCH_ID, OP_MSG
from .._flow import Flow, StoreOp
from ..errors import DtmDuplicated, DtmFailure, DtmInvalidInput
from .core import MSG_BARRIER_ID, REASON_ROLLBACK, BarrierDatabaseError, Decision, load_resource, origin_op

__all__ = [
    "DEFAULT_EXPIRE",
    "LAYOUTS",
    "MAX_EXPIRE",
    "adjust_flow",
    "barrier_key",
    "check_adjust_amount",
    "check_client",
    "hash_tag",
    "key_slot",
    "prepared_flow",
    "query_prepared",
    "slot_tag",
]

logger = logging.getLogger("dtmcli")

DEFAULT_EXPIRE = 7 * 24 * 3600
MAX_EXPIRE = 2**31 - 1
LAYOUTS = ("go", "cluster")

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_SLOTS = 16384
_TAG_DIGITS = 14  # 2**14 == _SLOTS: each slot has exactly one tag of 14 binary digits


class _Script:
    """A Lua script called with EVALSHA; loaded on the first NOSCRIPT answer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._text: Optional[str] = None
        self._sha: Optional[str] = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = load_resource(self.name)
            self._sha = hashlib.sha1(self._text.encode()).hexdigest()
        return self._text

    @property
    def sha(self) -> str:
        _ = self.text
        assert self._sha is not None
        return self._sha

    def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        return _flow.run(self.flow(keys, args), client)

    def flow(self, keys: list[str], args: list[Any]) -> Flow[Any]:
        """EVALSHA on the client; on NOSCRIPT, SCRIPT LOAD (checking the sha) and EVALSHA again."""
        from redis.exceptions import NoScriptError

        try:
            return (yield StoreOp("evalsha", self.sha, len(keys), *keys, *args))
        except NoScriptError:
            logger.debug("redis script %s not loaded; loading it", self.name)
        loaded = yield StoreOp("script_load", self.text)
        if loaded != self.sha:
            raise BarrierDatabaseError(f"redis returned sha {loaded} for {self.name}, not {self.sha}")
        return (yield StoreOp("evalsha", self.sha, len(keys), *keys, *args))


ADJUST_SCRIPT = _Script("barrier.redis.lua")
QUERY_PREPARED_SCRIPT = _Script("query_prepared.redis.lua")


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: the text inside the first non-empty ``{...}``, else the key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM (polynomial 0x1021, initial value 0), the checksum of Redis Cluster slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """The Redis Cluster slot (0-16383) of ``key``, as ``CLUSTER KEYSLOT`` computes it."""
    return _crc16(hash_tag(key).encode()) % _SLOTS


@functools.lru_cache(maxsize=1)
def _digit_flips() -> tuple[int, ...]:
    """For each slot bit b, the set of digit positions (a bit mask) whose flip from 0 to 1 flips only bit b.

    With initial value 0 the CRC is linear over equal-length inputs, and '1' is '0' XOR 1, so the
    slot of a 0/1 string is the slot of '000...' XOR the flips of its '1' digits: Gauss-Jordan
    elimination over GF(2) on the 14 one-digit flips (which span all 14 bits) gives these masks.
    """
    rows = [(_crc16(bytes(1 if j == i else 0 for j in range(_TAG_DIGITS))) % _SLOTS, 1 << i)
            for i in range(_TAG_DIGITS)]
    pivots: list[tuple[int, int]] = []
    for bit in range(_TAG_DIGITS):
        pivot = next(row for row in rows if row[0] >> bit & 1)
        rows.remove(pivot)
        rows = [(v ^ pivot[0], m ^ pivot[1]) if v >> bit & 1 else (v, m) for v, m in rows]
        pivots = [(v ^ pivot[0], m ^ pivot[1]) if v >> bit & 1 else (v, m) for v, m in pivots]
        pivots.append(pivot)
    return tuple(mask for _, mask in pivots)


def _binary_tag(slot: int) -> str:
    """The only string of 14 ``0``/``1`` characters whose Redis Cluster slot is ``slot``."""
    flips = _digit_flips()
    target = slot ^ (_crc16(b"0" * _TAG_DIGITS) % _SLOTS)
    mask = 0
    for bit in range(_TAG_DIGITS):
        if target >> bit & 1:
            mask ^= flips[bit]
    return "".join("1" if mask >> i & 1 else "0" for i in range(_TAG_DIGITS))


def slot_tag(key: str) -> str:
    """A hash tag ``t`` such that keys starting with ``{t}`` live in ``key``'s Redis Cluster slot."""
    tag = hash_tag(key)
    if "}" not in tag:
        return tag
    return _binary_tag(key_slot(key))


def barrier_key(
    gid: str, branch_id: str, op: str, barrier_id: str, *, layout: str = "go", tag: Optional[str] = None
) -> str:
    """The key of one barrier marker in the chosen layout; ``cluster`` needs ``tag`` (from :func:`slot_tag`).

    ``go`` keys are the Go client's and ambiguous (see the module docstring); ``cluster`` keys
    length-prefix every field, so distinct (gid, branch_id, op, barrier_id) give distinct keys.
    """
    fields = (gid, branch_id, op, barrier_id)
    if layout == "go":
        return "-".join(fields)
    if layout == "cluster":
        if not tag or "}" in tag:
            raise DtmInvalidInput("the cluster key layout needs a hash tag without '}' (see slot_tag)", gid=gid)
        return f"{{{tag}}}" + "-".join(f"{len(field)}:{field}" for field in fields)
    raise DtmInvalidInput(f"unknown redis key layout {layout!r}; use one of {', '.join(LAYOUTS)}", gid=gid)


def check_client(client: Any, *, asyncio: bool) -> None:
    """Refuse, before anything is sent, a ``redis.asyncio`` client given to the blocking barrier (its calls
    would return coroutines that never run) or a blocking client given to the asyncio one (it would
    block the event loop)."""
    module = type(client).__module__
    is_async = module.startswith("redis.asyncio")
    if module.split(".")[0] != "redis" or is_async == asyncio:
        return
    if is_async:
        raise DtmInvalidInput(f"{module}.{type(client).__name__} is an asyncio client: use the asyncio barrier "
                              "(dtmcli.asyncio.BranchBarrier) or a redis.Redis")
    raise DtmInvalidInput(f"{module}.{type(client).__name__} is a blocking client: the asyncio barrier needs a "
                          "redis.asyncio client")


def _check_expire(expire: Any) -> int:
    if isinstance(expire, bool) or not isinstance(expire, int) or not 0 < expire <= MAX_EXPIRE:
        raise DtmInvalidInput(f"redis barrier expire must be an int of seconds from 1 to {MAX_EXPIRE}, not {expire!r}")
    return expire


def _check_key(key: Any, gid: str) -> str:
    if not isinstance(key, str) or not key:
        raise DtmInvalidInput("redis business key must be a non-empty str", gid=gid)
    return key


def check_adjust_amount(
    client: Any,
    key: str,
    amount: int,
    *,
    trans_type: str,
    gid: str,
    branch_id: str,
    op: str,
    barrier_id: str,
    expire: int = DEFAULT_EXPIRE,
    layout: str = "go",
) -> Decision:
    """Adjust the integer at ``key`` by ``amount`` under the barrier, atomically (see :func:`adjust_flow`)."""
    check_client(client, asyncio=False)
    return _flow.run(adjust_flow(key, amount, trans_type=trans_type, gid=gid, branch_id=branch_id, op=op,
                                 barrier_id=barrier_id, expire=expire, layout=layout), client)


# The script's answers as the decisions the SQL barrier records.
_DECISIONS = {"APPLIED": "run", "DUPLICATE": "duplicate", "NULL_COMPENSATION": "null_compensation"}


def adjust_flow(
    key: str,
    amount: int,
    *,
    trans_type: str,
    gid: str,
    branch_id: str,
    op: str,
    barrier_id: str,
    expire: int = DEFAULT_EXPIRE,
    layout: str = "go",
) -> Flow[Decision]:
    """Adjust the integer at ``key`` by ``amount`` under the barrier, atomically, as a flow on a Redis client.

    Returns the decision: RUN (applied), DUPLICATE (repeated or suspended: no effect) or
    NULL_COMPENSATION (marker written, no effect); these are decided first, whatever the balance.
    Only a call that applies the amount raises DtmFailure (key missing or the result would be
    negative) or BarrierDatabaseError (nothing written; DTM retries) when the key holds no int64 or
    the result would exceed int64. DtmDuplicated when a msg call repeats, DtmInvalidInput for an
    ``amount`` outside int64.
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or not _INT64_MIN <= amount <= _INT64_MAX:
        raise DtmInvalidInput(f"amount must be an int within the signed 64-bit range, not {amount!r}", gid=gid)
    key = _check_key(key, gid)
    expire = _check_expire(expire)
    tag = slot_tag(key) if layout == "cluster" else None
    origin = origin_op(op)
    keys = [
        key,
        barrier_key(gid, branch_id, op, barrier_id, layout=layout, tag=tag),
        barrier_key(gid, branch_id, origin, barrier_id, layout=layout, tag=tag),
    ]
    where = {"gid": gid, "branch_id": branch_id, "op": op}
    if key in keys[1:]:
        raise DtmInvalidInput(f"redis business key {key!r} is the barrier's own marker key", **where)
    try:
        answer = yield from ADJUST_SCRIPT.flow(keys, [amount, origin, expire])
    except DtmInvalidInput:
        raise
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "redis":
            raise
        raise BarrierDatabaseError(f"redis barrier script failed: {type(exc).__name__}: {exc}", **where) from exc
    result = answer.decode() if isinstance(answer, bytes) else str(answer)
    logger.debug("redis barrier %s/%s/%s/%s on %s: %s", gid, branch_id, op, barrier_id, key, result)
    _otel.event("dtm.barrier", decision=_DECISIONS.get(result, result.lower()), barrier_id=barrier_id)
    if result == "FAILURE":
        raise DtmFailure(f"redis key {key!r} is missing or would go below zero", **where)
    if result == "DUPLICATE":
        if op == OP_MSG:
            raise DtmDuplicated("msg local transaction already done or rolled back", **where)
        return Decision.DUPLICATE
    if result == "NULL_COMPENSATION":
        return Decision.NULL_COMPENSATION
    if result == "APPLIED":
        return Decision.RUN
    if result == "NOT_INTEGER":
        raise BarrierDatabaseError(
            f"redis key {key!r} does not hold a 64-bit integer; nothing was written, fix the value and DTM's retry "
            "applies the change", **where)
    if result == "OVERFLOW":
        raise BarrierDatabaseError(
            f"adding {amount} to redis key {key!r} would exceed the 64-bit integer range; nothing was written",
            **where)
    raise BarrierDatabaseError(f"unexpected redis barrier answer {result!r}", **where)


def query_prepared(
    client: Any, gid: str, *, expire: int = DEFAULT_EXPIRE, layout: str = "go", key: Optional[str] = None
) -> None:
    """The msg ``query_prepared`` check on Redis: return on success, raise DtmFailure on rollback.

    With the ``cluster`` layout pass ``key``, the business key the msg's local step adjusted.
    """
    check_client(client, asyncio=False)
    _flow.run(prepared_flow(gid, expire=expire, layout=layout, key=key), client)


def prepared_flow(gid: str, *, expire: int = DEFAULT_EXPIRE, layout: str = "go", key: Optional[str] = None
                  ) -> Flow[None]:
    """:func:`query_prepared` as a flow on a Redis client."""
    expire = _check_expire(expire)
    tag = slot_tag(_check_key(key, gid)) if (layout == "cluster" and key is not None) else None
    msg_key = barrier_key(gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID, layout=layout, tag=tag)
    where = {"gid": gid, "branch_id": MSG_BRANCH_ID, "op": OP_MSG}
    try:
        answer = yield from QUERY_PREPARED_SCRIPT.flow([msg_key], [expire])
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "redis":
            raise
        raise BarrierDatabaseError(f"redis query_prepared failed: {type(exc).__name__}: {exc}", **where) from exc
    value = answer.decode() if isinstance(answer, bytes) else str(answer)
    if value == REASON_ROLLBACK:
        raise DtmFailure("msg local transaction was rolled back", **where)
