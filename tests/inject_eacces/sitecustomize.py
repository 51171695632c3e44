"""Test-only fault injection for subprocesses: put this folder on PYTHONPATH and list paths in
VLM_TEST_EACCES (os.pathsep-separated); os.open on exactly those paths then fails with EACCES, in
the CLI process and in the worker processes it spawns (they inherit the environment).

A file chmod'ed to 000 is readable by root, so a permission test built that way only runs for
normal users; this makes the same failure reach the same code path under any user (CI runs as
root). Nothing outside the test suite puts this folder on a path.
"""

import errno
import os

_PATHS = frozenset(p for p in os.environ.get("VLM_TEST_EACCES", "").split(os.pathsep) if p)

if _PATHS:
    _real_open = os.open

    def _open(path, flags, mode=0o777, *, dir_fd=None):
        if os.fspath(path) in _PATHS:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return _real_open(path, flags, mode, dir_fd=dir_fd)

    os.open = _open
