"""One implementation x one workload, timed call by call. Prints a JSON summary on stdout.

Run by bench/client_overhead.py with the interpreter of the implementation under test (the
official dtmcli 1.7.7.0 lives in its own virtual environment, so ``import dtmcli`` resolves there).
Usage: python _client_loop.py IMPL WORKLOAD N BASE_URL
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from typing import Any, Callable
from urllib.parse import urlsplit

IMPL, WORKLOAD, N, BASE = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
DTM = f"{BASE}/api/dtmsvr"
BUSI = f"{BASE}/busi"
P1 = {"amount": 30, "user_id": 1}
P2 = {"amount": 30, "user_id": 2}
_counter = [0]


def gid() -> str:
    _counter[0] += 1
    return f"bench{_counter[0]:09d}"


def saga_body(g: str) -> dict[str, Any]:
    return {"gid": g, "trans_type": "saga", "concurrent": False, "protocol": "",
            "steps": [{"action": f"{BUSI}/TransOut", "compensate": f"{BUSI}/TransOutCom"},
                      {"action": f"{BUSI}/TransIn", "compensate": f"{BUSI}/TransInCom"}],
            "payloads": [json.dumps(P1, separators=(",", ":")), json.dumps(P2, separators=(",", ":"))]}


def msg_body(g: str) -> dict[str, Any]:
    return {"gid": g, "trans_type": "msg", "concurrent": False, "protocol": "",
            "steps": [{"action": f"{BUSI}/TransIn"}], "payloads": [json.dumps(P1, separators=(",", ":"))],
            "query_prepared": f"{BUSI}/qp"}


def tcc_register(g: str, bid: str) -> dict[str, str]:
    return {"gid": g, "trans_type": "tcc", "branch_id": bid, "data": json.dumps(P1, separators=(",", ":")),
            "confirm": f"{BUSI}/confirm", "cancel": f"{BUSI}/cancel"}


def try_query(g: str, bid: str) -> dict[str, str]:
    return {"dtm": DTM, "gid": g, "branch_id": bid, "trans_type": "tcc", "op": "try"}


def make_new(transport: str = "") -> Callable[[], None]:
    """dtmcli on its default transport, or on ``transport`` (``urllib3``: the default before issue 15)."""
    from dtmcli import DtmClient, Msg, Saga

    if transport == "urllib3":
        from dtmcli._transport import Urllib3Transport

        dtm = DtmClient(DTM, transport=Urllib3Transport())
    else:
        dtm = DtmClient(DTM)

    def saga() -> None:
        Saga(dtm, gid()).add(f"{BUSI}/TransOut", f"{BUSI}/TransOutCom", P1).add(
            f"{BUSI}/TransIn", f"{BUSI}/TransInCom", P2).submit()

    def tcc() -> None:
        from dtmcli.tcc import tcc_global_transaction

        with tcc_global_transaction(dtm, gid()) as t:
            t.call_branch(P1, f"{BUSI}/try", f"{BUSI}/confirm", f"{BUSI}/cancel")
            t.call_branch(P2, f"{BUSI}/try", f"{BUSI}/confirm", f"{BUSI}/cancel")

    def msg() -> None:
        m = Msg(dtm, gid()).add(f"{BUSI}/TransIn", P1)
        m.prepare(f"{BUSI}/qp")
        m.submit()

    return {"saga": saga, "tcc": tcc, "msg": msg}[WORKLOAD]


def make_raw() -> Callable[[], None]:
    import requests

    s = requests.Session()

    def post(path: str, body: Any) -> None:
        r = s.post(f"{DTM}/{path}", json=body, timeout=10)
        if r.status_code != 200:
            raise RuntimeError(r.text)

    def saga() -> None:
        post("submit", saga_body(gid()))

    def tcc() -> None:
        g = gid()
        body = {"gid": g, "trans_type": "tcc", "concurrent": False, "protocol": ""}
        post("prepare", body)
        for bid, p in (("01", P1), ("02", P2)):
            post("registerBranch", tcc_register(g, bid))
            r = s.post(f"{BUSI}/try", json=p, params=try_query(g, bid), timeout=10)
            if r.status_code != 200:
                raise RuntimeError(r.text)
        post("submit", body)

    def msg() -> None:
        body = msg_body(gid())
        post("prepare", body)
        post("submit", body)

    return {"saga": saga, "tcc": tcc, "msg": msg}[WORKLOAD]


def make_httpclient() -> Callable[[], None]:
    """The floor: stdlib http.client on one keep-alive connection."""
    from urllib.parse import urlencode

    u = urlsplit(BASE)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    headers = {"Content-Type": "application/json"}

    def post(path: str, body: Any) -> None:
        conn.request("POST", path, json.dumps(body).encode(), headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(r.status)

    def saga() -> None:
        post("/api/dtmsvr/submit", saga_body(gid()))

    def tcc() -> None:
        g = gid()
        body = {"gid": g, "trans_type": "tcc", "concurrent": False, "protocol": ""}
        post("/api/dtmsvr/prepare", body)
        for bid, p in (("01", P1), ("02", P2)):
            post("/api/dtmsvr/registerBranch", tcc_register(g, bid))
            post("/busi/try?" + urlencode(try_query(g, bid)), p)
        post("/api/dtmsvr/submit", body)

    def msg() -> None:
        body = msg_body(gid())
        post("/api/dtmsvr/prepare", body)
        post("/api/dtmsvr/submit", body)

    return {"saga": saga, "tcc": tcc, "msg": msg}[WORKLOAD]


def make_old() -> Callable[[], None]:
    """The official PyPI dtmcli 1.7.7.0 (its own API: add(body, action, compensate))."""
    from dtmcli import msg as old_msg  # type: ignore[import-not-found]
    from dtmcli import saga as old_saga
    from dtmcli import tcc as old_tcc

    def saga() -> None:
        old_saga.Saga(DTM, gid()).add(P1, f"{BUSI}/TransOut", f"{BUSI}/TransOutCom").add(
            P2, f"{BUSI}/TransIn", f"{BUSI}/TransInCom").submit()

    def tcc() -> None:
        def body(t: Any) -> None:
            t.call_branch(P1, f"{BUSI}/try", f"{BUSI}/confirm", f"{BUSI}/cancel")
            t.call_branch(P2, f"{BUSI}/try", f"{BUSI}/confirm", f"{BUSI}/cancel")

        if old_tcc.tcc_global_transaction(DTM, gid(), body) == "":
            raise RuntimeError("old tcc aborted")

    def msg() -> None:
        m = old_msg.Msg(DTM, gid()).add(P1, f"{BUSI}/TransIn")
        m.prepare(f"{BUSI}/qp")
        m.submit()

    return {"saga": saga, "tcc": tcc, "msg": msg}[WORKLOAD]


def main() -> None:
    makers = {"new": make_new, "new-urllib3": lambda: make_new("urllib3"), "raw": make_raw,
              "httpclient": make_httpclient, "old": make_old}
    fn = makers[IMPL]()
    for _ in range(min(200, N)):  # warm-up: connections, imports, caches
        fn()
    lat = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(N):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    lat.sort()
    sys.stdout.write(json.dumps({
        "impl": IMPL, "workload": WORKLOAD, "n": N,
        "mean_us": wall / N * 1e6, "cpu_us": cpu / N * 1e6,
        "p50_us": lat[N // 2] * 1e6, "p99_us": lat[min(N - 1, int(N * 0.99))] * 1e6,
    }) + "\n")


if __name__ == "__main__":
    main()
