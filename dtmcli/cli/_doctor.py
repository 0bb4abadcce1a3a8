"""``dtmcli doctor``: find misconfiguration before it bites, one line per check with the fix.

Checks: DTM reachable and its version; clock skew against DTM's HTTP ``Date`` header; for each
``--db``, the barrier table (exists, ids compared exactly) and with ``--xa`` whether XA can run;
``--redis`` reachable with scripting allowed.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

from .._barrier.sql import Finding
from ..errors import DtmError, DtmTransportError
from ._base import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, Io, client_for, redact, shown_url
from ._render import clean, to_json

__all__ = ["Check", "DbTarget", "doctor_exit_code", "parse_db_url", "prepared_transactions_check", "run_doctor",
           "skew_check"]

OK, WARN, FAIL = "OK", "WARN", "FAIL"
SKEW_WARN_SECONDS = 2.0  # the Date header has a resolution of one second


@dataclass(frozen=True)
class Check:
    """One doctor line. ``unreachable`` marks the DTM check that failed because DTM could not be reached."""

    status: str
    name: str
    detail: str
    fix: str = ""
    unreachable: bool = False

    def line(self) -> str:
        """``OK   name: detail`` with ``-> fix`` on the next line when there is one."""
        text = f"{self.status:<4} {clean(self.name)}: {clean(self.detail)}\n"
        return text + (f"     fix: {clean(self.fix)}\n" if self.fix else "")


def doctor_exit_code(checks: list[Check]) -> int:
    """0 when nothing FAILed; 3 when the only failure is that DTM cannot be reached; 1 otherwise."""
    failed = [c for c in checks if c.status == FAIL]
    if not failed:
        return EXIT_OK
    return EXIT_UNREACHABLE if all(c.unreachable for c in failed) else EXIT_FAILED


# -- DTM -------------------------------------------------------------------------------------------


def skew_check(date_header: Optional[str], sent: float, received: float) -> Check:
    """Compare DTM's ``Date`` header with this host's clock at the middle of the exchange (epoch seconds)."""
    name = "clock skew"
    parsed = email.utils.parsedate_to_datetime(date_header) if date_header else None
    if parsed is None:
        return Check(WARN, name, "DTM's answer has no Date header; skew not measured")
    skew = parsed.timestamp() - (sent + received) / 2
    # The header drops the fraction of a second, so up to 1 s (plus the round trip) is no skew at all.
    if abs(skew) <= SKEW_WARN_SECONDS + (received - sent) / 2:
        return Check(OK, name, f"{skew:+.1f} s (within the Date header's 1 s resolution)")
    ahead = "ahead of" if skew > 0 else "behind"
    return Check(
        WARN, name, f"DTM's clock is {abs(skew):.0f} s {ahead} this host's: times shown by query/list and "
        "--since are off by that much", "synchronise both clocks with NTP (chrony, systemd-timesyncd)",
    )


def _date_header(url: str, timeout: float) -> tuple[Optional[str], float, float]:
    parts = urlsplit(f"{url}/version")
    request = urllib.request.Request(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl())
    if parts.username is not None:  # urllib does not take user info in the URL; requests sends it as basic auth
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(user_pass).decode())
    sent = time.time()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            header = resp.headers.get("Date")
    except urllib.error.HTTPError as exc:
        header = exc.headers.get("Date")
    return header, sent, time.time()


def check_dtm(url: str, timeout: float) -> list[Check]:
    """DTM answers ``version`` (and ``ping``), and how far its clock is from ours."""
    name = f"DTM {shown_url(url, '--dtm URL')}"
    try:
        with client_for(url, timeout) as dtm:
            version = dtm.version()
            dtm.ping()
    except DtmTransportError as exc:
        return [Check(FAIL, name, f"cannot reach DTM: {redact(str(exc), url)}",
                      "start DTM, or pass its address with --dtm / DTMCLI_SERVER (http://host:36789/api/dtmsvr)",
                      unreachable=True)]
    except DtmError as exc:
        return [Check(FAIL, name, f"something answered, but not like DTM: {redact(str(exc), url)}",
                      "check that the URL ends in /api/dtmsvr and points at DTM, not a proxy or another service")]
    checks = [Check(OK, name, f"reachable, version {version or '(empty)'}")]
    try:
        checks.append(skew_check(*_date_header(url, timeout)))
    except (OSError, ValueError) as exc:
        checks.append(Check(WARN, "clock skew", f"not measured: {redact(str(exc), url)}"))
    return checks


# -- databases -------------------------------------------------------------------------------------

_SCHEMES = {"mysql": "mysql", "mariadb": "mysql", "postgres": "postgres", "postgresql": "postgres"}
_EXTRAS = {"mysql": ("pymysql", "dtmcli[mysql]"), "postgres": ("psycopg2", "dtmcli[postgres]")}


@dataclass(frozen=True)
class DbTarget:
    """A ``--db`` URL taken apart. ``shown`` is the URL without its password, for output."""

    dialect: str
    host: str
    port: Optional[int]
    user: Optional[str]
    password: Optional[str]
    database: Optional[str]
    shown: str


def parse_db_url(url: str) -> DbTarget:
    """``mysql://user:pass@host:3306/db``, ``mariadb://...``, ``postgresql://...`` (``+driver`` ignored).

    Raises ValueError naming what is wrong (the message never contains the password).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower().partition("+")[0]
    shown = shown_url(url, "--db URL")
    if scheme not in _SCHEMES:
        raise ValueError(f"{shown}: the scheme must be mysql, mariadb, postgres or postgresql")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown}: malformed port") from None
    if not parts.hostname:
        raise ValueError(f"{shown}: no host")
    database = unquote(parts.path.lstrip("/")) or None
    user = unquote(parts.username) if parts.username is not None else None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    shown = f"{parts.scheme}://{user + '@' if user else ''}{host}{'' if port is None else f':{port}'}/{database or ''}"
    return DbTarget(
        dialect=_SCHEMES[scheme],
        host=parts.hostname,
        port=port,
        user=user,
        password=unquote(parts.password) if parts.password is not None else None,
        database=database,
        shown=shown,
    )


def connect(target: DbTarget, timeout: float) -> Any:
    """A DB-API connection with PyMySQL or psycopg2; ImportError naming the extra to install when missing."""
    module, extra = _EXTRAS[target.dialect]
    try:
        driver = __import__(module)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed: pip install '{extra}'") from exc
    seconds = max(1, int(timeout))
    if target.dialect == "mysql":
        return driver.connect(
            host=target.host, port=target.port or 3306, user=target.user or "root", password=target.password or "",
            database=target.database, charset="utf8mb4", connect_timeout=seconds, read_timeout=seconds,
            write_timeout=seconds,
        )
    kwargs = {"host": target.host, "port": target.port or 5432, "user": target.user, "password": target.password,
              "dbname": target.database, "connect_timeout": seconds}
    return driver.connect(**{k: v for k, v in kwargs.items() if v is not None})


def finding_check(finding: Finding) -> Check:
    """A barrier_preflight finding as a FAIL line."""
    return Check(FAIL, f"barrier table {finding.table}", f"[{finding.code}] {finding.message}", finding.fix)


def prepared_transactions_check(value: Optional[str], shown: str) -> Check:
    """PostgreSQL's ``max_prepared_transactions`` setting: XA needs it above 0."""
    name = f"{shown} XA"
    try:
        number = int(value or "0")
    except ValueError:
        number = 0
    if number > 0:
        return Check(OK, name, f"max_prepared_transactions = {number}")
    return Check(FAIL, name, f"max_prepared_transactions = {value or 0}: PREPARE TRANSACTION is disabled, XA "
                 "branches fail", "set max_prepared_transactions (e.g. 100) in postgresql.conf or with ALTER "
                 "SYSTEM, and restart PostgreSQL")


def _show_max_prepared(conn: Any) -> Optional[str]:
    with conn.cursor() as cur:
        cur.execute("show max_prepared_transactions")
        row = cur.fetchone()
    conn.rollback()
    return str(row[0]) if row else None


def _xa_checks(conn: Any, target: DbTarget) -> list[Check]:
    from ..barrier import xa_preflight

    name = f"{target.shown} XA"
    setting = None
    try:
        if target.dialect == "postgres":
            setting = prepared_transactions_check(_show_max_prepared(conn), target.shown)
            if setting.status != OK:
                return [setting]
        xa_preflight(conn, dialect=target.dialect)
        if target.dialect == "mysql":
            with conn.cursor() as cur:
                cur.execute("XA RECOVER")  # what DTM's recovery of a prepared branch needs
                cur.fetchall()
    except Exception as exc:
        fix = "grant the user XA rights (MySQL 8: GRANT XA_RECOVER_ADMIN ON *.* TO user)" \
            if target.dialect == "mysql" else ""
        return [Check(FAIL, name, f"XA is not usable: {redact(str(exc))}", fix)]
    if setting is not None:
        return [Check(OK, name, f"{setting.detail}; a probe transaction was prepared and rolled back")]
    return [Check(OK, name, "XA START/PREPARE/ROLLBACK and XA RECOVER allowed")]


def check_db(url: str, table: str, xa: bool, timeout: float) -> list[Check]:
    """Connect, check the barrier table, and with ``xa`` whether XA branches can run."""
    from ..barrier import barrier_preflight

    try:
        target = parse_db_url(url)
    except ValueError as exc:
        return [Check(FAIL, "database", str(exc), "use e.g. mysql://user:pass@host:3306/db or "
                      "postgresql://user:pass@host:5432/db")]
    try:
        conn = connect(target, timeout)
    except ImportError as exc:
        return [Check(FAIL, target.shown, str(exc))]
    except Exception as exc:
        return [Check(FAIL, target.shown, f"cannot connect: {redact(str(exc), url)}",
                      "check host, port, user, password and database")]
    try:
        try:
            findings = barrier_preflight(conn, table=table, dialect=target.dialect)
        except DtmError as exc:
            detail = f"in {target.shown}: cannot check: {redact(str(exc), url)}"
            checks = [Check(FAIL, f"barrier table {table}", detail)]
        else:
            checks = [finding_check(f) for f in findings] or [
                Check(OK, f"barrier table {table}", f"in {target.shown}: exists, ids compare exactly")
            ]
        if xa:
            checks.extend(_xa_checks(conn, target))
        return checks
    finally:
        conn.close()


# -- redis -----------------------------------------------------------------------------------------


def check_redis(url: str, timeout: float) -> list[Check]:
    """Redis answers PING and runs a Lua script (the Redis barrier is one)."""
    try:
        import redis
    except ImportError:
        return [Check(FAIL, "redis", "the redis package is not installed: pip install 'dtmcli[redis]'")]
    try:
        client: Any = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError as exc:
        return [Check(FAIL, "redis", f"bad --redis URL: {redact(str(exc), url)}", "use e.g. redis://host:6379/0")]
    shown = shown_url(url, "--redis URL")
    try:
        client.ping()
    except redis.RedisError as exc:
        return [Check(FAIL, shown, f"cannot reach Redis: {redact(str(exc), url)}",
                      "check the URL, password and that Redis runs")]
    try:
        client.eval("return 1", 0)
    except redis.RedisError as exc:
        return [Check(FAIL, shown, f"reachable, but EVAL fails: {redact(str(exc), url)}",
                      "allow EVAL/EVALSHA for this user (ACL +@scripting); the Redis barrier is a Lua script")]
    finally:
        client.close()
    return [Check(OK, shown, "reachable, scripting (EVAL) allowed")]


def run_doctor(url: str, args: argparse.Namespace, io: Io) -> int:
    """Run every check asked for, one line each; the exit code of :func:`doctor_exit_code`."""
    checks: list[Check] = []

    def report(found: list[Check]) -> None:
        for c in found:
            checks.append(c)
            if not args.json:
                io.out(c.line())
                io.stdout.flush()

    report(check_dtm(url, args.timeout))
    for db in args.db or ():
        report(check_db(db, args.table, args.xa, args.timeout))
    if args.redis:
        report(check_redis(args.redis, args.timeout))
    if args.json:
        io.out(to_json([{"status": c.status, "check": c.name, "detail": c.detail, "fix": c.fix} for c in checks]))
    return doctor_exit_code(checks)
