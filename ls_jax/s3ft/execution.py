"""Run model-written Python in a child process, isolated and limited as far as this machine allows.

The child (``python -I`` running :mod:`ls_jax.s3ft._child`, the program on its stdin) always gets
a fresh empty working directory (also its HOME and TMPDIR) that is removed afterwards, an
environment of its own (none of the parent's variables), the resource limits :data:`LIMITS`
(plus CPU seconds from the timeout), its output captured up to the file-size limit, a wall-clock
timeout after which its whole process group is killed, and the Python-level guard of
:mod:`ls_jax.s3ft._child` (destructive, signalling and spawning calls, writes outside the working
directory, sockets and ctypes disabled). Where the platform permits it also gets, found once by
:func:`best_isolation`:

* new network and PID namespaces (``unshare``, as root or through a user namespace): no network
  at all, and every process it starts dies with it;
* when the parent is root, the unprivileged user ``nobody`` (``setpriv --no-new-privs``), so the
  kernel refuses its writes to the parent's files, its signals to the parent and, through
  RLIMIT_NPROC (which root ignores), its fork bombs; it keeps CAP_DAC_READ_SEARCH (reading any file)
  only where the interpreter itself is not readable otherwise.

This is a guard for the mistakes of a model, not a sandbox: the child may read what its user may
read, and code written to get around the Python-level guard can, where the kernel does not stop it.
"""

import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")
NOBODY = 65534  # uid and gid of the unprivileged user
# per process of the child: address space, file size (so also its output), open files, processes of the
# user (binding only for a user other than root), no core dumps
LIMITS = {"RLIMIT_AS": 1 << 30, "RLIMIT_FSIZE": 1 << 20, "RLIMIT_NOFILE": 64, "RLIMIT_NPROC": 32, "RLIMIT_CORE": 0}
NAMESPACES = (
    ("unshare", "--net", "--pid", "--fork", "--kill-child"),
    ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"),
)
DROP = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs", "--inh-caps=-all")
DROP_READING = DROP[:-1] + ("--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search")
# what a candidate isolation must run: this interpreter (not another one found instead), its standard library
PROBE = f"import json, sys\nassert sys.version == {sys.version!r} and json.loads('[1]') == [1]\n"


@dataclass(frozen=True)
class Isolation:
    """How the child is started: a namespaces command, a user-dropping command, the Python guard."""

    namespaces: tuple[str, ...] = ()
    user: tuple[str, ...] = ()
    guard: bool = True

    def describe(self) -> str:
        """One line naming the protections (for the S3FT notes and the tests' report)."""
        net = "network and PID namespaces" if self.namespaces else "no namespaces (sockets blocked in Python only)"
        who = {(): "the parent's user", DROP: "user nobody", DROP_READING: "user nobody (reading any file)"}[self.user]
        guard = ", Python guard" if self.guard else ""
        return f"{net}, {who}, resource limits, empty working directory, minimal environment{guard}"


@dataclass(frozen=True)
class Outcome:
    """How a run ended: ``passed`` (exit status 0 in time), the status (negative: killed by that
    signal), whether the timeout ended it, and its stdout + stderr (at most ``RLIMIT_FSIZE`` bytes)."""

    passed: bool
    returncode: int
    timed_out: bool
    output: str


def run(source: str, timeout: float, isolation: Isolation | None = None) -> Outcome:
    """Run the Python program ``source`` in an isolated, limited child (see the module doc).

    Args:
        source: the program (model code and its tests).
        timeout: wall-clock seconds; also the CPU-seconds limit (rounded up).
        isolation: how to start the child; default :func:`best_isolation`.

    Returns:
        The :class:`Outcome`; a crash, a limit hit or the timeout is a failed outcome, never an exception.
    """
    isolation = isolation or best_isolation()
    config = {"limits": {**LIMITS, "RLIMIT_CPU": max(1, math.ceil(timeout))}, "guard": isolation.guard}
    command = [*isolation.namespaces, *isolation.user, sys.executable, "-I", CHILD, json.dumps(config)]
    with (
        tempfile.TemporaryDirectory(prefix="ls_jax-judge-") as work,
        tempfile.TemporaryFile() as program,
        tempfile.TemporaryFile() as output,
    ):
        program.write(source.encode("utf-8"))
        program.seek(0)
        if isolation.user:
            os.chown(work, NOBODY, NOBODY)
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            command, cwd=work, env=env, stdin=program, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline, timed_out = time.monotonic() + timeout, False
        try:  # wait without reaping, so that the group id stays the child's until the group is killed
            while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.01)
        finally:  # also ends whatever the program left running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        output.seek(0)
        text = output.read(LIMITS["RLIMIT_FSIZE"]).decode("utf-8", errors="replace")
    return Outcome(returncode == 0 and not timed_out, returncode, timed_out, text)


@functools.cache
def best_isolation() -> Isolation:
    """The strongest :class:`Isolation` under which :data:`PROBE` passes here, tried once per process.

    Returns:
        Namespaces if ``unshare`` works (directly, else through a user namespace), the user
        ``nobody`` if the parent is root and ``setpriv`` works (with CAP_DAC_READ_SEARCH only if
        needed), and the Python guard always.

    Raises:
        RuntimeError: when not even a plain child passes the probe.
    """
    users = (DROP, DROP_READING, ()) if os.geteuid() == 0 else ((),)
    for namespaces, user in itertools.product((*NAMESPACES, ()), users):
        tools_found = all(shutil.which(c[0], path=os.defpath) for c in (namespaces, user) if c)
        if tools_found and (outcome := run(PROBE, 10.0, Isolation(namespaces, user))).passed:
            return Isolation(namespaces, user)
    raise RuntimeError(f"cannot run Python code in a child process here: {outcome.output[-500:]}")
