"""The child side of :mod:`ls_jax.s3ft.execution`: ``python -I _child.py CONFIG`` (standard library only).

Reads the program from stdin, sets the resource limits of ``CONFIG`` (JSON: ``{"limits": {name:
value}, "guard": bool}``), installs the guard when asked, then runs the program as ``__main__``.
The guard disables destructive, signalling and spawning calls, writing outside the working
directory and the socket and ctypes modules at the Python level: model code that reaches for
them fails, code that sets out to get around them can (the namespaces and the unprivileged user
that the parent may add are what the kernel enforces).
"""

import builtins
import io
import json
import os
import posix
import resource
import shutil
import subprocess
import sys

# functions that delete, rename, change owners or modes, signal, spawn, or leave the session / directory
DISABLED = {
    (os, posix): (
        "remove",
        "unlink",
        "rmdir",
        "removedirs",
        "rename",
        "renames",
        "replace",
        "truncate",
        "chmod",
        "lchmod",
        "chown",
        "lchown",
        "fchown",
        "link",
        "symlink",
        "mkfifo",
        "mknod",
        "kill",
        "killpg",
        "system",
        "popen",
        "fork",
        "forkpty",
        "execv",
        "execve",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "execvp",
        "execvpe",
        "spawnv",
        "spawnve",
        "spawnvp",
        "spawnvpe",
        "posix_spawn",
        "posix_spawnp",
        "setsid",
        "setpgid",
        "setpgrp",
        "setuid",
        "setgid",
        "chdir",
        "fchdir",
        "chroot",
    ),
    (shutil,): ("rmtree", "move", "chown"),
    (subprocess,): ("Popen",),
}
# modules that cannot be imported (None in sys.modules): the socket family, ctypes, raw process spawning
BLOCKED_MODULES = ("socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "_posixsubprocess", "multiprocessing")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _refused(name: str):
    """A stand-in for ``name`` that raises PermissionError."""

    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled while judging code")

    return refused


def guard(workdir: str) -> None:
    """Disable :data:`DISABLED` and :data:`BLOCKED_MODULES`; ``open`` / ``os.open`` may write only under ``workdir``.

    Args:
        workdir: the child's working directory (resolved).
    """
    for modules, names in DISABLED.items():
        for module in modules:
            for name in names:
                if hasattr(module, name):
                    setattr(module, name, _refused(f"{module.__name__}.{name}"))
    for name in BLOCKED_MODULES:
        sys.modules[name] = None

    def check(path, writes: bool) -> None:
        if not writes or isinstance(path, int):  # reading, or a descriptor already open
            return
        if not os.fsdecode(os.path.realpath(path)).startswith(workdir + os.sep):
            raise PermissionError(f"writing outside the working directory is disabled while judging code: {path}")

    real_open, real_os_open = io.open, posix.open

    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        check(path, bool(flags & _WRITE_FLAGS))
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open


def main() -> None:
    """Limits, guard, then the program from stdin as ``__main__`` (its exceptions end the process, status 1)."""
    config = json.loads(sys.argv[1])
    source = sys.stdin.read()
    sys.dont_write_bytecode = True
    for name, value in config["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if config["guard"]:
        guard(os.path.realpath(os.getcwd()))
    sys.argv = ["judge.py"]
    exec(compile(source, "judge.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})


if __name__ == "__main__":
    main()
