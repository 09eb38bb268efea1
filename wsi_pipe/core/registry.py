"""One registry type for every pluggable family: tile encoders and MIL aggregators.

An entry is a name and a builder plus what the rest of the code needs to know without building
it:

* `options`: the builder's keyword options, its schema. By default read from its signature at
  registration (minus the positional arguments every member of the registry takes, e.g.
  `in_dim, n_classes` for aggregators); a builder that passes its keywords on (to timm, say)
  gives its schema explicitly, or a function returning it, read on first use (so that
  registering costs no import of the library that knows it). Building with an option outside
  the schema is a ConfigError naming the unknown and the accepted options: nothing is silently
  dropped.
* `controls`: keyword arguments the owner itself passes to every builder that takes them, and
  drops for the others (an encoder's selective-scan backend, "build on the meta device"). They
  say how to build, not what: never options, never saved with a model.
* `tiny`: the keyword options of the family's tiny variant, small enough for contract tests that
  loop over the registry. Every family declares its tiny variant this one way, on one of its
  entries, and the registry adds it as an entry of its own named `<family>_tiny` (built with
  those options, with its own `info` when it differs, e.g. a smaller EncoderSpec), because such
  names are what tests and users type and checkpoints record. `names()` leaves tiny variants out
  unless asked.
* `info`: what the family's own code attaches (an EncoderSpec, an aggregator's flags).
* `family`, `description`: for listings and CLI help (`choices()`).

Names outside the table: a registry may be given a `dynamic` resolver for a pattern of names it
cannot list (e.g. `timm:<arch>`); it returns an entry (made with `make_entry`) for a name of its
pattern, raises ConfigError for a malformed one, and None for other names.

Lookups of unknown names raise ConfigError naming the registered ones. Built-in members register
themselves when their module is imported: `load_builtins` (given by the owner) runs once before
the first lookup. No torch here: the registry never builds anything itself except through the
builder it was given.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from wsi_pipe.core.errors import ConfigError

T = TypeVar("T")
#: Name suffix of a family's tiny variant.
TINY_SUFFIX = "_tiny"
F = TypeVar("F", bound=Callable[..., Any])
#: An option schema: the names, or a function returning them (read once, on first use).
Schema = Iterable[str] | Callable[[], Iterable[str]]


@dataclass(frozen=True, eq=False)
class Entry(Generic[T]):
    """One registered member. `tiny_variant`: this entry is `<family>_tiny`, built with `tiny`.

    schema: the builder's keyword options (see `options`). controls: the registry's controls
    this builder takes. what: what the registry holds ("encoder"), for messages.
    """

    name: str
    build: Callable[..., T]
    schema: frozenset[str] | Callable[[], Iterable[str]]
    description: str
    family: str
    tiny: Mapping[str, Any] = field(default_factory=dict)
    info: Any = None
    tiny_variant: bool = False
    controls: frozenset[str] = frozenset()
    what: str = ""

    @functools.cached_property
    def options(self) -> frozenset[str]:
        """The option schema (a lazy schema is read here, once; tiny options are checked)."""
        names = frozenset(self.schema() if callable(self.schema) else self.schema)
        names -= self.controls
        bad = sorted(set(self.tiny) - names)
        if bad:  # a programming error of the registering module, not a user error
            raise TypeError(f"{self.what} {self.name!r}: tiny options {bad} are not options")
        return names

    def check_options(self, options: Mapping[str, Any] | set[str]) -> None:
        """ConfigError if `options` holds a name outside the schema."""
        unknown = sorted(set(options) - self.options)
        if unknown:
            what = f"{self.what} " if self.what else ""
            raise ConfigError(
                f"{what}{self.name!r} has no option(s) {unknown}; it accepts "
                f"{sorted(self.options) or 'none'}"
            )

    def build_with(
        self,
        args: tuple[Any, ...] = (),
        options: Mapping[str, Any] | None = None,
        controls: Mapping[str, Any] | None = None,
    ) -> T:
        """Build from positional `args`, checked `options` (over the tiny options, for a tiny
        variant) and the `controls` this builder takes (the others are dropped)."""
        options = dict(options or {})
        self.check_options(options)
        kw = {**self.tiny, **options} if self.tiny_variant else options
        kw.update({k: v for k, v in (controls or {}).items() if k in self.controls})
        return self.build(*args, **kw)

    def create(self, *args: Any, **options: Any) -> T:
        """Build with `options` over the tiny options (for a tiny variant); unknown ones raise."""
        return self.build_with(args, options)


def _parameters(build: Callable[..., Any]) -> tuple[list[str], bool]:
    """(keyword parameter names, takes **kwargs) of `build` (a class: its `__init__`)."""
    target = build.__init__ if inspect.isclass(build) else build
    params = inspect.signature(target).parameters
    named = [
        n
        for n, p in params.items()
        if n != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def signature_options(
    build: Callable[..., Any], positional: tuple[str, ...] = ()
) -> frozenset[str]:
    """Keyword options of `build` (a class: its `__init__`), minus `positional` and `self`.

    A builder taking `**kwargs` has an open schema; registries here refuse that, so that every
    option is checked against a closed list (such a builder gives its schema explicitly).
    """
    named, open_ = _parameters(build)
    if open_:
        raise TypeError(f"{build!r} takes **kwargs: list its options explicitly")
    return frozenset(n for n in named if n not in positional)


class Registry(Generic[T]):
    """Named builders of one kind (`what`, e.g. "encoder" or "MIL method").

    positional: arguments every builder takes first (not options). controls: keyword arguments
    the owner passes to the builders that take them (see the module docstring). dynamic,
    dynamic_help: a resolver for names outside the table, and how the unknown-name error
    describes its pattern (e.g. "or timm:<arch> for a timm architecture").
    """

    def __init__(
        self,
        what: str,
        *,
        positional: tuple[str, ...] = (),
        controls: tuple[str, ...] = (),
        load_builtins: Callable[[], None] | None = None,
        dynamic: Callable[[str], Entry[T] | None] | None = None,
        dynamic_help: str = "",
    ) -> None:
        self.what = what
        self.positional = positional
        self.controls = frozenset(controls)
        self._load_builtins = load_builtins
        self._loaded = load_builtins is None
        self._dynamic = dynamic
        self._dynamic_help = dynamic_help
        self._entries: dict[str, Entry[T]] = {}
        self._dynamic_entries: dict[str, Entry[T]] = {}

    # ----------------------------------------------------------------------- registration
    def make_entry(
        self,
        name: str,
        build: Callable[..., T],
        *,
        family: str | None = None,
        description: str = "",
        options: Schema | None = None,
        tiny: Mapping[str, Any] | None = None,
        info: Any = None,
        tiny_variant: bool = False,
    ) -> Entry[T]:
        """An entry of this registry, not registered (`add` registers; `dynamic` returns one).

        options: the schema when the builder passes its keywords on (a collection, or a
        function returning one, read on first use); default: the builder's signature.
        """
        named, open_ = _parameters(build)
        controls = frozenset(named) & self.controls
        schema: frozenset[str] | Callable[[], Iterable[str]]
        if options is None:
            schema = signature_options(build, self.positional)  # TypeError for **kwargs
        elif callable(options):
            schema = options
        else:
            schema = frozenset(options)
        doc = description or (build.__doc__ or "").strip().split("\n")[0]
        return Entry(
            name,
            build,
            schema,
            doc,
            family or name,
            MappingProxyType(dict(tiny or {})),
            info,
            tiny_variant,
            controls,
            self.what,
        )

    def add(
        self,
        name: str,
        build: Callable[..., T],
        *,
        family: str | None = None,
        description: str = "",
        options: Schema | None = None,
        tiny: Mapping[str, Any] | None = None,
        tiny_info: Any = None,
        info: Any = None,
    ) -> Entry[T]:
        """Register `build` under `name`; with `tiny`, also its family's `<family>_tiny` variant
        (built with those options; `tiny_info` is its info, default `info`).

        A duplicate name raises ValueError; tiny options outside the schema raise TypeError (a
        programming error in the registering module, not a user error), at registration for a
        schema read from the signature, on first use for a lazy one.
        """
        family = family or name
        tiny_name = f"{family}{TINY_SUFFIX}"
        for n in (name, tiny_name) if tiny else (name,):
            if n in self._entries:
                raise ValueError(f"{self.what} {n!r} is already registered")
        entry = self.make_entry(
            name,
            build,
            family=family,
            description=description,
            options=options,
            tiny=tiny,
            info=info,
        )
        if not callable(entry.schema):
            _ = entry.options  # check the tiny options now
        self._put(entry)
        if tiny:
            variant = self.make_entry(
                tiny_name,
                build,
                family=family,
                description=f"tiny variant of {family} (tests)",
                options=entry.schema,
                tiny=tiny,
                info=info if tiny_info is None else tiny_info,
                tiny_variant=True,
            )
            self._put(variant)
        return entry

    def register(
        self,
        name: str,
        *,
        family: str | None = None,
        description: str = "",
        options: Schema | None = None,
        tiny: Mapping[str, Any] | None = None,
        tiny_info: Any = None,
        info: Any = None,
    ) -> Callable[[F], F]:
        """Decorator form of `add`."""

        def deco(build: F) -> F:
            self.add(
                name,
                build,
                family=family,
                description=description,
                options=options,
                tiny=tiny,
                tiny_info=tiny_info,
                info=info,
            )
            return build

        return deco

    def _put(self, entry: Entry[T]) -> None:
        if entry.name in self._entries:
            raise ValueError(f"{self.what} {entry.name!r} is already registered")
        self._entries[entry.name] = entry

    # ---------------------------------------------------------------------------- lookups
    def _ensure_loaded(self) -> None:
        if not self._loaded and self._load_builtins is not None:
            self._loaded = True
            self._load_builtins()

    def __contains__(self, name: object) -> bool:
        """A registered name, or a valid name of the dynamic pattern."""
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except ConfigError:
            return False
        return True

    def get(self, name: str) -> Entry[T]:
        """The entry `name`; ConfigError naming the registered ones otherwise."""
        self._ensure_loaded()
        entry = self._entries.get(name) or self._dynamic_entries.get(name)
        if entry is None and self._dynamic is not None:
            entry = self._dynamic(name)  # ConfigError for a malformed name of its pattern
            if entry is not None:
                self._dynamic_entries[name] = entry
        if entry is None:
            also = f", {self._dynamic_help}" if self._dynamic_help else ""
            raise ConfigError(
                f"unknown {self.what} {name!r}; registered: {', '.join(self.names())}{also}"
            )
        return entry

    def names(self, family: str | None = None, tiny: bool | None = None) -> list[str]:
        """Registered names, sorted (optionally one family; only / no tiny variants)."""
        self._ensure_loaded()
        return sorted(
            n
            for n, e in self._entries.items()
            if (family is None or e.family == family) and (tiny is None or e.tiny_variant == tiny)
        )

    def entries(self) -> list[Entry[T]]:
        self._ensure_loaded()
        return [self._entries[n] for n in sorted(self._entries)]

    def check_options(self, name: str, options: Mapping[str, Any] | set[str]) -> None:
        """ConfigError if `options` holds a name outside `name`'s schema."""
        self.get(name).check_options(options)

    def create(self, name: str, *args: Any, **options: Any) -> T:
        """Build `name` with the positional arguments and checked options."""
        return self.get(name).build_with(args, options)

    def choices(self, tiny: bool = False) -> str:
        """`a | b | c`: the names for CLI help (tiny variants only when asked)."""
        return " | ".join(self.names(tiny=None if tiny else False))
