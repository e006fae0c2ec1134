"""Writing outputs safely: never half-written under a final name, never overwritten without force."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from mann_edge.errors import OutputExistsError

__all__ = ["atomic_output", "staged_output", "check_writable_dir", "sha256_file", "size_of", "file_stems", "build_time"]


@contextlib.contextmanager
def atomic_output(path: "str | os.PathLike", *, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    ``directory=True`` yields a fresh directory (for Core ML packages). An existing
    ``path`` raises OutputExistsError unless ``force``.

    Example:
        >>> with atomic_output("model.mann") as tmp:
        ...     tmp.write_bytes(data)
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass force=True (--force) to overwrite it")
    check_writable_dir(path.parent)
    prefix = f".{path.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp make private (0600/0700) paths; outputs get the permissions of any new file.
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def staged_output(path: "str | os.PathLike", *, force: bool = False) -> Iterator[Path]:
    """Yields a free path beside ``path`` with its suffix, for a writer that makes a file or a directory there;
    when the block ends without error, what was made replaces ``path``; on any error (an interrupt too) it is removed.

    `mann_edge.convert` exports each format to such a path, verifies what is there, and only
    then lets it take its final name: a file under a final name has always been verified.
    An existing ``path`` raises OutputExistsError unless ``force``.

    Example:
        >>> with staged_output("out/model.tflite") as staging:   # out/.model.k3j2.partial.tflite
        ...     tflite.export(cm, staging)
        ...     tflite.validate(cm, staging).raise_for_errors()
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass force=True (--force) to overwrite it")
    check_writable_dir(path.parent)
    # mkdtemp reserves a unique name; the writer gets the path inside it, so the suffix is kept for it
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    staging = holder / path.name
    try:
        yield staging
        if not staging.exists():
            raise FileNotFoundError(f"{path}: the export wrote nothing at {staging}")
        _replace(staging, path)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _replace(made: Path, path: Path) -> None:
    """Moves ``made`` (a file or a directory) to ``path``, replacing what is there."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(made, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(made, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_dir(directory: "str | os.PathLike", *, create: bool = False) -> Path:
    """``directory`` as a Path if it is a writable directory (made when ``create``), else OSError saying why."""
    directory = Path(directory) if str(directory) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"Output directory {directory} is a file, not a directory")
    if not directory.exists():
        if not create:
            raise FileNotFoundError(f"Output directory {directory} does not exist")
        directory.mkdir(parents=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"Output directory {directory} is not writable")
    return directory


def size_of(path: "str | os.PathLike") -> int:
    """Bytes of a file, or of every file in a directory (a per-task export, a Core ML package).

    Example:
        >>> size_of("out/onnx")
        71150
    """
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def sha256_file(path: "str | os.PathLike") -> str:
    """Hex SHA-256 of a file, or of every file in a directory (sorted by relative path)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def file_stems(names: Iterable[str]) -> dict[str, str]:
    """Name -> a file stem for it: letters, digits, '-', '_' and '.' kept, the rest '_'.

    Stems that would clash get a numbered suffix, ignoring case too (macOS and Windows
    file systems do), so every task of an export gets its own file.

    Example:
        >>> file_stems(["digits", "a/b", "A/B"])
        {'digits': 'digits', 'a/b': 'a_b', 'A/B': 'A_B_2'}
    """
    result: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "task"
        candidate, count = stem, 1
        while candidate.lower() in taken:
            count += 1
            candidate = f"{stem}_{count}"
        taken.add(candidate.lower())
        result[name] = candidate
    return result


def build_time() -> datetime.datetime:
    """The time outputs are stamped with: ``SOURCE_DATE_EPOCH`` when set, else 1980-01-01 (the zip epoch).

    Never the current time, so converting the same source twice writes the same bytes
    (reproducible builds, https://reproducible-builds.org/specs/source-date-epoch/).

    Example:
        >>> os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
        >>> build_time().isoformat()
        '2023-11-14T22:13:20+00:00'
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        try:
            # zip timestamps cannot go before 1980
            return datetime.datetime.fromtimestamp(max(int(epoch), 315532800), datetime.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"SOURCE_DATE_EPOCH must be a number of seconds since 1970. Received: {epoch!r}") from None
    return datetime.datetime(1980, 1, 1, tzinfo=datetime.timezone.utc)
