"""A MONAI bundle's network, built without running the bundle's code unless an admin trusted it.

A bundle's config (``configs/inference.json`` or ``.yaml``) is code in MONAI's syntax: a string starting with ``$``
is a Python expression, one starting with ``%`` pulls in (part of) another file, ``@id`` refers to another item,
and a mapping with a ``_target_`` calls whatever that names (``os.system`` as well as a network class). The
gateway builds ``network_def`` and what it refers to, and for a manifest with ``inference.pipeline: bundle`` the
``preprocessing``, ``inferer`` and ``postprocessing`` sections (:mod:`gateway.infer.bundle_pipeline`, through
:func:`check_and_build` with a :class:`Rule` per section); it never reads the config's other sections.

Without ``trust_code`` (the manifest's default), :func:`build_network` reads the config as plain data (``json``,
``yaml.safe_load``) and builds ``network_def`` itself, once all of it has passed these checks:

- an ``@id`` reference (an absolute id, ``::`` or ``#`` between its parts) is followed, and what it names is
  checked the same way; an item referred to twice is built once (as MONAI does);
- a string starting with ``$`` (an expression) or ``%`` (a macro) is refused;
- a ``_target_`` must name a class that is a ``torch.nn.Module`` and is defined under :data:`ALLOWED_PREFIXES`
  (``monai.networks`` and ``torch.nn``); a short name (``UNet``) is looked up among MONAI's components, as MONAI
  does, and must name exactly one;
- ``_mode_`` may only be ``default``, ``_disabled_`` only a boolean; ``_requires_`` and ``_desc_`` are checked
  like any value, then not used;
- an argument whose name asks for something to be fetched or read (``pretrained``, ``*url*``, ``*path*``,
  ``*file*``, ``*download*``, ``*weights*``, ``*cache*``) may only be false or null: a network may not download or
  read weights on its own (a URL's file could be a pickle); the weights are the bundle's ``models/model.pt``.

A refusal names the item's id and its value (``network_def::_target_ = 'os.system'``) and why; nothing is built
until the whole of ``network_def`` has passed. The same checks run at registration (in the dry run's child
process) and whenever a worker loads the network, so a package written onto the disk without registration runs
no code either: what decides is the manifest recorded in the index at registration.

With ``trust_code: true`` (a package an admin registered so: :meth:`gateway.registry.registry.Registry.register`),
MONAI's ``ConfigParser`` reads the config and its expressions run: at registration in the dry run's child process,
and at inference in the gateway's own worker processes, by the operator's explicit choice.
"""

from __future__ import annotations

import json
import pydoc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from gateway.errors import ModelError
from gateway.infer.failures import reason
from gateway.registry.bundle_manifest import BUNDLE_CONFIGS

__all__ = ["ALLOWED_PREFIXES", "Rule", "build_network", "bundle_config", "check_and_build", "read_config"]

#: Where the classes of an untrusted bundle's network may come from (a module and its submodules).
ALLOWED_PREFIXES = ("monai.networks", "torch.nn")

_SEP = "::"
_SPECIAL = frozenset({"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"})
_REFERENCE = re.compile(r"@\w*(?:::\w*)*")
_FETCHING = re.compile(r"pretrain|url|path|file|download|weights|cache", re.IGNORECASE)
_MAX_DEPTH = 64
_MAX_ITEMS = 100_000
_TRUST = "bundle code runs only for a package whose manifest says trust_code: true, registered by an admin"


class _Refused(Exception):
    """An item of the config that an untrusted bundle may not have: its id, value and why."""

    def __init__(self, item: str, value: Any, why: str) -> None:
        text = repr(value)
        shown = text if len(text) <= 200 else text[:197] + "..."
        super().__init__(f"{item} = {shown}: {why}")


@dataclass(frozen=True)
class Rule:
    """What an untrusted section's ``_target_`` may name, and which argument names it may not set.

    ``prefixes``: the modules (and their submodules) a class must be defined under; ``base``: a class it must
    derive from (``None``: any class); ``refused_args``: argument names that may only be false or null (asking
    for something to be fetched, read or written); ``why``: the refusal's words for a class outside the rule;
    ``refused_classes``: class names refused even under ``prefixes`` (they read or write files).
    """

    prefixes: tuple[str, ...]
    base: type | None
    refused_args: re.Pattern[str]
    why: str
    refused_classes: frozenset[str] = frozenset()

    def allows(self, module: str) -> bool:
        """Whether a class of ``module`` may be built."""
        return any(module == prefix or module.startswith(prefix + ".") for prefix in self.prefixes)


_NETWORK = Rule(
    ALLOWED_PREFIXES,
    torch.nn.Module,
    _FETCHING,
    f"only torch.nn.Module classes under {' or '.join(ALLOWED_PREFIXES)} are built",
)


@dataclass(eq=False)
class _Component:
    """A checked ``_target_`` mapping: the class, its checked arguments, whether it is disabled."""

    cls: type
    kwargs: dict[str, Any]
    disabled: bool


def bundle_config(bundle: Path) -> Path:
    """The bundle's ``configs/inference.json`` (or ``.yaml``, ``.yml``).

    Raises
    ------
    ModelError
        If it has none.
    """
    for name in BUNDLE_CONFIGS:
        path = bundle / "configs" / name
        if path.is_file():
            return path
    raise ModelError(f"MONAI bundle {bundle.name} has neither models/model.ts nor configs/inference.json or .yaml")


def build_network(bundle: Path, *, trust_code: bool) -> torch.nn.Module:
    """Build the bundle's ``network_def`` (its weights are not loaded yet).

    Parameters
    ----------
    bundle
        The bundle folder.
    trust_code
        The registered manifest's ``trust_code``: ``True`` lets MONAI read the config and run its code.

    Raises
    ------
    ModelError
        If the bundle has no config or no ``network_def``, the config is not readable, an untrusted config has
        anything the module docstring lists as code (the message names the item and its value), or the network
        cannot be built.
    """
    config = bundle_config(bundle)
    problem = f"MONAI bundle {bundle.name}: cannot build network_def from {config.name}"
    network = _parsed_by_monai(config, bundle) if trust_code else _built_without_code(config, bundle, problem)
    if not isinstance(network, torch.nn.Module):
        raise ModelError(f"MONAI bundle {bundle.name}: network_def is a {type(network).__name__}, not a torch module")
    return network


def _parsed_by_monai(config: Path, bundle: Path) -> Any:
    """The trusted path: MONAI's parser, expressions and all."""
    from monai.bundle.config_parser import ConfigParser

    try:
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(bundle)
        if "network_def" not in parser:
            raise ModelError(f"MONAI bundle {bundle.name}: {config.name} has no network_def")
        return parser.get_parsed_content("network_def", instantiate=True)
    except ModelError:
        raise
    except Exception as exc:
        problem = f"MONAI bundle {bundle.name}: cannot build network_def from {config.name}"
        raise ModelError(f"{problem}: {reason(exc)}") from exc


def read_config(config: Path) -> Any:
    """The config as plain data (JSON, or YAML read safely): nothing in it is run.

    Raises
    ------
    ModelError
        If it is not readable.
    """
    return _read(config)


def _read(config: Path) -> Any:
    try:
        text = config.read_text(encoding="utf-8")
        return json.loads(text) if config.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as exc:
        raise ModelError(f"MONAI bundle config {config.name} is not readable: {reason(exc)}") from exc


def _built_without_code(config: Path, bundle: Path, problem: str) -> Any:
    """The untrusted path: check all of ``network_def``, then build it here, running nothing of the bundle's."""
    data = _read(config)
    if not isinstance(data, dict) or "network_def" not in data:
        raise ModelError(f"MONAI bundle {bundle.name}: {config.name} has no network_def")
    try:
        plan = _Checker(data).item("network_def", data["network_def"], 0)
    except _Refused as refused:
        raise ModelError(f"{problem}: {refused}; {_TRUST}") from refused
    try:
        return _build(plan, {})
    except Exception as exc:  # the network's own constructor refusing its arguments
        raise ModelError(f"{problem}: {reason(exc)}") from exc


def check_and_build(
    config: dict[str, Any], sections: dict[str, Rule], skip: frozenset[str], problem: str
) -> dict[str, Any]:
    """Check the named top-level ``sections`` of an untrusted config, each under its rule, then build them.

    Items referred to from several sections are built once (``@preprocessing`` inside ``Invertd`` is the very
    ``preprocessing`` built here, as MONAI builds it). ``skip`` holds the ids of list entries left out unchecked
    and unbuilt (a loader the gateway replaces, a saver it does not run).

    Raises
    ------
    ModelError
        Naming the refused item and its value (``preprocessing::transforms::3::_target_ = 'os.system'``) and that
        ``trust_code`` would allow it, or why a section could not be built.
    """
    checker = _Checker(config, skip)
    plans: dict[str, Any] = {}
    try:
        for section, rule in sections.items():
            checker.rule = rule
            plans[section] = checker.item(section, f"@{section}", 0)
    except _Refused as refused:
        raise ModelError(f"{problem}: {refused}; {_TRUST}") from refused
    built: dict[int, Any] = {}
    result: dict[str, Any] = {}
    for section, plan in plans.items():
        try:
            result[section] = _build(plan, built)
        except Exception as exc:  # a constructor refusing its arguments
            raise ModelError(f"{problem}: {section}: {reason(exc)}") from exc
    return result


class _Checker:
    """Walks ``network_def`` and what it refers to, refusing code; returns the plan :func:`_build` builds."""

    def __init__(self, config: dict[str, Any], skip: frozenset[str] = frozenset()) -> None:
        self.config = config
        self.skip = skip
        self.rule = _NETWORK
        self.items = 0
        self.resolving: list[str] = []
        self.checked: dict[tuple[Rule, str], Any] = {}  # an item checked under one rule is not taken under another
        self._locator: Any = None

    def item(self, key: str, value: Any, depth: int) -> Any:
        self.items += 1
        if depth > _MAX_DEPTH or self.items > _MAX_ITEMS:
            raise _Refused(key, "...", f"the config is nested deeper than {_MAX_DEPTH} or has over {_MAX_ITEMS} items")
        if isinstance(value, str):
            return self._string(key, value, depth)
        if isinstance(value, dict):
            if "_target_" in value:
                return self._component(key, value, depth)
            return {k: self.item(f"{key}{_SEP}{k}", v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            ids = (f"{key}{_SEP}{i}" for i in range(len(value)))
            return [self.item(id_, v, depth + 1) for id_, v in zip(ids, value, strict=True) if id_ not in self.skip]
        return value

    def _string(self, key: str, value: str, depth: int) -> Any:
        if value.startswith("$"):
            raise _Refused(key, value, "an expression (Python code)")
        if value.startswith("%"):
            raise _Refused(key, value, "a macro (it pulls in another config's content)")
        if value.startswith("@"):
            return self._reference(key, value, depth)
        return value

    def _reference(self, key: str, value: str, depth: int) -> Any:
        target = value.replace("#", _SEP)
        if not _REFERENCE.fullmatch(target):
            raise _Refused(key, value, "not a reference to an item (@id or @id::key)")
        ref = target[1:]
        if not ref or ref.startswith(_SEP):
            raise _Refused(key, value, "a relative reference; write the item's full id")
        if (self.rule, ref) in self.checked:
            return self.checked[self.rule, ref]
        if ref in self.resolving:
            raise _Refused(key, value, f"a reference cycle ({' -> '.join([*self.resolving, ref])})")
        self.resolving.append(ref)
        plan = self.item(ref, self._lookup(key, value, ref), depth + 1)
        self.resolving.pop()
        self.checked[self.rule, ref] = plan
        return plan

    def _lookup(self, key: str, value: str, ref: str) -> Any:
        node: Any = self.config
        for part in ref.split(_SEP):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise _Refused(key, value, f"refers to {ref!r}, which the config does not have")
        return node

    def _component(self, key: str, value: dict[str, Any], depth: int) -> _Component:
        cls = self._class(f"{key}{_SEP}_target_", value["_target_"])
        mode = value.get("_mode_", "default")
        if mode != "default":
            raise _Refused(f"{key}{_SEP}_mode_", mode, "only 'default' (build the class) is allowed")
        disabled = value.get("_disabled_", False)
        if isinstance(disabled, str) and disabled.lower() in ("true", "false"):
            disabled = disabled.lower() == "true"
        if not isinstance(disabled, bool):
            raise _Refused(f"{key}{_SEP}_disabled_", disabled, "must be true or false")
        for special in ("_requires_", "_desc_"):
            if special in value:
                self.item(f"{key}{_SEP}{special}", value[special], depth + 1)
        kwargs = {}
        for name, arg in value.items():
            if name in _SPECIAL:
                continue
            item = f"{key}{_SEP}{name}"
            kwargs[str(name)] = plan = self.item(item, arg, depth + 1)
            if self.rule.refused_args.search(str(name)) and plan is not None and plan is not False:
                raise _Refused(item, arg, _REFUSED_ARG[self.rule.base is torch.nn.Module])
        return _Component(cls, kwargs, disabled)

    def _class(self, key: str, target: Any) -> type:
        if not isinstance(target, str) or not target:
            raise _Refused(key, target, "must be the name of a class")
        full = target if "." in target else self._component_name(key, target)
        rule = self.rule
        if not rule.allows(full):
            raise _Refused(key, target, rule.why)
        try:
            found = pydoc.locate(full)
        except Exception as exc:  # an allowed module that fails to import
            raise _Refused(key, target, f"cannot be imported: {reason(exc)}") from exc
        if not (isinstance(found, type) and rule.allows(found.__module__)):
            raise _Refused(key, target, rule.why)
        if rule.base is not None and not issubclass(found, rule.base):
            raise _Refused(key, target, rule.why)
        if found.__name__ in rule.refused_classes:
            raise _Refused(key, target, "reads or writes files (only the leading loader and the savers are left out)")
        return found

    def _component_name(self, key: str, name: str) -> str:
        """The full name of a MONAI component given by its short name, as MONAI's ``ComponentLocator`` finds it."""
        if self._locator is None:
            from monai.bundle.config_item import ComponentLocator

            self._locator = ComponentLocator()
        module = self._locator.get_component_module_name(name)
        if module is None:
            raise _Refused(key, name, "not a MONAI component; give the class's full name")
        if isinstance(module, list):
            raise _Refused(key, name, f"names several MONAI components ({', '.join(module)}); give the full name")
        return f"{module}.{name}"


_REFUSED_ARG = {
    True: "a network may not download or read weights on its own",
    False: "a transform or inferer may not fetch, read or write files on its own",
}


def _build(plan: Any, built: dict[int, Any]) -> Any:
    """Build a checked plan: each component once, disabled ones as ``None`` (MONAI's meaning)."""
    if isinstance(plan, _Component):
        if id(plan) not in built:
            kwargs = {name: _build(arg, built) for name, arg in plan.kwargs.items()}
            built[id(plan)] = None if plan.disabled else plan.cls(**kwargs)
        return built[id(plan)]
    if isinstance(plan, dict):
        return {k: _build(v, built) for k, v in plan.items()}
    if isinstance(plan, list):
        return [_build(v, built) for v in plan]
    return plan
