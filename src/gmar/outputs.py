"""Where the front ends write files: never over an input, never over a file gmar did not write.

Each folder gmar writes into holds ``.gmar-outputs.json``, the name, size and modification time of
every file gmar wrote there. An existing file is replaced only when it is listed there and still has
the listed size and time, so running a command again replaces its own outputs and nothing else. A
name that is taken (by an input of this run, by a file gmar did not write, or by another output of
this run) is either given a numbered suffix, with one line on stderr, or refused with a
:class:`~gmar.errors.GmarError`.

How a file is written, so that no link planted in the folder is ever followed and no truncated file
keeps a final name:

1. the writer writes a new temporary file, ``.gmar-tmp-XXXX.EXT``, created exclusively (``O_EXCL``)
   in the target folder; it is flushed to disk (``fsync``);
2. with the folder locked (``flock`` on the folder, shared by concurrent runs), it is published:
   a free name with :func:`os.link` (which fails rather than replace anything that appeared since),
   one of gmar's listed files with :func:`os.rename` after an ``lstat`` shows it is still that
   regular file (rename replaces the name, it never writes through a link). Anything else at the
   name is left alone: the output takes the next numbered name, or a fixed name is refused;
3. one JSON line, ``{"name", "size", "mtime_ns"}``, is appended to ``.gmar-outputs.journal``;
   the journal is folded into ``.gmar-outputs.json`` (written whole and renamed into place) when
   the folder is closed, and read together with it until then, so concurrent runs list each
   other's files and each file costs one line, whatever the folder's size.

A failed write (full disk, an error in the writer, Ctrl-C) removes its temporary file; the final
name is never created or changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from gmar.errors import GmarError

try:  # POSIX; elsewhere concurrent runs are not coordinated, one run is still safe
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: The list of files gmar wrote in a folder, kept in that folder.
MANIFEST = ".gmar-outputs.json"
#: Files written since the list was last rewritten, one JSON line each.
JOURNAL = ".gmar-outputs.journal"
#: Locked (``flock``) while a file is published or the list rewritten, where the folder itself cannot be.
LOCK = ".gmar-outputs.lock"
#: How the names of files being written begin.
TEMPORARY = ".gmar-tmp-"
#: Room kept in a shortened name for a numbering ("-2" ... "-99999").
_NUMBERING = 6
_LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


class OutputError(GmarError, OSError):
    """One output file could not be written (full disk, a name the file system refuses...)."""


class OutputFolder:
    """The folder one command writes into.

    Args:
        folder: where to write; created on the first write.
        inputs: the files this run reads; none of them is ever written.
        option: the command-line option that named ``folder``, for messages.

    Use it as a context manager, or call :meth:`close`, to fold this run's journal into the list
    (it is also folded when the object is garbage-collected or the interpreter exits).
    """

    def __init__(self, folder: str | Path, inputs: Iterable[Path] = (), option: str = "--out") -> None:
        self.folder = Path(folder)
        self.option = option
        if self.folder.exists() and not self.folder.is_dir():
            raise GmarError(f"{option} {self.folder} is a file, not a folder: name a folder (it is created if missing)")
        self._input_paths: set[str] = set()
        self._input_files: set[tuple[int, int]] = set()
        for path in inputs:
            self._input_paths.add(os.path.realpath(path))
            identity = _identity(Path(path))
            if identity is not None:
                self._input_files.add(identity)
        self._ledger = _Ledger(self.folder)
        self._finalizer: weakref.finalize | None = None
        self._claimed: set[str] = set()
        # name -> the (device, inode, size, mtime) of gmar's file there when it was claimed, None if free
        self._expected: dict[str, tuple[int, int, int, int] | None] = {}
        # name -> (base before numbering, suffix, source) for names claimed with reserve()
        self._numbered: dict[str, tuple[str, str, str | Path]] = {}
        self._name_max: int | None = None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Fold the journal into ``.gmar-outputs.json``; the folder can still be written after."""
        self._ledger.close()

    @property
    def _listed(self) -> dict[str, dict[str, int]]:
        return self._ledger.listed

    def taken(self, name: str) -> str | None:
        """Why ``name`` cannot be written in this folder now, or None when it can."""
        return self._inspect(name)[0]

    def _inspect(self, name: str) -> tuple[str | None, tuple[int, int, int, int] | None]:
        """Why ``name`` is taken (None if it is not) and the identity of gmar's file there, if any."""
        path = self.folder / name
        if name in self._claimed:
            return "is another output of this run", None
        if name.startswith(".gmar-outputs"):
            return "is gmar's list of outputs", None
        if name.startswith(TEMPORARY):
            return "is a file gmar is writing", None
        if os.path.realpath(path) in self._input_paths or _identity(path) in self._input_files:
            return "is an input of this run", None
        try:
            info = path.lstat()
        except OSError:
            return None, None
        if name not in self._ledger.listed and stat.S_ISREG(info.st_mode):
            self._ledger.refresh()  # perhaps written by a concurrent run since this one began
        if _matches(info, self._ledger.listed.get(name)):
            return None, (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        return _foreign(info), None

    def reserve(self, base: str, suffixes: Sequence[str], source: str | Path) -> str:
        """Claim the names ``base + suffix`` for the outputs of one input, ``source``.

        Returns ``base``, or ``base-2``, ``base-3``... when one of the names is taken; a renaming is
        reported on one line of stderr. A ``base`` that would make a name longer than the file
        system allows is shortened first, to a prefix and a hash of the whole name (the same on
        every run), also on one line.
        """
        base = self._fit(base, suffixes, source)
        candidate, number, first = base, 1, None
        while True:
            found = [(candidate + s, self._inspect(candidate + s)) for s in suffixes]
            reasons = [(name, why) for name, (why, _) in found if why]
            if not reasons:
                break
            first = first or reasons[0]
            number += 1
            candidate = f"{base}-{number}"
        for suffix, (name, (_, identity)) in zip(suffixes, found, strict=True):
            self._claimed.add(name)
            self._expected[name] = identity
            self._numbered[name] = (base, suffix, source)
        if first is not None:
            name, why = first
            print(f"gmar: {source}: outputs named {candidate}, as {self.folder / name} {why}", file=sys.stderr)
        return candidate

    def check(self, names: Iterable[str]) -> None:
        """Claim fixed ``names``, or raise :class:`GmarError` naming the first one that is taken."""
        names = list(names)
        found = {}
        for name in names:
            why, identity = self._inspect(name)
            if why is not None:
                raise GmarError(
                    f"{self.folder / name} {why}; gmar leaves it alone: move it away or use another {self.option}"
                )
            found[name] = identity
        self._claimed.update(names)
        self._expected.update(found)

    def write(self, name: str, writer: Callable[[Path], object]) -> Path:
        """Write ``name`` with ``writer(path)`` and list it as gmar's; return where it was written.

        ``writer`` writes a temporary file in the folder (its name ends like ``name``, so that
        ``savefig`` and ``np.save`` pick the format from it), which replaces nothing until it is
        whole. Raises :class:`GmarError` if ``name`` is taken (unless claimed before with
        :meth:`reserve` or :meth:`check`), and :class:`OutputError` if it cannot be written; a name
        claimed with :meth:`reserve` that was taken since is written under the next numbered name.
        """
        if name not in self._claimed:
            self.check([name])
        path = self.folder / name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise GmarError(f"cannot create {self.folder}: {_reason(error)}; use another {self.option}") from None
        try:
            temporary = _create_temporary(self.folder, name)
        except OSError as error:
            raise OutputError(f"cannot write {path}: {_reason(error)}") from None
        published = False  # once True, the temporary name is gone (linked and removed, or renamed)
        try:
            writer(temporary)
            info = _sync(temporary)
            with self._ledger.locked():
                final = self._publish(temporary, name)
                published = True
                try:
                    self._ledger.append(final.name, info)
                except OSError:
                    _unlink_if(final, info)  # a file nobody lists would never be replaced again
                    raise
        except OSError as error:
            raise OutputError(f"cannot write {path}: {_reason(error)}") from None
        finally:
            if not published:
                _unlink_if(temporary)
        if self._finalizer is None:
            self._finalizer = weakref.finalize(self, self._ledger.close_quietly)
        return final

    def _publish(self, temporary: Path, name: str) -> Path:
        """Give ``temporary`` the name ``name`` (or, when it is taken since, the next numbered one).

        Returns the final path; ``temporary``'s name is gone then. Called with the folder locked.
        """
        why = self._try_publish(temporary, name)
        if why is None:
            return self.folder / name
        if name not in self._numbered:
            raise GmarError(
                f"{self.folder / name} {why}; gmar leaves it alone: move it away or use another {self.option}"
            )
        base, suffix, source = self._numbered[name]
        for number in range(2, 100_000):
            candidate = f"{base}-{number}{suffix}"
            if candidate in self._claimed or os.path.lexists(self.folder / candidate):
                continue
            if _link(temporary, self.folder / candidate):
                self._claimed.add(candidate)
                where = self.folder / name
                print(f"gmar: {source}: {name} written as {candidate}, as {where} {why} since", file=sys.stderr)
                return self.folder / candidate
        raise GmarError(f"{self.folder / name} {why}, and so are its numbered names; use another {self.option}")

    def _try_publish(self, temporary: Path, name: str) -> str | None:
        """Put ``temporary`` at ``name`` if that is free or still gmar's own file; else why not."""
        final = self.folder / name
        try:
            current = final.lstat()
        except FileNotFoundError:
            current = None
        if current is None:
            if _link(temporary, final):
                return None
            current = final.lstat()
        expected = self._expected.get(name)
        identity = (current.st_dev, current.st_ino, current.st_size, current.st_mtime_ns)
        if stat.S_ISREG(current.st_mode) and expected is not None and identity == expected:
            os.rename(temporary, final)
            return None
        # Not what this run reserved, but gmar's file: a concurrent run wrote it since (this run may
        # have read that run's line already, for another name). A rename replaces the name only.
        self._ledger.refresh()
        if _matches(current, self._ledger.listed.get(name)):
            os.rename(temporary, final)
            return None
        return _foreign(current)

    def _fit(self, base: str, suffixes: Sequence[str], source: str | Path) -> str:
        """``base``, or a shorter name when ``base + suffix`` plus a numbering would exceed the limit."""
        if self._name_max is None:
            self._name_max = _name_max(self.folder)
        longest = max(suffixes, key=lambda s: len(_bytes(s)), default="")
        room = self._name_max - len(_bytes(longest)) - _NUMBERING
        if len(_bytes(base)) <= room:
            return base
        digest = "~" + hashlib.sha256(_bytes(base)).hexdigest()[:10]
        prefix = _bytes(base)[: max(room - len(digest), 1)]
        short = prefix.decode("utf-8", "ignore") + digest
        print(
            f"gmar: {source}: outputs named {short}, as {base}{longest} would exceed the file system's "
            f"{self._name_max}-byte name limit",
            file=sys.stderr,
        )
        return short


class _Ledger:
    """A folder's list of gmar's files: ``.gmar-outputs.json`` plus the journal of files since.

    ``listed`` holds what this process knows (name -> ``{"size", "mtime_ns"}``); :meth:`refresh`
    reads what concurrent runs appended since, at a cost of the lines they added.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock_fd: int | None = None
        self._depth = 0
        self._dirty = False
        self.listed, self._seen = _load(folder)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (re-entrant within this object); the folder must exist."""
        if self._depth == 0 and fcntl is not None:
            if self._lock_fd is None:
                self._lock_fd = _lock(self.folder)
            else:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and fcntl is not None and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def refresh(self) -> None:
        """Catch up with what concurrent runs listed since this object last looked."""
        if not self.folder.is_dir():
            return
        try:
            with self.locked():
                self._catch_up()
        except OSError:
            pass  # an unreadable list: unknown files stay foreign, the safe side

    def _catch_up(self) -> None:
        manifest_key = _key(self.folder / MANIFEST)
        journal_key, offset = self._seen[1], self._seen[2]
        try:
            handle = open(self.folder / JOURNAL, "rb", opener=_no_follow)
        except FileNotFoundError:
            handle = None
        current = None if handle is None else _file_of(os.fstat(handle.fileno()))
        folded = manifest_key != self._seen[0] or (journal_key is not None and current != journal_key)
        if folded or (current is not None and os.fstat(handle.fileno()).st_size < offset):
            self.listed, offset = _read_list(self.folder / MANIFEST), 0
        if handle is not None:
            with handle:
                handle.seek(offset)
                offset += _apply(handle.read(), self.listed)
        self._seen = (manifest_key, current, offset)

    def append(self, name: str, info: os.stat_result) -> None:
        """List ``name`` (size and time from ``info``): one line on the journal. Called locked."""
        entry = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
        line = (json.dumps({"name": name, **entry}, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.folder / JOURNAL, flags, 0o666)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self.listed[name] = entry
        self._dirty = True

    def close(self) -> None:
        """Fold the journal into the list: entries of files that no longer exist are dropped."""
        if self._dirty and self.folder.is_dir():
            try:
                with self.locked():
                    self._catch_up()
                    if os.path.lexists(self.folder / JOURNAL):
                        listed = {n: v for n, v in sorted(self.listed.items()) if os.path.lexists(self.folder / n)}
                        _write_list(self.folder, listed)
                        os.unlink(self.folder / JOURNAL)
                        self.listed = listed
                        self._seen = (_key(self.folder / MANIFEST), None, 0)
            except OSError as error:
                raise OutputError(f"cannot update {self.folder / MANIFEST}: {_reason(error)}") from None
            self._dirty = False
        if self._lock_fd is not None and self._depth == 0:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close_quietly(self) -> None:
        """:meth:`close` at garbage collection or exit: the journal stays readable if it fails."""
        try:
            self.close()
        except (GmarError, OSError):
            pass


def read_manifest(folder: Path) -> dict[str, dict[str, int]]:
    """The files gmar listed as written in ``folder``: name -> ``{"size", "mtime_ns"}`` (empty if none).

    Reads ``.gmar-outputs.json`` and the journal of files written since; needs no lock.
    """
    return _load(Path(folder))[0]


def previous_outputs(folder: Path) -> set[str]:
    """Names of the files in ``folder`` that gmar wrote there and that are unchanged since (none when
    the folder's list cannot be read)."""
    try:
        listed = read_manifest(folder)
    except GmarError:
        return set()
    return {name for name, entry in listed.items() if _is_listed(Path(folder) / name, entry)}


def distinct(names: Sequence[str]) -> list[str]:
    """``names`` with repeats numbered: ``["a", "a", "b"]`` -> ``["a", "a-2", "b"]``."""
    result: list[str] = []
    for name in names:
        candidate, number = name, 1
        while candidate in result:
            number += 1
            candidate = f"{name}-{number}"
        result.append(candidate)
    return result


def _load(folder: Path) -> tuple[dict[str, dict[str, int]], tuple]:
    """The list and journal of ``folder`` read without the lock, and what was read (for catching up).

    The journal is opened before the list is read: a fold in between (list rewritten, then the
    journal removed) leaves both the new list and the old journal readable, so nothing is missed.
    """
    try:
        handle = open(folder / JOURNAL, "rb", opener=_no_follow)
    except (FileNotFoundError, NotADirectoryError):
        handle = None
    except OSError:
        message = f"{folder / JOURNAL} is not gmar's journal of outputs; move it away or write elsewhere"
        raise GmarError(message) from None
    manifest_key = _key(folder / MANIFEST)
    listed = _read_list(folder / MANIFEST)
    if handle is None:
        return listed, (manifest_key, None, 0)
    with handle:
        offset = _apply(handle.read(), listed)
        return listed, (manifest_key, _file_of(os.fstat(handle.fileno())), offset)


def _read_list(path: Path) -> dict[str, dict[str, int]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("gmar_outputs") != 1 or not isinstance(files, dict):
            raise ValueError
        return {str(n): {"size": int(v["size"]), "mtime_ns": int(v["mtime_ns"])} for n, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise GmarError(f"{path} is not gmar's list of outputs; move it away or write elsewhere") from None


def _apply(data: bytes, listed: dict[str, dict[str, int]]) -> int:
    """Apply the complete journal lines of ``data`` to ``listed``; return the bytes consumed.

    A line cut short (a run killed while appending) or not gmar's is skipped: an unlisted file is
    never replaced, the safe side.
    """
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            entry = json.loads(line.decode("utf-8", "surrogateescape"))
            listed[str(entry["name"])] = {"size": int(entry["size"]), "mtime_ns": int(entry["mtime_ns"])}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return end


def _write_list(folder: Path, listed: dict[str, dict[str, int]]) -> None:
    handle, temporary = tempfile.mkstemp(prefix=MANIFEST + ".", dir=folder)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump({"gmar_outputs": 1, "files": listed}, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, folder / MANIFEST)
    except BaseException:
        os.unlink(temporary)
        raise


def _create_temporary(folder: Path, name: str) -> Path:
    """A new empty file in ``folder`` that ends like ``name``, created exclusively (no link followed)."""
    suffix = Path(name).suffix
    if len(suffix) > 16 or not suffix[1:].isalnum():
        suffix = ""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = folder / f"{TEMPORARY}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, flags, 0o666))  # the umask applies, as for any file the user writes
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def _sync(path: Path) -> os.stat_result:
    """Flush ``path`` to disk; return its ``fstat``, after checking the writer left it a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "the writer left something other than a file")
        try:
            os.fsync(fd)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # not syncable: fine
                raise
        return info
    finally:
        os.close(fd)


def _link(temporary: Path, final: Path) -> bool:
    """Give ``temporary``'s file the new name ``final`` too, unless ``final`` exists (then False).

    Where hard links are not supported, ``final`` is created exclusively and then replaced.
    """
    try:
        os.link(temporary, final, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in _LINK_UNSUPPORTED:
            raise
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            os.close(os.open(final, flags, 0o666))
        except FileExistsError:
            return False
        os.rename(temporary, final)
        return True
    os.unlink(temporary)
    return True


def _unlink_if(path: Path, info: os.stat_result | None = None) -> None:
    """Remove ``path`` if it is there (and, given ``info``, still that file)."""
    try:
        if info is not None:
            current = path.lstat()
            if (current.st_dev, current.st_ino) != (info.st_dev, info.st_ino):
                return
        os.unlink(path)
    except OSError:
        pass


def _lock(folder: Path) -> int:
    """Lock ``folder`` (``flock`` on the folder itself, so that it holds no extra file); return the fd.

    Where a folder cannot be locked (NFS), ``.gmar-outputs.lock`` in it is locked instead; concurrent
    runs on that folder meet the same refusal and so lock the same file.
    """
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError:
        os.close(fd)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(folder / LOCK, flags, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, the file system of ``folder`` (or its nearest parent) takes."""
    for path in (folder, *folder.absolute().parents):
        if path.is_dir():
            try:
                return int(os.pathconf(path, "PC_NAME_MAX"))
            except (OSError, ValueError, AttributeError):
                break
    return 255


def _foreign(info: os.stat_result) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "is a link"
    if not stat.S_ISREG(info.st_mode):
        return "exists and is not a file"
    return "exists and was not written by gmar"


def _bytes(name: str) -> bytes:
    """A name as the file system counts it: UTF-8, undecodable bytes kept as they were."""
    return name.encode("utf-8", "surrogateescape")


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        return _key_of(path.lstat())
    except OSError:
        return None


def _key_of(info: os.stat_result) -> tuple[int, int, int, int]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _file_of(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _matches(info: os.stat_result, entry: dict[str, int] | None) -> bool:
    return (
        entry is not None
        and stat.S_ISREG(info.st_mode)
        and (info.st_size, info.st_mtime_ns) == (entry["size"], entry["mtime_ns"])
    )


def _is_listed(path: Path, entry: dict[str, int] | None) -> bool:
    try:
        return _matches(path.lstat(), entry)
    except OSError:
        return False


def _identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at ``path`` (links followed), None if there is none."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino
