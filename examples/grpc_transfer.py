"""gRPC: a bank transfer over DTM's gRPC API, with a grpcio bank service (needs ``pip install 'dtmcli[grpc]'``).

The bank is a grpcio server (service ``bank.Bank``): ``TransOut``/``TransIn`` and their compensations
``TransOutRevert``/``TransInRevert`` for the saga, ``TccTry``/``TccConfirm``/``TccCancel`` for the TCC.
dtmcli's ``DtmServerInterceptor`` reads DTM's ``dtm-*`` metadata into the current ``BranchInfo`` and
answers as DTM expects: a handler that returns is OK, one that raises ``DtmFailure`` is ``ABORTED``
(roll back). Payloads are protobuf messages ``bank.TransReq{int64 user_id = 1; int64 amount = 2;}``.

Three transactions, over ``DtmGrpcClient``:

1. saga: 30 from user 1 to user 2;
2. saga: 30 from user 1 to the missing account 3: TransIn is ABORTED, DTM compensates TransOut;
3. TCC: 10 from user 1 to user 2 (try moves the money, confirm has nothing left to do).

Run on its own: ``python examples/grpc_transfer.py`` starts the embedded coordinator with its gRPC API.
For a real DTM: ``DTM_GRPC_SERVER=localhost:36790 DTM_SERVER=http://localhost:36789/api/dtmsvr`` (the
HTTP API answers the queries, which DTM's gRPC API lacks; DTM must reach 127.0.0.1 of this machine).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

sys.path.insert(0, str(Path(__file__).parent))

from bank_service import Ledger, MemoryLedger

from dtmcli import DtmFailure
from dtmcli.branch import current_branch_info
from dtmcli.grpc import DtmGrpcClient, DtmServerInterceptor, Saga, tcc_global_transaction


def _trans_req_class() -> Any:
    """``bank.TransReq``. A service would import the class protoc generates from bank.proto; building it from
    its descriptor keeps this example free of a code generation step."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="bank.proto", package="bank", syntax="proto3")
    msg = proto.message_type.add(name="TransReq")
    msg.field.add(name="user_id", number=1, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    msg.field.add(name="amount", number=2, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bank.TransReq"))


TransReq = _trans_req_class()
SERVICE = "bank.Bank"


class GrpcBank:
    """The bank's gRPC service on 127.0.0.1, over a ledger (in memory by default, or bank_service.MysqlLedger)."""

    def __init__(self, ledger: Optional[Ledger] = None) -> None:
        self.ledger = ledger if ledger is not None else MemoryLedger()
        # (method name, sign of the amount moved): compensations move it back.
        moves = {"TransOut": -1, "TransOutRevert": 1, "TransIn": 1, "TransInRevert": -1,
                 "TccTry": 1, "TccConfirm": 0, "TccCancel": -1}
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._handler(sign), request_deserializer=TransReq.FromString
            )  # a handler returning None answers an empty message
            for name, sign in moves.items()
        }
        self._server = grpc.server(ThreadPoolExecutor(8), interceptors=[DtmServerInterceptor()])
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def _handler(self, sign: int) -> Any:
        def handle(request: Any, context: grpc.ServicerContext) -> None:
            info = current_branch_info()  # gid, trans_type, branch_id, op: set by the interceptor
            assert info is not None
            if sign:  # DtmFailure (no account, insufficient balance) -> ABORTED -> DTM rolls back
                self.ledger.adjust(info, request.user_id, sign * request.amount)

        return handle

    def url(self, method: str) -> str:
        """A branch URL as DTM calls it: ``host:port/package.Service/Method``."""
        return f"{self.target}/{SERVICE}/{method}"

    def __enter__(self) -> GrpcBank:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0).wait()


def run(dtm_grpc: str, dtm_http: str, ledger: Optional[Ledger] = None) -> list[tuple[str, str]]:
    """The three transactions against the DTM at ``dtm_grpc`` (``host:port``; ``dtm_http`` is its HTTP API).

    Returns (title, outcome) pairs; the last outcome is the gRPC bank's balances."""
    outcomes = []
    with GrpcBank(ledger) as bank, DtmGrpcClient(dtm_grpc, http=dtm_http) as dtm:
        saga = Saga(dtm, dtm.new_gid(), wait_result=True)
        saga.add(bank.url("TransOut"), bank.url("TransOutRevert"), TransReq(user_id=1, amount=30))
        saga.add(bank.url("TransIn"), bank.url("TransInRevert"), TransReq(user_id=2, amount=30))
        saga.submit()  # wait_result: returns once DTM ran the branches
        outcomes.append(("grpc saga: 30, user 1 to user 2", f"{saga.gid} {dtm.query_status(saga.gid)}"))

        saga = Saga(dtm, dtm.new_gid(), wait_result=True)
        saga.add(bank.url("TransOut"), bank.url("TransOutRevert"), TransReq(user_id=1, amount=30))
        saga.add(bank.url("TransIn"), bank.url("TransInRevert"), TransReq(user_id=3, amount=30))
        try:
            saga.submit()
            outcome = "succeeded?!"
        except DtmFailure as exc:  # TransIn answered ABORTED: TransOut was compensated
            reason = exc.message.split(" return failed: ")[-1].removesuffix(" FAILURE")
            outcome = f"{saga.gid} rolled back ({reason})"
        outcomes.append(("grpc saga to a missing account", outcome))

        with tcc_global_transaction(dtm, wait_result=True) as tcc:
            tcc.call_branch(TransReq(user_id=1, amount=-10), bank.url("TccTry"), bank.url("TccConfirm"),
                            bank.url("TccCancel"))
            tcc.call_branch(TransReq(user_id=2, amount=10), bank.url("TccTry"), bank.url("TccConfirm"),
                            bank.url("TccCancel"))
        outcomes.append(("grpc tcc: 10, user 1 to user 2", f"{tcc.gid} {dtm.query_status(tcc.gid)}"))
        balances = bank.ledger.balances()
        outcomes.append(("grpc bank balances", f"{balances}  total {sum(balances.values())}"))
    return outcomes


def main() -> None:
    """Run against DTM_GRPC_SERVER (with DTM_SERVER), else against the embedded coordinator."""
    target = os.environ.get("DTM_GRPC_SERVER")
    if target:
        pairs = run(target, os.environ.get("DTM_SERVER", "http://localhost:36789/api/dtmsvr"))
    else:
        from dtmcli.testing import DtmTestServer

        with DtmTestServer(clock="real", grpc_port=0) as server:
            print(f"DTM: {server.grpc_target} (gRPC API of dtmcli's embedded coordinator)")
            pairs = run(server.grpc_target, server.url)
    for title, outcome in pairs:
        print(f"{title}: {outcome}")


if __name__ == "__main__":
    main()
