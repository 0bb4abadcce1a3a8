"""Saga: a sequence (or a DAG, when concurrent) of actions, each with a compensation."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, TypeVar

from ._consts import DEFAULT_DTM, SAGA
from ._protocol import encode_custom_data, encode_payload
from ._steps import StepTrans
from ._trans import TransBase
from ._validate import check_http_url
from .client import DtmLike
from .errors import DtmInvalidInput

__all__ = ["Saga", "SagaCore"]

S = TypeVar("S", bound="SagaCore")


class SagaCore(StepTrans):
    """A saga's steps, orders and body: everything but the submit (shared by sync and async)."""

    trans_type = SAGA

    def __init__(self, dtm: Any = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)
        self._orders: dict[int, list[int]] = {}

    @property
    def orders(self) -> Mapping[int, tuple[int, ...]]:
        """Step index → the steps it waits for, from :meth:`add_branch_order` (read-only)."""
        return MappingProxyType({branch: tuple(pres) for branch, pres in self._orders.items()})

    def add(self: S, action: str, compensate: str, payload: Any) -> S:
        """Append a step. ``compensate`` may be ``""`` (nothing to undo).

        ``payload`` is any JSON-serialisable value, or raw ``str``/``bytes`` sent as they are;
        ``""`` makes DTM call the branch with GET and no body.
        """
        check_http_url(action, "saga action URL", gid=self.gid)
        check_http_url(compensate, "saga compensate URL", gid=self.gid, allow_empty=True)
        self._append_step({"action": action, "compensate": compensate}, encode_payload(payload, gid=self.gid))
        return self

    def add_branch_order(self: S, branch: int, pre_branches: Sequence[int]) -> S:
        """In a concurrent saga, run step ``branch`` only after every step in ``pre_branches`` (0-based)."""
        for index in (branch, *pre_branches):
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise DtmInvalidInput(f"saga step index must be an int >= 0, not {index!r}", gid=self.gid)
        if branch in pre_branches:
            raise DtmInvalidInput(f"saga step {branch} cannot wait for itself", gid=self.gid)
        with self._lock:
            self._check_mutable("add a branch order")
            pres = self._orders.setdefault(branch, [])
            pres.extend(p for p in pre_branches if p not in pres)
        return self

    def enable_concurrent(self: S) -> S:
        """Run the steps concurrently, constrained only by ``add_branch_order``."""
        self.concurrent = True
        return self

    set_concurrent = enable_concurrent

    def _check_orders(self) -> None:
        n = len(self._steps)
        for branch, pres in self._orders.items():
            for index in (branch, *pres):
                if index >= n:
                    raise DtmInvalidInput(
                        f"saga branch order names step {index}, but there are {n} steps", gid=self.gid
                    )
        # A cycle would leave the saga waiting forever on DTM.
        state: dict[int, int] = {}

        def visit(node: int) -> None:
            state[node] = 1
            for pre in self._orders.get(node, ()):
                if state.get(pre) == 1:
                    raise DtmInvalidInput(f"saga branch orders form a cycle through step {pre}", gid=self.gid)
                if pre not in state:
                    visit(pre)
            state[node] = 2

        for node in list(self._orders):
            if node not in state:
                visit(node)

    def _extra_body(self) -> dict[str, Any]:
        body = super()._extra_body()
        if self.concurrent:
            orders = {str(k): v for k, v in self._orders.items()}
            body["custom_data"] = encode_custom_data({"concurrent": True, "orders": orders}, gid=self.gid)
        return body

    def build_body(self) -> dict[str, Any]:
        """The submit body; raises DtmInvalidInput for an empty saga or bad branch orders."""
        if not self._steps:
            raise DtmInvalidInput("a saga needs at least one step", gid=self.gid)
        if self._orders and not self.concurrent:
            raise DtmInvalidInput("add_branch_order needs enable_concurrent()", gid=self.gid)
        self._check_orders()
        return super().build_body()


class Saga(SagaCore, TransBase):
    """A saga global transaction.

    >>> Saga(DTM, gid).add(f"{busi}/TransOut", f"{busi}/TransOutCom", {"amount": 30}).submit()

    Steps are numbered from 0 in the order they were added; DTM gives step ``i`` the branch id
    ``%02d % (i + 1)``. ``add_branch_order(2, [0, 1])`` makes step 2 wait for steps 0 and 1 in a
    concurrent saga. A saga is submitted once; steps and options are fixed from then on.
    :attr:`steps`, :attr:`payloads` and :attr:`orders` are read-only views.
    """

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    def submit(self, *, recover: bool = False) -> None:
        """Submit the saga. DTM runs it; with ``wait_result`` this returns after the first pass.

        With ``wait_result``, a failed saga raises DtmFailure (confirmed with ``/query``), and one
        still running raises DtmInProgress. ``recover=True`` re-sends a submit whose answer was
        lost only after ``/query`` shows DTM never received it.

        A second submit raises DtmInvalidInput (DTM would run the actions again), unless the first
        one certainly never left (DtmConnectError).
        """
        self._run("submit", lambda: self._submit_flow(recover))
