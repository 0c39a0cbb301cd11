"""The model zoos' versions gmar supports, checked before a model is explained.

The minimums are those of the table of zoos (:mod:`gmar.adapters.zoos`), which are
``pyproject.toml``'s extras (a test keeps the two equal). An older zoo
changes models in ways gmar's adapters do not follow (OpenCLIP 2.x ignores LeGrad's pooling, for
one), so it is refused on one line instead of giving other maps without a word.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import metadata

from gmar.adapters.zoos import ZOOS
from gmar.errors import UnsupportedModelError

#: family -> (distribution, minimum version, gmar's extra that installs it), from the table of zoos
SUPPORTED: dict[str, tuple[str, str, str]] = {
    family: (zoo.distribution, zoo.minimum, zoo.extra) for family, zoo in ZOOS.items()
}

_RELEASE = re.compile(r"^\s*v?(?:(\d+)!)?(\d+(?:\.\d+)*)")


def check_supported(family: str) -> None:
    """Raise :class:`UnsupportedModelError` when ``family``'s library is older than gmar supports."""
    zoo = ZOOS.get(family)
    if zoo is None:
        return
    distribution, minimum, extra = zoo.distribution, zoo.minimum, zoo.extra
    version = installed_version(distribution)
    if version is not None and not at_least(version, minimum):
        needed = f"{distribution}>={minimum}"
        raise UnsupportedModelError(
            f"{distribution} {version} is installed; gmar needs {needed}: pip install -U 'gmar[{extra}]'"
        )


@cache
def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when its metadata cannot be found."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def at_least(version: str, minimum: str) -> bool:
    """Whether ``version``'s release (epoch and numbers; suffixes such as ``.dev0``, ``rc1`` or
    ``+cu121`` set aside) is ``minimum``'s or later. A pre-release of the minimum itself, as a build
    from the zoo's source reports (``5.0.0.dev0``), counts as the minimum. A version that names no
    release cannot be judged and passes."""
    mine, needed = _release(version), _release(minimum)
    if mine is None or needed is None:
        return True
    return mine >= needed


def _release(version: str) -> tuple[int, tuple[int, ...]] | None:
    """``(epoch, numbers)`` with trailing zeros dropped, so that ``5.0`` equals ``5.0.0``."""
    found = _RELEASE.match(version)
    if found is None:
        return None
    numbers = [int(n) for n in found.group(2).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return int(found.group(1) or 0), tuple(numbers)
