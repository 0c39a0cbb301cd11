"""The methods by name: every method class registers itself here, and everything that asks "which
methods are there" (:func:`gmar.explain`, ``"all"``, :func:`gmar.methods.methods_for`, the command line,
the evaluation and the app) reads this registry.

A method outside the package joins the same way::

    @gmar.methods.register
    class Toy(gmar.methods.Explainer):
        name = "toy"
        ...

after which ``gmar.explain(model, images, "toy")`` runs it and ``"all"`` includes it (unless its class
sets ``in_all = False``). :func:`unregister` takes it out again; :func:`registered` does both around a
block.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from gmar.methods.base import Explainer

#: name -> method class, in the order the classes registered (the order ``available_methods`` lists)
METHODS: dict[str, type[Explainer]] = {}

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

E = TypeVar("E", bound=type[Explainer])


def register(cls: E) -> E:
    """Make ``cls`` available by its ``name``; returns ``cls``, so it works as a class decorator.

    The name must be a word (letters, digits, ``_`` or ``-``: it is typed in comma-separated lists and
    written in file names) other than ``"all"``, and not taken by another class.
    """
    if not isinstance(cls, type) or not issubclass(cls, Explainer):
        raise TypeError(f"register takes a subclass of gmar.methods.Explainer, not {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "all":
        raise ValueError(
            f"{cls.__name__}.name must be a word of letters, digits, '_' or '-' other than 'all', not {name!r}"
        )
    known = METHODS.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({known.__module__}.{known.__qualname__})")
    METHODS[name] = cls
    return cls


def unregister(name: str) -> type[Explainer]:
    """Take the method ``name`` out of the registry; returns its class."""
    try:
        return METHODS.pop(name)
    except KeyError:
        raise ValueError(f"no method named {name!r} is registered; registered: {', '.join(METHODS)}") from None


@contextmanager
def registered(cls: E) -> Iterator[E]:
    """``cls`` registered for the block, unregistered after it (also when the block raises)."""
    register(cls)
    try:
        yield cls
    finally:
        METHODS.pop(cls.name, None)


def get_method(name: str) -> type[Explainer]:
    """The class registered as ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def available_methods() -> list[str]:
    """Names accepted by :func:`gmar.explain` and ``gmar explain --method``, in registration order."""
    return list(METHODS)


def all_methods() -> list[str]:
    """The methods ``"all"`` stands for: every one but the slow ones asked by name (``occlusion``)."""
    return [name for name, cls in METHODS.items() if cls.in_all]
