"""Files emloc writes (memories, answers, plots): checked before any work, written atomically.

Rules, the same for the Python API and the command line:
- a destination is refused if it is empty, a folder, or one of the command's inputs (a demos or
  queries file, the memory read, a model file or a file inside the model folder);
- the folder it goes into must exist (nothing is created) and be writable, which is tested by
  creating and removing a file there before any work starts;
- the file is written to a temporary file beside it, flushed to disk, then renamed over the
  destination: a failure at any point (disk full, interrupted) leaves the old file untouched.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from emloc.errors import EMLoCError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_path(out, default_name: str | None = None) -> Path:
    """The file `out` names. On the command line (default_name given) a trailing separator or an
    existing folder means "into that folder", as `default_name`; without one, a folder is refused."""
    text = os.fspath(out) if isinstance(out, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise EMLoCError(f"an output path must be a string or a path, got {type(out).__name__}")
    if not text.strip():
        raise EMLoCError("the output path is empty: give a file name")
    path = Path(text)
    is_folder = text.endswith(("/", os.sep)) or path.is_dir()
    if is_folder:
        if default_name is None:
            raise EMLoCError(f"{text} is a folder: give the path of a file to write")
        path = path / default_name
        if path.is_dir():
            raise EMLoCError(f"{path} is a folder: give the path of a file to write")
    return path


def refuse_inputs(out: Path, inputs: dict) -> None:
    """Raise EMLoCError if `out` is one of `inputs` ({what: path or None}) or, for an input that
    is a folder (a model), a file inside it."""
    target = Path(os.path.realpath(out))
    for what, given in inputs.items():
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        inside = source.is_dir() and (target == source or source in target.parents)
        if inside or target == source or (out.exists() and Path(given).exists()
                                          and os.path.samefile(out, given)):
            raise EMLoCError(f"the output {out} would overwrite the {what} ({given}); write to "
                             "another file")


def check_writable(path: Path) -> None:
    """Raise EMLoCError unless a file can be created beside `path` (its folder exists and is
    writable): the check runs before any work, so a bad destination costs nothing."""
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise EMLoCError(f"cannot write {path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise EMLoCError(f"cannot write {path}: the folder {folder} does not exist (emloc does not "
                         "create folders; make it first)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EMLoCError(f"cannot write {path}: {exc.strerror or exc}") from None


def check_free_space(path: Path, nbytes: int, what: str) -> None:
    """Raise EMLoCError if the file system of path's folder has less than `nbytes` free for
    `what` (an upper bound of the file's size, checked before the work that produces it)."""
    free = shutil.disk_usage(path.parent).free
    if free < nbytes:
        raise EMLoCError(f"{path.parent} has {free / 2**20:.1f} MiB free; {what} may take up to "
                         f"{nbytes / 2**20:.1f} MiB: free some space or write elsewhere")


def prepare_output(out, inputs: dict | None = None, default_name: str | None = None) -> Path:
    """output_path + refuse_inputs + check_writable: the destination, checked before any work."""
    path = output_path(out, default_name)
    refuse_inputs(path, inputs or {})
    check_writable(path)
    return path


class _Writer:
    """The open temporary file of atomic_write; write() turns OS errors into EMLoCError."""

    def __init__(self, file, path: Path):
        self._file, self._path = file, path

    def write(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise _write_error(self._path, exc) from None


@contextlib.contextmanager
def atomic_write(path, binary: bool = False):
    """Yield a writer whose content replaces `path` only when the block ends without error.

    The temporary file lives in path's folder (same file system, so the rename is atomic); it is
    fsynced before the rename and gets the permissions a new file would (umask). Any failure
    removes it; OS errors surface as EMLoCError and the old file stays as it was.
    """
    path = output_path(path)
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    file = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
    try:
        try:
            yield _Writer(file, path)
        finally:
            file_error = _close(file, path)
        if file_error is not None:
            raise file_error
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_error(path: Path, exc: OSError) -> EMLoCError:
    return EMLoCError(f"could not write {path}: {exc.strerror or exc}; the previous file, if any, "
                      "is unchanged")


def _close(file, path: Path):
    """Flush, fsync and close `file` (the temporary file of `path`); the EMLoCError to raise if
    that failed, else None."""
    try:
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
    except OSError as exc:
        return _write_error(path, exc)
    return None
