"""Saga: a sequence (or a DAG, when concurrent) of actions, each with a compensation."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ._consts import DEFAULT_DTM, SAGA
from ._protocol import encode_custom_data, encode_payload
from ._trans import TransBase
from ._validate import check_http_url
from .client import DtmLike
from .errors import DtmInvalidInput

__all__ = ["Saga"]


class Saga(TransBase):
    """A saga global transaction.

    >>> Saga(DTM, gid).add(f"{busi}/TransOut", f"{busi}/TransOutCom", {"amount": 30}).submit()

    Steps are numbered from 0 in the order they were added; DTM gives step ``i`` the branch id
    ``%02d % (i + 1)``. ``add_branch_order(2, [0, 1])`` makes step 2 wait for steps 0 and 1 in a
    concurrent saga.
    """

    trans_type = SAGA

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)
        self.steps: list[dict[str, str]] = []
        self.payloads: list[str] = []
        self.orders: dict[int, list[int]] = {}

    def add(self, action: str, compensate: str, payload: Any) -> Saga:
        """Append a step. ``compensate`` may be ``""`` (nothing to undo).

        ``payload`` is any JSON-serialisable value, or raw ``str``/``bytes`` sent as they are;
        ``""`` makes DTM call the branch with GET and no body.
        """
        check_http_url(action, "saga action URL", gid=self.gid)
        check_http_url(compensate, "saga compensate URL", gid=self.gid, allow_empty=True)
        encoded = encode_payload(payload, gid=self.gid)
        self.steps.append({"action": action, "compensate": compensate})
        self.payloads.append(encoded)
        return self

    def add_branch_order(self, branch: int, pre_branches: Sequence[int]) -> Saga:
        """In a concurrent saga, run step ``branch`` only after every step in ``pre_branches`` (0-based)."""
        for index in (branch, *pre_branches):
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise DtmInvalidInput(f"saga step index must be an int >= 0, not {index!r}", gid=self.gid)
        if branch in pre_branches:
            raise DtmInvalidInput(f"saga step {branch} cannot wait for itself", gid=self.gid)
        self.orders.setdefault(branch, []).extend(p for p in pre_branches if p not in self.orders.get(branch, []))
        return self

    def enable_concurrent(self) -> Saga:
        """Run the steps concurrently, constrained only by ``add_branch_order``."""
        self.concurrent = True
        return self

    set_concurrent = enable_concurrent

    def _check_orders(self) -> None:
        n = len(self.steps)
        for branch, pres in self.orders.items():
            for index in (branch, *pres):
                if index >= n:
                    raise DtmInvalidInput(
                        f"saga branch order names step {index}, but there are {n} steps", gid=self.gid
                    )
        # A cycle would leave the saga waiting forever on DTM.
        state: dict[int, int] = {}

        def visit(node: int) -> None:
            state[node] = 1
            for pre in self.orders.get(node, ()):
                if state.get(pre) == 1:
                    raise DtmInvalidInput(f"saga branch orders form a cycle through step {pre}", gid=self.gid)
                if pre not in state:
                    visit(pre)
            state[node] = 2

        for node in list(self.orders):
            if node not in state:
                visit(node)

    def _extra_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"steps": [dict(s) for s in self.steps], "payloads": list(self.payloads)}
        if self.concurrent:
            orders = {str(k): v for k, v in self.orders.items()}
            body["custom_data"] = encode_custom_data({"concurrent": True, "orders": orders}, gid=self.gid)
        return body

    def build_body(self) -> dict[str, Any]:
        """The submit body; raises DtmInvalidInput for an empty saga or bad branch orders."""
        if not self.steps:
            raise DtmInvalidInput("a saga needs at least one step", gid=self.gid)
        if self.orders and not self.concurrent:
            raise DtmInvalidInput("add_branch_order needs enable_concurrent()", gid=self.gid)
        self._check_orders()
        return super().build_body()

    def submit(self, *, recover: bool = False) -> None:
        """Submit the saga. DTM runs it; with ``wait_result`` this returns after the first pass.

        With ``wait_result``, a failed saga raises DtmFailure (confirmed with ``/query``), and one
        still running raises DtmInProgress. ``recover=True`` re-sends a submit whose answer was
        lost only after ``/query`` shows DTM never received it.
        """
        self._call_submit(recover=recover)
