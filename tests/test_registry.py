"""The one registry type (`wsi_pipe.core.registry`) and the two registries built on it."""

from __future__ import annotations

import pytest

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.registry import Entry, Registry, signature_options


class _Thing:
    """A thing with two options."""

    def __init__(self, size: int, width: int = 4, depth: int = 2) -> None:
        self.size, self.width, self.depth = size, width, depth


def test_registry_schema_tiny_variant_and_errors():
    reg: Registry[_Thing] = Registry("thing", positional=("size",))
    entry = reg.add("thing", _Thing, tiny={"width": 1}, info="big", tiny_info="small")
    assert reg.get("thing_tiny").info == "small" and reg.get("thing").info == "big"
    assert entry.options == {"width", "depth"} and entry.description == "A thing with two options."
    assert reg.names() == ["thing", "thing_tiny"] and reg.names(tiny=False) == ["thing"]
    assert reg.choices() == "thing" and "thing_tiny" in reg
    t = reg.create("thing_tiny", 3, depth=5)  # the tiny options, then the caller's
    assert (t.size, t.width, t.depth) == (3, 1, 5)
    t = reg.create("thing", 3)
    assert (t.width, t.depth) == (4, 2)
    with pytest.raises(ConfigError, match=r"'thing' has no option\(s\) \['heads'\]; it accepts"):
        reg.create("thing", 3, heads=2)  # never silently dropped
    with pytest.raises(ConfigError, match="unknown thing 'thin'; registered: thing, thing_tiny"):
        reg.get("thin")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("thing", _Thing, tiny={"width": 1})
    with pytest.raises(TypeError, match="tiny options"):
        reg.add("other", _Thing, tiny={"heads": 1})
    reg.add("bare", _Thing)  # a family without a tiny variant adds one name
    assert reg.names(tiny=False) == ["bare", "thing"]


def test_open_schemas_are_refused_and_builtins_load_lazily():
    def build(**kw):
        return kw

    with pytest.raises(TypeError, match="takes \\*\\*kwargs"):
        signature_options(build)
    loaded = []
    reg: Registry[_Thing] = Registry("thing", load_builtins=lambda: loaded.append(1))
    assert loaded == []
    assert reg.names() == [] and loaded == [1]
    reg.names()
    assert loaded == [1]  # once


def test_mil_registry_checks_each_family_own_options():
    from wsi_pipe.mil import create_aggregator, get_spec, list_aggregators

    assert {"abmil", "msm"} <= set(list_aggregators()) and "abmil_tiny" not in list_aggregators()
    tiny = create_aggregator("abmil_tiny", 8, 2)  # the family's tiny variant, by name
    assert (
        tiny.init_kwargs == create_aggregator("abmil", 8, 2, **get_spec("abmil").tiny).init_kwargs
    )
    assert "n_stages" in get_spec("msm").options and "n_stages" not in get_spec("abmil").options
    with pytest.raises(ConfigError, match=r"'abmil' has no option\(s\) \['n_stages'\]"):
        create_aggregator("abmil", 8, 2, n_stages=3)


class _Net:
    """A net whose builder takes a control (`backend`) beside its options."""

    def __init__(self, width: int = 4, backend: str = "auto") -> None:
        self.width, self.backend = width, backend


def _passes_on(empty: bool = False, **options: int) -> dict[str, object]:
    return {"empty": empty, **options}


def test_controls_explicit_and_lazy_schemas():
    reads: list[int] = []

    def lazy() -> set[str]:
        reads.append(1)
        return {"depth", "width"}

    reg: Registry[object] = Registry("net", controls=("backend", "empty"))
    net = reg.add("net", _Net, tiny={"width": 1})
    assert net.options == {"width"} and net.controls == {"backend"}  # a control is no option
    built = reg.get("net_tiny").build_with((), {}, {"backend": "torch", "empty": True})
    assert (built.width, built.backend) == (1, "torch")  # `empty` dropped: _Net does not take it
    with pytest.raises(ConfigError, match=r"'net' has no option\(s\) \['backend'\]"):
        reg.create("net", backend="torch")  # controls are passed as controls only
    # a builder passing its keywords on gives its schema, here lazily: read once, on first use
    entry = reg.add("deep", _passes_on, options=lazy, tiny={"depth": 1})
    assert reads == [] and entry.controls == {"empty"}
    assert reg.get("deep_tiny").build_with((), {"width": 2}, {"empty": True}) == {
        "empty": True,
        "depth": 1,
        "width": 2,
    }
    assert reads == [1]  # read by the tiny variant, once per entry
    assert entry.options == {"depth", "width"} and entry.options and reads == [1, 1]
    with pytest.raises(ConfigError, match=r"'deep' has no option\(s\) \['heads'\]"):
        reg.create("deep", heads=2)
    bad = reg.add("bad", _passes_on, options=lambda: {"width"}, tiny={"heads": 1})
    with pytest.raises(TypeError, match="tiny options"):
        _ = bad.options  # a lazy schema checks the tiny options when it is read
    # a duplicate fails before the builder is looked at (even one that takes **kwargs)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("net", _passes_on)


def test_dynamic_names():
    seen: list[str] = []

    def resolve(name: str) -> Entry[_Net] | None:
        if not name.startswith("w:"):
            return None
        if not name[2:].isdigit():
            raise ConfigError(f"{name!r}: give w:<int>")
        seen.append(name)
        return reg.make_entry(name, _Net, family="w", info=int(name[2:]))

    reg: Registry[_Net] = Registry("net", dynamic=resolve, dynamic_help="or w:<int>")
    reg.add("net", _Net)
    assert "w:3" in reg and reg.get("w:3").info == 3 and seen == ["w:3"]  # made once
    assert reg.create("w:3", width=2).width == 2 and reg.names() == ["net"]
    assert "w:x" not in reg and "other" not in reg
    with pytest.raises(ConfigError, match="give w:<int>"):
        reg.get("w:x")
    with pytest.raises(ConfigError, match="registered: net, or w:<int>"):
        reg.get("other")
