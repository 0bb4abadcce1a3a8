"""Make thread races show up in tests.

CPython only switches threads at a few points (calls, backward jumps), so a lock-free
read-modify-write such as ``self.n += 1; return self.n`` is never interrupted in practice and a
test that merely starts threads passes with or without the lock. :func:`race` starts its threads
together at a barrier and, inside the functions given in ``slow``, gives up the GIL before every
bytecode instruction, so any missing lock in them is hit on (nearly) every run.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from types import CodeType, FrameType, ModuleType
from typing import Any, Callable, Optional, TypeVar, Union

__all__ = ["race"]

T = TypeVar("T")


def _yielding_tracer(codes: frozenset[CodeType], files: frozenset[str]) -> Callable[[FrameType, str, Any], Any]:
    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            time.sleep(0)  # release the GIL: another thread runs between any two instructions
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code not in codes and frame.f_code.co_filename not in files:
            return None
        frame.f_trace_opcodes = True
        return local

    return tracer


def race(work: Callable[[], T], threads: int = 8, slow: Iterable[Union[Callable[..., Any], ModuleType]] = ()
         ) -> list[T]:
    """Run ``work`` in ``threads`` threads started together; return the results (errors re-raised).

    ``slow`` names the functions (or whole modules) whose instructions are interleaved.
    """
    slow = list(slow)
    codes = frozenset(f.__code__ for f in slow if not isinstance(f, ModuleType))  # type: ignore[union-attr]
    files = frozenset(str(m.__file__) for m in slow if isinstance(m, ModuleType))
    tracer = _yielding_tracer(codes, files)
    start = threading.Barrier(threads)
    results: list[T] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        result: Optional[T] = None
        sys.settrace(tracer)
        try:
            start.wait()
            result = work()
        except BaseException as exc:  # re-raised in the caller
            with lock:
                errors.append(exc)
            return
        finally:
            sys.settrace(None)
        with lock:
            results.append(result)  # type: ignore[arg-type]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        pool = [threading.Thread(target=run, name=f"race-{i}") for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]
    return results
