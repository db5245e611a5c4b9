"""Put a directory in place in one step, leaving no litter however the writer ends.

    with staged(out, check) as tmp:   # .OUT.tmp-XXXX beside out, locked while it is written
        fill(tmp)
    # then, in one rename: out holds the new directory; the old one is removed

Readers of `out` see the old directory or the new one, never neither: on Linux the two are
swapped by one renameat2(RENAME_EXCHANGE) (where the call or the filesystem lacks it, two
renames, with `out` briefly absent between them). SIGTERM and SIGINT while `tmp` is filled end the
write (Interrupted, or whatever the handler the caller had installed raises) and `tmp` is removed;
during the swap and the removal of the old copy they wait for both to finish. A writer that is
killed (SIGKILL, power loss) leaves its `.OUT.tmp-*` directory, unlocked: the next `staged(out)`
removes every one that no live writer holds (flock on the directory).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import glob
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from planc.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
KEPT = "{out} left as it was; the partial copy removed"
REPLACED = "{out} holds the new copy, complete (the signal came as it was swapped in)"  # and the old one removed
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


@contextmanager
def staged(out: Path, check_replaceable: Callable[[Path], None]) -> Iterator[Path]:
    """A fresh directory beside `out` to fill; when the block ends normally it replaces `out`,
    after `check_replaceable(out)` (which raises to refuse) when `out` exists."""
    remove_leftovers(out)
    with _Interrupts(out) as interrupts:
        tmp, lock = _new_tmp(out)
        try:
            yield tmp
            with interrupts.deferred():
                _swap_in(tmp, out, check_replaceable)
                interrupts.outcome = REPLACED.format(out=out)
                shutil.rmtree(tmp, ignore_errors=True)  # after the swap: the old copy
        except BaseException:
            with interrupts.deferred():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(lock)


def leftovers(out: Path) -> list[Path]:
    """Temporary directories of writers of `out` (and of planc before atomic swaps: .OUT.old-*)."""
    name = glob.escape(out.name)
    return sorted(p for pattern in (f".{name}.tmp-*", f".{name}.old-*") for p in out.parent.glob(pattern)
                  if p.is_dir() and not p.is_symlink())


def remove_leftovers(out: Path) -> None:
    """Remove the temporary directories of killed writers; skip those a live writer holds."""
    for path in leftovers(out):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
        except BlockingIOError:
            pass  # a compile of the same output is writing it now
        finally:
            os.close(fd)


def _new_tmp(out: Path) -> tuple[Path, int]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the directory is meant to be shared
    lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel however this process ends
    return tmp, lock


def _swap_in(tmp: Path, out: Path, check_replaceable: Callable[[Path], None]) -> None:
    """Afterwards `out` is the new directory and `tmp` the old one (or nothing)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    check_replaceable(out)
    if not _exchange(tmp, out):
        parked = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.replace(out, parked / "old")  # no exchange: `out` is absent until the next line
        os.replace(tmp, out)
        os.replace(parked, tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the kernel, libc or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28, musl >= 1.2.5


class _Interrupts:
    """SIGTERM and SIGINT unwind the write, except inside `deferred()`, whose end they wait for.

    A handler someone installed before (planc's CLI has one) runs as it would have; where there
    was none, Python's defaults (dying, KeyboardInterrupt) become Interrupted saying `outcome`. Only
    the main thread can take signals; elsewhere this changes nothing."""

    def __init__(self, out: Path):
        self.outcome = KEPT.format(out=out)
        self.pending: int | None = None
        self.deferring = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT under nohup
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.deferring:
            self.pending = signum
        else:
            self._unwind(signum, frame)

    def _unwind(self, signum: int, frame) -> None:
        previous = self.previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)
        raise Interrupted(signum, self.outcome)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals wait until the block ends."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        signum, self.pending = self.pending, None
        if signum is not None:
            self._unwind(signum, None)


def replace_file(out: str | Path, data: str | bytes) -> Path:
    """A file's counterpart of `staged`: DATA written to a temp file beside OUT, then renamed over
    it, so a reader finds the old file or the whole new one; a failed write leaves no temp file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
