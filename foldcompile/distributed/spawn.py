"""Run a function on several local processes with a process group: for tests and for
users on one machine (under ``torchrun`` there is nothing to spawn: every rank already runs).

:func:`spawn` starts ``world_size`` processes, initializes ``torch.distributed`` in each
(gloo by default, a ``file://`` rendezvous in a fresh temporary folder, so parallel test
runs never collide on a port), calls ``fn(rank, *args)`` on every rank and returns the
ranks' results, in rank order, to the parent. :class:`Pool` keeps the processes (and their
process group) alive across calls, so a test suite pays the start-up (one torch import per
process) once per world size instead of once per test.

Nothing hangs silently. The process group has a timeout (``timeout_s``), so a rank stuck in
a collective that another rank skipped raises inside that rank; the parent also has its
own deadline, and notices a rank that died. Either way the parent raises
:class:`RankTimeoutError` (a ``TimeoutError``) naming the ranks; a rank that raised gives
:class:`RankError` with that rank's traceback. After a failure the pool's processes are
replaced on the next call (a process group that saw a failed collective is not reused).

``fn`` and ``args`` must be picklable (a module-level function); they are sent by value
(tensors are copied, not shared), and so are the results.

    >>> import torch
    >>> from foldcompile.distributed import spawn
    >>> from foldcompile.distributed.examples import total    # all_reduce(x * (rank + 1))
    >>> spawn(total, 2, torch.ones(2))
    [tensor([3., 3.]), tensor([3., 3.])]
"""
from __future__ import annotations

import os
import pickle
import queue as _queue
import shutil
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from multiprocessing import connection as mp_connection

__all__ = ["spawn", "Pool", "RankError", "RankTimeoutError"]

# A fork server that has imported torch once makes each rank a fork (~0.1 s) instead of a
# fresh interpreter importing torch (~1-5 s on a loaded 2-core machine).
_DEFAULT_START = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class RankError(RuntimeError):
    """A rank raised. ``rank`` is the first rank (lowest) that raised, ``remote_traceback``
    its traceback; ``errors`` maps every rank that raised to its one-line error."""

    def __init__(self, rank: int, message: str, remote_traceback: str, errors: dict[int, str]):
        others = "".join(f"\n  rank {r}: {m}" for r, m in sorted(errors.items()) if r != rank)
        super().__init__(f"rank {rank} raised {message}{others}\n--- rank {rank}'s traceback ---\n"
                         f"{remote_traceback}")
        self.rank, self.remote_traceback, self.errors = rank, remote_traceback, errors


class RankTimeoutError(TimeoutError):
    """A collective timed out in a rank, a rank did not finish in time, or a rank died.
    ``ranks`` are the ranks at fault (timed out, unfinished or dead)."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


# NVLink multicast stays off in the NCCL ranks this starts, as the project's multi-GPU
# machines require (a value the user set wins).
_NCCL_ENV_DEFAULTS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, TimeoutError) or (isinstance(e, RuntimeError) and
                                           ("timed out" in text or "timeout" in text))


def _worker(rank: int, world: int, backend: str, init_method: str, timeout_s: float, threads: int,
            tasks, results) -> None:
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            for var in _NCCL_ENV_DEFAULTS:  # multicast off unless the user says otherwise
                os.environ.setdefault(var, "1" if "DISABLE" in var else "0")
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((rank, -1, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    results.put((rank, -1, "ready", None, None))
    parent = mp.parent_process()
    while True:
        # wait for a task, or leave if the parent is gone (never linger as an orphan)
        ready = mp_connection.wait([tasks] + ([parent.sentinel] if parent is not None else []))
        if tasks not in ready:
            break
        try:
            msg = tasks.recv()
        except EOFError:  # the parent closed its end
            break
        if msg is None:
            break
        task_id, payload = msg
        try:
            fn, args = pickle.loads(payload)
            out = pickle.dumps(fn(rank, *args))
            results.put((rank, task_id, "ok", out, None))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            kind = "timeout" if _is_timeout(e) else "error"
            results.put((rank, task_id, kind, f"{type(e).__name__}: {e}", traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    """``world_size`` processes with an initialized process group, reused across :meth:`run`
    calls. Use as a context manager (or call :meth:`close`).

    ``timeout_s`` is the process group's timeout (a collective that does not complete in
    that time raises in its rank); ``threads_per_rank`` the torch intra-op threads of each
    rank; ``start_method`` ``"forkserver"`` (the default where available: the fork server
    imports torch once and each rank is a fork of it; this sets multiprocessing's
    fork-server preload list, which takes effect only if no fork server runs yet) or
    ``"spawn"`` (a fresh interpreter per rank).

        >>> from foldcompile.distributed import Pool
        >>> from foldcompile.distributed.examples import whoami  # (rank, world size)
        >>> with Pool(2) as pool:
        ...     pool.run(whoami)
        [(0, 2), (1, 2)]
    """

    def __init__(self, world_size: int, *, backend: str = "gloo", timeout_s: float = 60.0,
                 threads_per_rank: int = 1, start_method: str = _DEFAULT_START, start_timeout_s: float = 180.0):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Pool: world_size must be an int >= 1, got {world_size!r}")
        self.world_size, self.backend, self.timeout_s = world_size, backend, float(timeout_s)
        self.threads_per_rank, self.start_method = threads_per_rank, start_method
        self.start_timeout_s = start_timeout_s
        self._procs: list = []
        self._tasks: list = []
        self._results = None
        self._dir: Optional[str] = None
        self._next_task = 0
        self._start()

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            # the fork server imports these once; each rank is then a cheap fork of it
            ctx.set_forkserver_preload(["torch", "torch.distributed", "foldcompile.distributed"])
        self._dir = tempfile.mkdtemp(prefix="foldcompile-dist-")
        init = "file://" + os.path.join(self._dir, "rendezvous")
        self._results = ctx.Queue()
        pipes = [ctx.Pipe(duplex=False) for _ in range(self.world_size)]  # (reader, writer)
        self._tasks = [w for _, w in pipes]
        self._procs = [ctx.Process(target=_worker, daemon=True, name=f"foldcompile-rank{r}",
                                   args=(r, self.world_size, self.backend, init, self.timeout_s,
                                         self.threads_per_rank, pipes[r][0], self._results))
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        for reader, _ in pipes:
            reader.close()  # the ranks hold the reading ends
        ready: set[int] = set()
        deadline = time.monotonic() + self.start_timeout_s
        while len(ready) < self.world_size:
            try:
                rank, _tid, kind, msg, tb = self._results.get(timeout=0.2)
            except _queue.Empty:
                self._check_alive("starting the process group", ready)
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - ready)
                    self._kill()
                    raise RankTimeoutError(f"ranks {missing} did not join the process group within "
                                           f"{self.start_timeout_s:.0f} s", missing)
                continue
            if kind != "ready":
                self._kill()
                raise RankError(rank, msg, tb, {rank: msg})
            ready.add(rank)

    def _check_alive(self, doing: str, done: set[int]) -> None:
        dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if p.exitcode is not None and r not in done]
        if dead:
            self._kill()
            text = ", ".join(f"rank {r} died (exit code {c})" for r, c in dead)
            raise RankTimeoutError(f"{text} while {doing}; the other ranks were stopped", [r for r, _ in dead])

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)
        self._procs = []
        for q in self._tasks:
            q.close()
        self._tasks = []
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def close(self) -> None:
        """Stop the processes (politely: each destroys its process group)."""
        if not self._procs:
            return
        for q in self._tasks:
            try:
                q.send(None)
            except OSError:  # a rank that already exited
                pass
        for p in self._procs:
            p.join(timeout=10)
        self._kill()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; daemon processes also die with the parent
        try:
            self._kill()
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ running
    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: Optional[float] = None) -> list:
        """Call ``fn(rank, *args)`` on every rank; return the results in rank order.

        ``timeout_s``: the parent's deadline for this call (default: the process group's
        timeout plus 10 s, so a hung collective reports from inside its rank first).
        Raises :class:`RankError` if a rank raised, :class:`RankTimeoutError` if a
        collective timed out, a rank did not finish in time or a rank died.
        """
        try:
            payload = pickle.dumps((fn, args))
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"spawn: fn and its arguments must be picklable (a module-level "
                            f"function): {type(e).__name__}: {e}") from e
        if not self._procs:
            self._start()
        tid = self._next_task
        self._next_task += 1
        for q in self._tasks:
            try:
                q.send((tid, payload))
            except OSError:  # a rank died since the last call
                time.sleep(0.1)
                self._check_alive(f"sending {getattr(fn, '__qualname__', fn)}", set())
                raise
        limit = self.timeout_s + 10.0 if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + limit
        got: dict[int, tuple] = {}
        first_error_at: Optional[float] = None
        while len(got) < self.world_size:
            now = time.monotonic()
            # once a rank raised, the others get a short grace (they may be waiting on it)
            if first_error_at is not None and now > first_error_at + 2.0:
                break
            if now > deadline:
                break
            try:
                rank, t, kind, msg, tb = self._results.get(timeout=0.1)
            except _queue.Empty:
                self._check_alive(f"running {getattr(fn, '__qualname__', fn)}", set(got))
                continue
            if t != tid:
                continue
            got[rank] = (kind, msg, tb)
            if kind != "ok" and first_error_at is None:
                first_error_at = time.monotonic()
        return self._outcome(fn, got, limit)

    def _outcome(self, fn, got: dict[int, tuple], limit: float) -> list:
        name = getattr(fn, "__qualname__", repr(fn))
        missing = sorted(set(range(self.world_size)) - set(got))
        timeouts = sorted(r for r, (k, _, _) in got.items() if k == "timeout")
        errors = {r: m for r, (k, m, _) in got.items() if k == "error"}
        finished = sorted(r for r, (k, _, _) in got.items() if k == "ok")
        if not (missing or timeouts or errors):
            return [pickle.loads(got[r][1]) for r in range(self.world_size)]
        self._kill()  # the next run starts fresh processes
        if errors:
            r = min(errors)
            raise RankError(r, errors[r], got[r][2], errors)
        parts = []
        if timeouts:
            parts += [f"rank {r}: a collective timed out after {self.timeout_s:g} s ({got[r][1]})"
                      for r in timeouts]
        if missing:
            parts.append(f"ranks {missing} did not finish {name} within {limit:g} s")
        if finished:
            parts.append(f"ranks {finished} finished {name} (a rank that finished while others wait "
                         f"in a collective skipped it: the ranks disagree on the sequence of collectives)")
        raise RankTimeoutError(f"{name} on {self.world_size} ranks: " + "; ".join(parts),
                               timeouts + missing)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
          timeout_s: float = 60.0, threads_per_rank: int = 1, start_method: str = _DEFAULT_START) -> list:
    """Run ``fn(rank, *args)`` on ``world_size`` fresh processes with an initialized
    process group; return the results in rank order. See the module docstring (and
    :class:`Pool` to reuse the processes across calls).

        >>> from foldcompile.distributed import spawn
        >>> from foldcompile.distributed.examples import gather_rows  # shards [1, 2] gathered
        >>> spawn(gather_rows, 2)[0]
        tensor([[0., 0.],
                [1., 1.],
                [1., 1.]])
    """
    with Pool(world_size, backend=backend, timeout_s=timeout_s, threads_per_rank=threads_per_rank,
              start_method=start_method) as pool:
        return pool.run(fn, *args)
