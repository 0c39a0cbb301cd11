"""Where the front ends write files: never over an input, never over a file gmar did not write.

Each folder gmar writes into holds ``.gmar-outputs.json``, the name, size and modification time of
every file gmar wrote there. An existing file is replaced only when it is listed there and still has
the listed size and time, so running a command again replaces its own outputs and nothing else. A
name that is taken (by an input of this run, by a file gmar did not write, or by another output of
this run) is either given a numbered suffix, with one line on stderr, or refused with a
:class:`~gmar.errors.GmarError`.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from gmar.errors import GmarError

#: The list of files gmar wrote in a folder, kept in that folder.
MANIFEST = ".gmar-outputs.json"


class OutputFolder:
    """The folder one command writes into.

    Args:
        folder: where to write; created on the first write.
        inputs: the files this run reads; none of them is ever written.
        option: the command-line option that named ``folder``, for messages.
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
        self._listed = read_manifest(self.folder)
        self._claimed: set[str] = set()

    def taken(self, name: str) -> str | None:
        """Why ``name`` cannot be written in this folder now, or None when it can."""
        path = self.folder / name
        if name in self._claimed:
            return "is another output of this run"
        if name == MANIFEST:
            return "is gmar's list of outputs"
        if os.path.realpath(path) in self._input_paths or _identity(path) in self._input_files:
            return "is an input of this run"
        if not os.path.lexists(path) or _is_listed(path, self._listed.get(name)):
            return None
        return "exists and was not written by gmar"

    def reserve(self, base: str, suffixes: Sequence[str], source: str | Path) -> str:
        """Claim the names ``base + suffix`` for the outputs of one input, ``source``.

        Returns ``base``, or ``base-2``, ``base-3``... when one of the names is taken; a renaming is
        reported on one line of stderr.
        """
        candidate, number, first = base, 1, None
        while True:
            reasons = [(candidate + s, why) for s in suffixes if (why := self.taken(candidate + s))]
            if not reasons:
                break
            first = first or reasons[0]
            number += 1
            candidate = f"{base}-{number}"
        self._claimed.update(candidate + s for s in suffixes)
        if first is not None:
            name, why = first
            print(f"gmar: {source}: outputs named {candidate}, as {self.folder / name} {why}", file=sys.stderr)
        return candidate

    def check(self, names: Iterable[str]) -> None:
        """Claim fixed ``names``, or raise :class:`GmarError` naming the first one that is taken."""
        names = list(names)
        for name in names:
            why = self.taken(name)
            if why is not None:
                raise GmarError(
                    f"{self.folder / name} {why}; gmar leaves it alone: move it away or use another {self.option}"
                )
        self._claimed.update(names)

    def write(self, name: str, writer: Callable[[Path], object]) -> Path:
        """Write ``name`` with ``writer(path)`` and list it as gmar's; raise :class:`GmarError` if it is taken
        (unless claimed before with :meth:`reserve` or :meth:`check`) or cannot be written."""
        if name not in self._claimed:
            self.check([name])
        path = self.folder / name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            writer(path)
            info = path.lstat()
            self._listed[name] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
            self._save()
        except OSError as error:
            raise GmarError(f"cannot write {path}: {error.strerror or error}") from None
        return path

    def _save(self) -> None:
        listed = {n: v for n, v in sorted(self._listed.items()) if os.path.lexists(self.folder / n)}
        handle, temporary = tempfile.mkstemp(prefix=MANIFEST + ".", dir=self.folder)
        try:
            with os.fdopen(handle, "w") as file:
                json.dump({"gmar_outputs": 1, "files": listed}, file, indent=1)
            os.replace(temporary, self.folder / MANIFEST)
        except BaseException:
            os.unlink(temporary)
            raise


def read_manifest(folder: Path) -> dict[str, dict[str, int]]:
    """The files gmar listed as written in ``folder``: name -> ``{"size", "mtime_ns"}`` (empty if none)."""
    path = Path(folder) / MANIFEST
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


def _is_listed(path: Path, entry: dict[str, int] | None) -> bool:
    if entry is None:
        return False
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and (info.st_size, info.st_mtime_ns) == (entry["size"], entry["mtime_ns"])


def _identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at ``path`` (links followed), None if there is none."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino
