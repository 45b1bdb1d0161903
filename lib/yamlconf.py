"""Typed YAML configs: a dataclass schema read from YAML 1.2 files with ``_base_`` inheritance and
``dotted.key=value`` overrides, checked against the dataclasses' type hints with every problem reported at once.

Nothing here knows a project key: ``lib.config`` holds PYRA's schema and rules and uses :class:`Schema`.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
import reprlib
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "Schema", "bounded", "spread", "to_dict", "get_dotted", "parse_yaml", "dump_yaml",
           "short_repr", "MAX_YAML_NODES"]

MAX_YAML_NODES = 10_000     # values a config may hold once its aliases are expanded (a real one has a few hundred)
_MAX_LINE = 400             # characters an error line may show before it is cut
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 3, 4, 8, 8, 60, 60


def short_repr(value: Any, width: int = 80) -> str:
    """``repr`` cut to a glance (nesting, items and length bounded): an error never prints a whole structure."""
    text = _REPR.repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _clip(line: str) -> str:
    return line if len(line) <= _MAX_LINE else f"{line[:_MAX_LINE]}... ({len(line) - _MAX_LINE} more characters)"


class ConfigError(ValueError):
    """A config problem; the message names the file and/or dotted key and what was expected."""

    def __init__(self, errors: str | list[str]):
        errors = [errors] if isinstance(errors, str) else list(errors)
        self.errors = ["\n".join(_clip(line) for line in str(e).split("\n")) for e in errors]
        super().__init__(self.errors[0] if len(self.errors) == 1 else
                         f"{len(self.errors)} config errors:\n  - " + "\n  - ".join(self.errors))


def bounded(default: Any, low: float | None = None, *, strict: bool = False, high: float | None = None) -> Any:
    """A dataclass field and the range the schema enforces: ``low <= value`` (``<`` if strict), ``value < high``."""
    meta = {"bounds": (low, strict, high)} if low is not None else {}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def spread(names: Callable[[], Iterable[str]]) -> Any:
    """A dict field whose entries are keys of its section, beside the section's fields: ``<section>.<name>`` for
    each name ``names()`` gives (asked whenever a config is read, so names added at run time count). Each is a
    free leaf (its form judged by the caller) that is not required; an override below it
    (``<section>.<name>.<key>=value``) sets one key of its mapping (``Schema.layers``). The dataclass holds
    them as ``{name: value}``; :func:`to_dict` writes them in its place."""
    return field(default_factory=dict, metadata={"spread": names})


def to_dict(obj: Any) -> Any:
    """A plain nested dict/list copy of dataclasses, mappings, lists and tuples (a :func:`spread` field's
    entries become keys of its section)."""
    if is_dataclass(obj):
        items = [item for f in fields(obj) for item in (getattr(obj, f.name).items() if "spread" in f.metadata
                                                        else [(f.name, getattr(obj, f.name))])]
        return {str(k): to_dict(v) for k, v in items}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return [to_dict(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and no duplicate keys (YAML 1.1 reads ``1e-4`` as a string and
    ``no``/``on`` as booleans: classic config bugs)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {short_repr(key)}",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it beyond ``MAX_YAML_NODES`` values, or refer to themselves.

    PyYAML shares an aliased node rather than copying it, but everything that walks the result (merging,
    checking, printing) sees each alias expanded: nine nested aliases make a 1 KB file a billion values.
    The count is memoised per node, so the check itself stays linear in the file.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to the value that contains it "
                                                    "(a recursive structure)", node.start_mark)
        open_nodes.add(id(node))
        children = ([part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"its aliases expand it to more than {MAX_YAML_NODES} values (an alias bomb?); "
                    "write the values out", root.start_mark)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Block-style mappings with inline lists, so a per-layer list stays on one line."""


_Dumper.add_representer(list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML 1.2 text; syntax errors name the source and line (and where an unclosed bracket opened)."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark, ctx = e.problem_mark or e.context_mark, e.context_mark
        where = f" ({e.context} at line {ctx.line + 1})" if e.context and ctx is not None and ctx is not mark else ""
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: invalid YAML: {e.problem or e.context}{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _is(value: Any, kind: Any) -> bool:
    """isinstance with config semantics: ints count as floats, bools as neither; list[X] element-wise."""
    if typing.get_origin(kind) is list:
        return isinstance(value, (list, tuple)) and all(_is(v, typing.get_args(kind)[0]) for v in value)
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


class Schema:
    """The keys of a root dataclass: sections (nested dataclasses) and leaves with their type hints.

    ``runtime`` keys are set by code only (never read from files or overrides); ``free`` leaves take any
    YAML value (their form is judged by the caller); a section's :func:`spread` field adds the keys it names.
    """

    def __init__(self, root: type, runtime: Iterable[str] = (), free: Iterable[str] = ()) -> None:
        self.root, self.runtime, self.free = root, tuple(runtime), tuple(free)
        self.spreads: dict[str, tuple[str, Callable[[], Iterable[str]]]] = {}   # "section." -> (field, names)
        self.keys: dict[str, tuple[Any, Any]] = {k: v for k, v in self._walk(root).items() if k not in self.runtime}
        self.sections = {k: hint for k, (hint, _) in self.keys.items() if is_dataclass(hint)}
        self.leaves = {k: hint for k, (hint, _) in self.keys.items() if not is_dataclass(hint)}

    def _walk(self, cls: type, prefix: str = "") -> dict[str, tuple[Any, Any]]:
        out, names = {}, vars(sys.modules[cls.__module__])
        for f in fields(cls):  # a free leaf's hint is not evaluated: its type may live in a module not loaded
            if "spread" in f.metadata:
                self.spreads[prefix] = (f.name, f.metadata["spread"])
                continue
            hint = Any if prefix + f.name in self.free else eval(f.type, names) if isinstance(f.type, str) else f.type
            out[prefix + f.name] = (hint, f.metadata.get("bounds"))
            if is_dataclass(hint):
                out.update(self._walk(hint, f"{prefix}{f.name}."))
        return out

    def spread_keys(self) -> set[str]:
        """The dotted keys the :func:`spread` fields name now (a section's own fields keep their meaning)."""
        return {prefix + str(name) for prefix, (_, names) in self.spreads.items() for name in names()} - set(self.keys)

    def kind(self, key: str) -> tuple[Any, bool]:
        """(type, nullable) of a typed leaf: ``int | None`` -> (int, True); (None, True) for a free leaf."""
        hint, args = self.leaves[key], typing.get_args(self.leaves[key])
        if key in self.free:
            return None, True
        if isinstance(hint, types.UnionType) and type(None) in args:
            return next(a for a in args if a is not type(None)), True
        return hint, False

    def suggest(self, key: str) -> str:
        """'; did you mean X?' for the nearest valid key (same leaf name elsewhere, else closest spelling)."""
        keys = [*self.keys, *sorted(self.spread_keys())]
        leaf, by_leaf = key.rsplit(".", 1)[-1], {k.rsplit(".", 1)[-1]: k for k in keys}
        match = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key]
        match = match or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        match = match or [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
        return f"; did you mean {match[0]}?" if match else ""

    def structure_errors(self, tree: Any, where: str | None, prefix: str = "", complete: bool = False) -> list[str]:
        """Unknown keys (with a suggestion), sections that are not mappings, wrong leaf types (and, if
        ``complete``, missing keys and runtime keys that are not strings)."""
        at = f"{where}: " if where else ""
        if not isinstance(tree, Mapping):
            return [f"{at}{prefix.rstrip('.') or 'config'}: expected a mapping, got {short_repr(tree)}"]
        errors, spread = [], self.spread_keys()
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if dotted in spread:
                continue   # free: its form is judged by the caller
            if dotted in self.sections:
                errors += self.structure_errors(value, where, dotted + ".", complete)
            elif dotted in self.leaves and dotted not in self.free:
                kind, nullable = self.kind(dotted)
                if not ((value is None and nullable) or (value is not None and _is(value, kind))):
                    name = {bool: "bool", int: "int", float: "float (or int)", str: "str"}.get(kind)
                    name = (name or f"a list of {typing.get_args(kind)[0].__name__}") + (" or null" if nullable else "")
                    errors.append(f"{at}{dotted}: expected {name}, got {short_repr(value)}")
            elif dotted not in self.leaves and not (complete and dotted in self.runtime):
                errors.append(f"{at}unknown key {short_repr(dotted)}{self.suggest(dotted)}")
        if complete:
            errors += [f"missing key {k!r}" for k in self.keys
                       if k.rpartition(".")[0] == prefix[:-1] and k[len(prefix):] not in tree]
            errors += [f"{k}: expected str, got {short_repr(tree[k])}" for k in self.runtime
                       if not prefix and not isinstance(tree.get(k, ""), str)]
        return errors

    def bound_errors(self, tree: Mapping) -> list[str]:
        """Non-finite numbers in any numeric key, and values outside the ranges of ``bounded`` fields
        (tested positively, so NaN fails them too)."""
        errors = []
        for key, (_, bounds) in self.keys.items():
            value, (low, strict, high) = get_dotted(tree, key), bounds or (None, False, None)
            rng = "" if low is None else f"{'>' if strict else '>='} {low}" + (f" and < {high}" if high is not None
                                                                                  else "")
            numbers = value if isinstance(value, (list, tuple)) else [value]
            if key not in self.free and any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                errors.append(f"{key}: must be a finite number{' ' + rng if rng else ''}, got {short_repr(value)}")
            elif low is not None and value is not None and not (
                    (value > low if strict else value >= low) and (high is None or value < high)):
                errors.append(f"{key}: must be {rng}, got {short_repr(value)}")
        return errors

    def merge(self, base: Mapping, over: Mapping, prefix: str = "", into: Iterable[str] = ()) -> dict:
        """`over` on top of `base`: sections (and the keys ``into`` names) merge recursively; leaves (lists and
        mappings too) replace."""
        out = copy.deepcopy(dict(base))
        for key, value in over.items():
            dotted = f"{prefix}{key}"
            deep = (dotted in self.sections or dotted in into) and isinstance(value, Mapping) \
                and isinstance(out.get(key), dict)
            out[key] = self.merge(out[key], value, dotted + ".", into) if deep else copy.deepcopy(value)
        return out

    def read_file(self, path: Path, chain: tuple[Path, ...] = ()) -> dict:
        """A file's settings merged over its ``_base_`` files (in order, later wins), recursively."""
        path = Path(os.path.normpath(path.absolute()))
        if path in chain:
            raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(map(str, chain + (path,)))}")
        data = parse_yaml(_read_text(path, chain), str(path))
        if not isinstance(data, dict | None):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
        data = data or {}
        bases = data.pop("_base_", [])
        bases = [bases] if isinstance(bases, str) else bases
        if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
            raise ConfigError(f"{path}: _base_ must be a path or a list of paths relative to this file, "
                              f"got {short_repr(bases)}")
        errors = self.structure_errors(data, str(path))
        if errors:
            raise ConfigError(errors)
        merged: dict = {}
        for base in bases:
            merged = self.merge(merged, self.read_file(path.parent / base, chain + (path,)))
        return self.merge(merged, data)

    def parse_override(self, text: str) -> dict:
        """'a.b=value' -> {'a': {'b': value}}; the value is YAML, except that str keys keep the raw text."""
        key, sep, raw = (part.strip() for part in text.partition("="))
        where = f"override {short_repr(text)}"
        if not sep or not key:
            raise ConfigError(f"{where}: expected dotted.key=value")
        text_key = key in self.leaves and self.kind(key)[0] is str
        try:
            value = parse_yaml(raw, where) if raw else ""
        except ConfigError:
            if not text_key:
                raise
            value = raw  # not YAML, but a str key takes it as it is (its checks judge it)
        if text_key and value is not None:
            value = raw  # e.g. data.task=2024 stays the string "2024"
        for part in reversed(key.split(".")):
            value = {part: value}
        errors = self.structure_errors(value, where)
        if errors:
            raise ConfigError(errors)
        return value

    def layers(self, defaults: Mapping, path: str | os.PathLike | None, overrides: Iterable[str]) -> dict:
        """Defaults <- the file (with its ``_base_`` chain) <- the overrides in order; every bad override reported.

        A :func:`spread` key is one value (a file or ``key={...}`` replaces it whole), but an override of a key
        below it (``key.sub=value``) sets that one and keeps the others."""
        data, errors = self.merge(defaults, self.read_file(Path(path)) if path is not None else {}), []
        for text in [overrides] if isinstance(overrides, str) else overrides:
            key = text.partition("=")[0].strip()   # merging.<method>.<key>=v sets one key, keeping the others
            try:
                data = self.merge(data, self.parse_override(text), into=[k for k in self.spread_keys()
                                                                         if key.startswith(k + ".")])
            except ConfigError as e:
                errors += e.errors
        if errors:
            raise ConfigError(errors)
        return data

    def build(self, data: Mapping, cls: type | None = None, prefix: str = "") -> Any:
        """The dataclass of checked data; ints given for float keys become floats; a section's :func:`spread`
        keys go to its spread field."""
        values, spread = {}, self.spreads.get(prefix)
        if spread is not None:
            values[spread[0]] = {}
        for name, value in data.items():
            key = prefix + name
            if spread is not None and key not in self.keys:
                values[spread[0]][name] = copy.deepcopy(value)
                continue
            kind = self.kind(key)[0] if key in self.leaves and value is not None else None
            values[name] = (self.build(value, self.sections[key], key + ".") if key in self.sections else float(value)
                            if kind is float else [float(v) for v in value] if kind == list[float] else value)
        return (cls or self.root)(**values)


def _read_text(path: Path, chain: tuple[Path, ...]) -> str:
    """A config file's text; what cannot be one (missing, a directory, binary, not UTF-8) is one line naming it."""
    by = f" (listed in _base_ of {chain[-1]})" if chain else ""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file{by}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found{by}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file{by}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")   # a BOM (editors on Windows) is not part of the first key
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte 0x{raw[e.start]:02x} at offset {e.start}){by}; "
                          f"a config is YAML text in UTF-8 (a binary file, or another encoding?)") from None
    if "\0" in text:
        raise ConfigError(f"{path}: a binary file (it holds NUL bytes), not a YAML config{by}")
    return text


def get_dotted(tree: Mapping, dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree
