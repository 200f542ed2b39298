"""A settings dataclass's fields as flat constructor arguments and attributes of the class that holds it.

anomalib's CLI and YAML configure a post-processor through its constructor's signature, so F2PAD lists
every field of :class:`F2PADSettings` there (``init_args: {dilation: 3}``), and reads each as an attribute
(``f2pad.dilation``). Both come from the dataclass, so a new setting is one new field.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def settings_as_arguments(settings_class: type) -> Callable[[T], T]:
    """Class decorator: each field of ``settings_class`` becomes a keyword argument and an attribute.

    The decorated class keeps its settings in ``self.settings``. Its ``__init__`` signature gains every field
    (keyword-only, with the field's default and type) before its ``**kwargs``; reading the attribute reads
    ``self.settings``, assigning it replaces ``self.settings`` with a validated copy.
    """
    types = typing.get_type_hints(settings_class)

    def decorate(cls: T) -> T:
        own = inspect.signature(cls.__init__)
        *parameters, var_keyword = own.parameters.values()
        keyword = inspect.Parameter.KEYWORD_ONLY
        flat = [
            inspect.Parameter(field.name, keyword, default=field.default, annotation=types[field.name])
            for field in fields(settings_class)
        ]
        cls.__init__.__signature__ = own.replace(parameters=[*parameters, *flat, var_keyword])
        for field in fields(settings_class):
            setattr(cls, field.name, _setting(field.name))
        return cls

    return decorate


def _setting(name: str) -> property:
    def read(self: Any) -> Any:  # noqa: ANN401
        return getattr(self.settings, name)

    def write(self: Any, value: Any) -> None:  # noqa: ANN401
        self.settings = replace(self.settings, **{name: value})

    return property(read, write, doc=f"``settings.{name}``; assigning it replaces ``settings`` with a validated copy.")
