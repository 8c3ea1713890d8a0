"""The command line's output directory: checked before compute, locked for one run, filled in a staging directory
and put in place with one rename.

Rules (README "Command line", docs/ROBUSTNESS.md):
* The output directory may not be, or hold, any input (an input file, or a DICOM folder); it may not lie inside
  an input folder. It must be a directory or not exist.
* A directory that is not empty is refused unless `overwrite`; then it is replaced as a whole, and only when
  everything in it is something a run writes (`known` names, plain files): a run never leaves files of an earlier
  run beside its own, and never deletes anything else.
* One run at a time per output directory: `.<name>.deepregistration-staging/` beside it is created by the run and
  holds its lock file (`lock`, an OS file lock held while the run lives) and the outputs being written
  (`result/`). Success renames `result/` onto the output directory (one rename; an earlier set it replaces is
  swapped out in the same step where the OS can, `renameat2(RENAME_EXCHANGE)`), then removes the staging directory.
  A run killed outright (SIGKILL, power loss) leaves only the staging directory; the next run into the same
  directory finds its lock free and clears it. A live run's lock makes a second run fail at once (ResourceError).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..core.errors import InputError, ResourceError

STAGING_SUFFIX = ".deepregistration-staging"
LOCK_NAME = "lock"
RESULT_NAME = "result"


def staging_path(out_dir: Path) -> Path:
    """The staging directory of `out_dir`: `.<name>.deepregistration-staging` beside it."""
    return out_dir.parent / f".{out_dir.name}{STAGING_SUFFIX}"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_inputs(out_dir: Path, inputs: dict[str, str | os.PathLike | None]) -> None:
    """InputError when the output directory is, holds or lies inside one of `inputs` (label → path)."""
    out_real = _real(out_dir)
    for label, value in inputs.items():
        if value is None:
            continue
        path = Path(value)
        if not path.exists():
            continue
        real = _real(path)
        if real == out_real:
            raise InputError(f"{out_dir}: the output directory is the input {label} {value}; choose another one")
        if out_real in real.parents:
            raise InputError(f"{out_dir}: the output directory holds the input {label} {value}; writing there would "
                             "replace or mix with it; choose another output directory")
        if real.is_dir() and real in out_real.parents:
            raise InputError(f"{out_dir}: the output directory lies inside the input folder {label} {value}; "
                             "inputs are never changed, choose an output directory elsewhere")


def writable(path: Path) -> bool:
    """Whether this process (its effective user) may create entries in directory `path`."""
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK | os.X_OK, effective_ids=effective)


def _os_error(exc: OSError, what: str) -> Exception:
    """An OSError while preparing or committing outputs as an InputError (a path the user chose: permissions,
    read-only file system, not a directory) or a ResourceError (disk full, quota, too many files)."""
    reason = exc.strerror or str(exc)
    where = exc.filename or what
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO):
        return ResourceError(f"{where}: {reason} (while {what})")
    return InputError(f"{where}: {reason} (while {what})")


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on open file `fd` without waiting; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back (delivered afterwards) while the finished set is put in place."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class OutputDirectory:
    """`with OutputDirectory(out, inputs, overwrite, known) as result_dir:` write the outputs into `result_dir`;
    they replace `out` when the block succeeds and vanish when it fails (see the module docstring).

    Every check runs on entry, before any compute: inputs (`check_inputs`), the kind of path, the lock, the
    emptiness rule. `committed` turns True once the outputs are in place.
    """

    def __init__(self, out_dir: str | os.PathLike, inputs: dict[str, str | os.PathLike | None] | None = None,
                 overwrite: bool = False, known: Iterable[str] = ()) -> None:
        given = Path(out_dir)
        self.given = given
        self.out = _real(given) if given.is_symlink() else Path(os.path.abspath(given))
        self.inputs = inputs or {}
        self.overwrite = overwrite
        self.known = set(known)
        self.staging = staging_path(self.out)
        self.result = self.staging / RESULT_NAME
        self.committed = False
        self._fd: int | None = None
        self._made: list[Path] = []  # parent folders this run created (removed again when it fails)

    # ------------------------------------------------------------------------------------------------- checks

    def foreign_entries(self) -> list[str]:
        """Names in the output directory that no run writes (or that are not plain files)."""
        return sorted(p.name for p in self.out.iterdir()
                      if p.name not in self.known or p.is_symlink() or not p.is_file())

    def _check_target(self) -> None:
        if self.out.parent == self.out:
            raise InputError(f"{self.given}: choose a directory below the file-system root")
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.given}: exists and is not a directory")
        if self.out.is_dir():
            entries = list(self.out.iterdir())
            if entries and not self.overwrite:
                raise InputError(f"{self.given}: the output directory is not empty ({len(entries)} entries); pass "
                                 "--overwrite to replace the registration outputs in it, or choose a new directory")
            if entries:
                foreign = self.foreign_entries()
                if foreign:
                    raise InputError(f"{self.given}: holds {', '.join(foreign[:5])}"
                                     f"{' …' if len(foreign) > 5 else ''}, not outputs of a registration; it is "
                                     "never replaced: choose another output directory")
            if not writable(self.out):
                raise InputError(f"{self.given}: the output directory is not writable")

    def _acquire(self) -> None:
        """Create (or take over from a dead run) the staging directory and hold its lock."""
        existing = self.out.parent
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise InputError(f"{self.given}: {existing} is a file, not a folder")
        missing = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._made.append(folder)
        except OSError as exc:
            raise _os_error(exc, f"creating the parent folder of {self.given}") from None
        if not writable(self.out.parent):
            raise InputError(f"{self.out.parent}: not writable; the outputs of {self.given} are staged beside it")
        for _ in range(20):
            try:
                self.staging.mkdir()
            except FileExistsError:
                pass
            except OSError as exc:
                raise _os_error(exc, f"staging the outputs of {self.given}") from None
            lock = self.staging / LOCK_NAME
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the staging directory vanished (its run just finished): try again
                continue
            except OSError as exc:
                raise _os_error(exc, f"locking {self.given}") from None
            if not _try_lock(fd):
                os.close(fd)
                holder = _read_pid(lock)
                raise ResourceError(f"{self.given}: another deepregistration run{holder} is writing into this "
                                    "output directory; wait for it to finish or choose another directory")
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its run removed as it finished
                os.close(fd)
                continue
            self._fd = fd
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            for item in self.staging.iterdir():  # what a killed run left
                if item.name != LOCK_NAME:
                    _remove(item)
            return
        raise ResourceError(f"{self.given}: could not lock the output directory (other runs keep finishing)")

    # --------------------------------------------------------------------------------------- context manager

    def __enter__(self) -> Path:
        check_inputs(self.given, self.inputs)
        self._check_target()
        try:
            with _signals_held():  # a signal now would leave a staging folder without its lock
                self._acquire()
            self._check_target()  # again, under the lock
            self.result.mkdir()
        except BaseException:
            self._release()
            raise
        return self.result

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._release()

    def _commit(self) -> None:
        with _signals_held():
            try:
                if self.out.is_dir() and any(self.out.iterdir()):
                    foreign = self.foreign_entries()
                    if foreign:
                        raise InputError(f"{self.given}: {', '.join(foreign[:5])} appeared while the run wrote; "
                                         "nothing was replaced")
                    if not _exchange(self.result, self.out):
                        os.rename(self.out, self.staging / "replaced")
                        os.rename(self.result, self.out)
                else:
                    try:
                        os.rename(self.result, self.out)  # replaces an empty directory on POSIX
                    except OSError:
                        if not self.out.is_dir():
                            raise
                        self.out.rmdir()  # Windows: rename does not replace a directory
                        os.rename(self.result, self.out)
            except OSError as exc:
                raise _os_error(exc, f"putting the outputs in place in {self.given}") from None
            self.committed = True

    def _release(self) -> None:
        with _signals_held():
            if self._fd is None:
                self._remove_made()
                return
            try:
                for item in self.staging.iterdir():
                    if item.name != LOCK_NAME:
                        _remove(item)
                if os.name != "nt":
                    (self.staging / LOCK_NAME).unlink(missing_ok=True)
            finally:
                os.close(self._fd)
                self._fd = None
            if os.name == "nt":
                (self.staging / LOCK_NAME).unlink(missing_ok=True)
            try:
                self.staging.rmdir()
            except OSError:
                pass
            self._remove_made()

    def _remove_made(self) -> None:
        """The parent folders this run created, when it put nothing in place (deepest first, if still empty)."""
        if self.committed:
            return
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _read_pid(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
