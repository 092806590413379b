"""Files posefix reads and writes: JSON parsed with errors that name the file, outputs written atomically.

Needs the standard library only (orjson where installed), so both halves of posefix use it.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import json
import os
import tempfile
from pathlib import Path

from .errors import InputError

try:  # a faster parser and writer, where installed
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while millions of small acyclic objects (a parsed file, output
    lists) are made: else each collection it triggers walks every object alive, again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _loads(data: bytes):
    """json.loads, through orjson where it parses the text: the same values, except that orjson reads an
    integer beyond 64 bits as a float; what it refuses (NaN, Infinity, a BOM, text that is not UTF-8) the
    standard library parses or reports."""
    with gc_paused():
        if orjson is not None:
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                pass
        return json.loads(data)


def dumps_json(obj) -> bytes:
    """Compact JSON bytes of ``obj``, whose numbers must be finite (orjson would write NaN as null)."""
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def read_json(path: str | Path, what: str):
    """Parse a JSON file, turning every failure into an InputError naming the file."""
    try:
        with open(path, "rb") as f:
            return _loads(f.read())
    except FileNotFoundError:
        raise InputError(what, "file not found", str(path)) from None
    except IsADirectoryError:
        raise InputError(what, "is a directory, not a JSON file", str(path)) from None
    except OSError as e:
        raise InputError(what, f"cannot read: {e.strerror or e}", str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise InputError(what, f"not valid JSON{where}", str(path)) from None


TMP_SUFFIX = ".posefix-tmp"


def _remove_stale(path: Path) -> None:
    """Remove the temporary files (and directories) that writers of ``path`` left when they were killed: named
    ``.NAME.PID.*.posefix-tmp``, they are stale once process PID no longer runs."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        pid = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if stale.is_dir() and not stale.is_symlink():
                import shutil

                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        except (PermissionError, OSError):
            pass  # a live process of another user


def _umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it; else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on failure removed,
    so a reader sees the old file or the whole new one, never a partial one. A symbolic link is written through
    (its target replaced, the link kept)."""
    path = Path(path)
    if path.is_symlink():
        path = _real(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's file is 0600; the output gets a new file's usual mode
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON atomically (see :func:`atomic_path`)."""
    write_bytes_atomic(path, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _real(path: str | Path) -> Path:
    """``path`` with every symbolic link resolved (also for a file that does not exist yet)."""
    return Path(os.path.realpath(path))


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(inputs, outputs, trees=()) -> None:
    """Refuse, before anything is written, any output of a command that could replace or delete one of its
    inputs, however either is named (relative, ``..``, symbolic or hard links). ``inputs``: (field, path) of the
    files and directories the command reads (None: not given); ``outputs``: (field, path) of the files it
    writes; ``trees``: (field, path) of the directories it replaces whole. Refused: an output that is an input
    file (same real path, or the same inode), an output inside an input directory, an input inside a replaced
    directory (or the directory itself), and two outputs that are one file. An :class:`InputError` names the
    output's field and the input it would destroy."""
    given = [(field, _real(p), _inode(_real(p)), os.path.isdir(p)) for field, p in inputs if p is not None]
    seen: dict[Path, str] = {}
    for field, path, tree in [(f, p, False) for f, p in outputs if p is not None] + \
                             [(f, p, True) for f, p in trees if p is not None]:
        real, node = _real(path), _inode(_real(path))
        for in_field, in_real, in_node, is_dir in given:
            if real == in_real or (node is not None and node == in_node):
                how = "is the same file as"
            elif is_dir and _inside(real, in_real):
                how = "is inside"
            elif tree and _inside(in_real, real):
                how = "would replace a directory holding"
            else:
                continue
            raise InputError(field, f"{path} {how} the input {in_field} ({in_real}); refusing to overwrite an input")
        if real in seen:
            raise InputError(field, f"{path} is also given as {seen[real]}; refusing to overwrite it")
        seen[real] = field
