"""Redis barrier backend: one atomic Lua script per call, run by SHA (protocol.md §7).

Key layouts:

* ``"go"`` (default): ``<gid>-<branch_id>-<op>-<barrier_id>``, the Go client's keys, so Go and
  Python branches of one transaction see each other's markers.
* ``"cluster"``: ``{<tag>}<gid>-<branch_id>-<op>-<barrier_id>`` where ``<tag>`` is the business
  key's hash tag (the text inside its first ``{...}``, else the whole key); all keys of a script
  then live in the business key's slot, as Redis Cluster requires.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional

from .._consts import MSG_BRANCH_ID, OP_MSG
from ..errors import DtmDuplicated, DtmFailure, DtmInvalidInput
from .core import MSG_BARRIER_ID, REASON_ROLLBACK, BarrierDatabaseError, Decision, load_resource, origin_op

__all__ = ["DEFAULT_EXPIRE", "LAYOUTS", "barrier_key", "check_adjust_amount", "hash_tag", "query_prepared"]

logger = logging.getLogger("dtmcli")

DEFAULT_EXPIRE = 7 * 24 * 3600
LAYOUTS = ("go", "cluster")


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
        from redis.exceptions import NoScriptError

        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            logger.debug("redis script %s not loaded; loading it", self.name)
            loaded = client.script_load(self.text)
            if loaded != self.sha:
                raise BarrierDatabaseError(f"redis returned sha {loaded} for {self.name}, not {self.sha}") from None
            return client.evalsha(self.sha, len(keys), *keys, *args)


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


def barrier_key(
    gid: str, branch_id: str, op: str, barrier_id: str, *, layout: str = "go", tag: Optional[str] = None
) -> str:
    """The key of one barrier marker in the chosen layout (``tag`` is required for ``cluster``)."""
    plain = f"{gid}-{branch_id}-{op}-{barrier_id}"
    if layout == "go":
        return plain
    if layout == "cluster":
        if not tag:
            raise DtmInvalidInput("the cluster key layout needs the business key's hash tag", gid=gid)
        return f"{{{tag}}}{plain}"
    raise DtmInvalidInput(f"unknown redis key layout {layout!r}; use one of {', '.join(LAYOUTS)}", gid=gid)


def _check_expire(expire: Any) -> int:
    if isinstance(expire, bool) or not isinstance(expire, int) or expire <= 0:
        raise DtmInvalidInput(f"redis barrier expire must be a positive int of seconds, not {expire!r}")
    return expire


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
    """Adjust the integer at ``key`` by ``amount`` under the barrier, atomically.

    Raises DtmFailure when the key is missing or the result would be negative (checked first),
    DtmDuplicated when a msg call repeats. Returns the decision: RUN (applied), DUPLICATE (repeated
    or suspended: no effect) or NULL_COMPENSATION (marker written, no effect).
    """
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise DtmInvalidInput(f"amount must be an int, not {amount!r}", gid=gid)
    if not isinstance(key, str) or not key:
        raise DtmInvalidInput("redis business key must be a non-empty str", gid=gid)
    expire = _check_expire(expire)
    tag = hash_tag(key) if layout == "cluster" else None
    origin = origin_op(op)
    keys = [
        key,
        barrier_key(gid, branch_id, op, barrier_id, layout=layout, tag=tag),
        barrier_key(gid, branch_id, origin, barrier_id, layout=layout, tag=tag),
    ]
    where = {"gid": gid, "branch_id": branch_id, "op": op}
    try:
        answer = ADJUST_SCRIPT(client, keys, [amount, origin, expire])
    except DtmInvalidInput:
        raise
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "redis":
            raise
        raise BarrierDatabaseError(f"redis barrier script failed: {type(exc).__name__}: {exc}", **where) from exc
    result = answer.decode() if isinstance(answer, bytes) else str(answer)
    logger.debug("redis barrier %s/%s/%s/%s on %s: %s", gid, branch_id, op, barrier_id, key, result)
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
    raise BarrierDatabaseError(f"unexpected redis barrier answer {result!r}", **where)


def query_prepared(
    client: Any, gid: str, *, expire: int = DEFAULT_EXPIRE, layout: str = "go", key: Optional[str] = None
) -> None:
    """The msg ``query_prepared`` check on Redis: return on success, raise DtmFailure on rollback.

    With the ``cluster`` layout pass ``key``, the business key the msg's local step adjusted.
    """
    expire = _check_expire(expire)
    tag = hash_tag(key) if (layout == "cluster" and key) else None
    msg_key = barrier_key(gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID, layout=layout, tag=tag)
    where = {"gid": gid, "branch_id": MSG_BRANCH_ID, "op": OP_MSG}
    try:
        answer = QUERY_PREPARED_SCRIPT(client, [msg_key], [expire])
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "redis":
            raise
        raise BarrierDatabaseError(f"redis query_prepared failed: {type(exc).__name__}: {exc}", **where) from exc
    value = answer.decode() if isinstance(answer, bytes) else str(answer)
    if value == REASON_ROLLBACK:
        raise DtmFailure("msg local transaction was rolled back", **where)
