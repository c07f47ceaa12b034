"""The search space of `seektune tune`: `tune.space` read, checked and sampled through Optuna.

`tune.space` maps dotted config keys to what to search:

    train.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    train.batch_size: {type: int, low: 4, high: 16, step: 4}
    method.lora.r: [8, 16, 32]                              # a list is a categorical choice
    method.lora.target_modules: [auto, all-linear, [q_a_proj, kv_a_proj_with_mqa]]
    data.sources.1.ratio: {type: float, low: 0.1, high: 0.5}
    method.prefix.num_virtual_tokens: {type: int, low: 8, high: 32, when: {method.name: prefix}}

A parameter can be conditional (`when`: a key of the space or of the config, and the value or list of values
under which the parameter exists). Keys of a method's own section are conditional on that method by
themselves (`method.lora.*` on lora, dora and qlora, `method.prefix.*` on prefix, ...), so searching
`method.name` searches each method's settings only where they act. Optuna's define-by-run trials take
such spaces as they are; the grid sampler needs a finite set per parameter (choices, ints, or floats with a
step).

Every candidate is checked against the config's own validation before the first trial: an unknown key
(with a did-you-mean), low above high, a value of the wrong type or out of a field's range stop with one
message naming `tune.space.<key>`. Keys whose change would make the trials' validation losses incomparable
(the model and its tokenizer, the data's split, cleaning and tokenisation) are refused: only what acts on
the training split (mixing ratios, balance, augmentation) is searchable in `data`.

Our own code because Optuna has no notion of a config file: it samples named values; reading the YAML
space, checking it against seektune's config and writing the values back into a config is ours.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from seektune.config import SeektuneConfig, validate_config
from seektune.errors import UserError

TYPES = ("float", "int", "categorical")
# The methods whose own config section each `method.<section>.*` key belongs to.
_METHOD_SECTIONS = {
    "lora": ("lora", "dora", "qlora"),
    "freeze": ("freeze",),
    "adapter": ("adapter",),
    "prefix": ("prefix",),
}
# Keys that cannot be searched, and why.
_REFUSED = {
    "tune": "it configures the search itself",
    "name": "it names the run",
    "output_dir": "it is where runs are written",
    "model": "a different model or tokenizer makes the trials' validation losses incomparable",
    "eval": "evaluation settings do not change the trained model",
    "compress": "compression runs after the search",
    "serve": "serving does not change the trained model",
    "registry": "the registry does not change the trained model",
}
# Data keys that act on the training split only (the validation examples stay the same across trials).
_TRAINING_DATA = ("data.mix.", "data.balance.", "data.augment.")


@dataclass(frozen=True)
class Param:
    """One searched key: its distribution and the condition under which it exists."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def labels(self) -> list[Any]:
        """Categorical choices as Optuna stores them (lists and mappings as their JSON text)."""
        return [_label(choice) for choice in self.choices]

    def value_of(self, label: Any) -> Any:
        """The config value of an Optuna categorical label."""
        for choice in self.choices:
            if _label(choice) == label:
                return choice
        raise KeyError(label)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (what a study stores to recognise its own space)."""
        return {
            "type": self.type,
            **(
                {"low": self.low, "high": self.high, "log": self.log, "step": self.step}
                if self.low is not None
                else {}
            ),
            **({"choices": list(self.choices)} if self.type == "categorical" else {}),
            **({"when": {key: list(values) for key, values in self.when}} if self.when else {}),
        }


def parse_space(cfg: SeektuneConfig) -> list[Param]:
    """The parameters of `cfg.tune.space`, each checked against the config (UserError on the first fault)."""
    raw = cfg.tune.space
    if not raw:
        raise UserError(
            "tune.space is empty, so there is nothing to search: add keys, e.g. "
            "train.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}"
        )
    dump = cfg.model_dump(mode="json")
    params = [_parse_one(str(key), spec, dump) for key, spec in raw.items()]
    for param in params:
        _check_values(cfg, param)
    _check_conditions(cfg, params)
    return params


def _parse_one(key: str, spec: Any, dump: dict[str, Any]) -> Param:
    where = f"tune.space.{key}"
    _check_key(key, dump)
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise UserError(
            f"{where}: give a list of choices or a mapping with type (float, int or categorical), "
            f"e.g. {{type: float, low: 1.0e-5, high: 1.0e-3, log: true}} (got {spec!r})"
        )
    allowed = {"type", "low", "high", "log", "step", "choices", "when"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in TYPES:
        raise UserError(f"{where}.type must be one of {', '.join(TYPES)} (got {kind!r})")
    when = _parse_when(where, spec.get("when"))
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: a categorical parameter needs a non-empty list of choices")
        if len({_label(c) for c in choices}) < len(choices):
            raise UserError(f"{where}: the choices repeat a value; list each once")
        return Param(key, kind, choices=tuple(choices), when=when)
    return _numeric(where, key, kind, spec, when)


def _numeric(where: str, key: str, kind: str, spec: dict[str, Any], when: Any) -> Param:
    number = float if kind == "float" else int
    bounds = {}
    for name in ("low", "high"):
        value = spec.get(name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind == "int" and value != int(value))
        ):
            raise UserError(
                f"{where}.{name} must be {'a number' if kind == 'float' else 'an integer'} (got {value!r})"
            )
        bounds[name] = number(value)
    low, high = bounds["low"], bounds["high"]
    if low > high:
        raise UserError(f"{where}: low ({low}) is above high ({high}); swap them")
    log = bool(spec.get("log", False))
    step = spec.get("step")
    if log and low <= 0:
        raise UserError(f"{where}: a log scale needs low above 0 (got {low})")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise UserError(f"{where}.step must be a positive number (got {step!r})")
        if log:
            raise UserError(f"{where}: Optuna takes either log: true or a step, not both; drop one")
        step = number(step)
    return Param(key, kind, low=low, high=high, log=log, step=step, when=when)


def _parse_when(where: str, when: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise UserError(f"{where}.when must map a key to its value(s), e.g. {{method.name: [lora, dora]}}")
    return tuple((str(k), tuple(v) if isinstance(v, list) else (v,)) for k, v in when.items())


def _check_key(key: str, dump: dict[str, Any]) -> None:
    where = f"tune.space.{key}"
    top = key.split(".", 1)[0]
    if top in _REFUSED:
        raise UserError(f"{where}: {top} cannot be searched: {_REFUSED[top]}")
    if top == "data" and not (key.startswith(_TRAINING_DATA) or _is_source_ratio(key)):
        raise UserError(
            f"{where}: only what acts on the training split is searchable in data (data.sources.N.ratio, "
            "data.mix.*, data.balance.*, data.augment.*): other data keys change the validation examples, "
            "so the trials' validation losses would not compare"
        )
    node: Any = dump
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        here = ".".join(parts[:depth]) or "the top level"
        options = [str(i) for i in range(len(node))] if isinstance(node, list) else list(node or {})
        hint = difflib.get_close_matches(part, options, n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(
            f"{where}: no config key {key!r}{did_you_mean}; {here} has: {', '.join(options) or 'nothing'}"
        )
    if isinstance(node, dict):
        raise UserError(f"{where}: {key} is a section; search one of its keys: {', '.join(node)}")


def _is_source_ratio(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 4 and parts[1] == "sources" and parts[2].isdigit() and parts[3] == "ratio"


def _check_values(cfg: SeektuneConfig, param: Param) -> None:
    """Every bound or choice must make a valid config on its own (types, ranges, literal values)."""
    candidates = list(param.choices) if param.type == "categorical" else [param.low, param.high]
    for value in candidates:
        try:
            apply_values(cfg, {param.key: value})
        except UserError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise UserError(f"tune.space.{param.key}: {value!r} does not fit the config: {detail}") from None


def _check_conditions(cfg: SeektuneConfig, params: list[Param]) -> None:
    searched = {p.key for p in params}
    for param in params:
        for key, _ in param.when:
            if key not in searched:
                _check_key_exists(cfg, key, f"tune.space.{param.key}.when")
        method = _method_section(param.key)
        if method and "method.name" not in searched and cfg.method.name not in _METHOD_SECTIONS[method]:
            raise UserError(
                f"tune.space.{param.key} acts only with method.name {' or '.join(_METHOD_SECTIONS[method])}, "
                f"but method.name is {cfg.method.name} and not searched: remove the key or search method.name"
            )


def _check_key_exists(cfg: SeektuneConfig, key: str, where: str) -> None:
    try:
        _check_key(key, cfg.model_dump(mode="json"))
    except UserError as exc:
        raise UserError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None


def _method_section(key: str) -> str | None:
    parts = key.split(".")
    return parts[1] if parts[0] == "method" and len(parts) > 2 and parts[1] in _METHOD_SECTIONS else None


# ---------------------------------------------------------------------------------------------------------
# Sampling and applying


def suggest(trial: Any, params: list[Param], cfg: SeektuneConfig) -> dict[str, Any]:
    """Sample the parameters that exist in this trial (conditions against earlier values and the config)."""
    values: dict[str, Any] = {}
    for param in params:
        if not _active(param, values, cfg):
            continue
        if param.type == "categorical":
            values[param.key] = param.value_of(trial.suggest_categorical(param.key, param.labels()))
        elif param.type == "int":
            values[param.key] = trial.suggest_int(
                param.key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log
            )
        else:
            values[param.key] = trial.suggest_float(
                param.key, float(param.low), float(param.high), step=param.step, log=param.log
            )
    return values


def _active(param: Param, values: dict[str, Any], cfg: SeektuneConfig) -> bool:
    conditions = list(param.when)
    method = _method_section(param.key)
    if method:
        conditions.append(("method.name", _METHOD_SECTIONS[method]))
    return all(_current(key, values, cfg) in allowed for key, allowed in conditions)


def _current(key: str, values: dict[str, Any], cfg: SeektuneConfig) -> Any:
    if key in values:
        return values[key]
    node: Any = cfg.model_dump(mode="json")
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def apply_values(cfg: SeektuneConfig, values: dict[str, Any]) -> SeektuneConfig:
    """`cfg` with the dotted keys set to `values`, validated like a config file."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return validate_config(raw, "tune trial")


def config_values(cfg: SeektuneConfig, params: list[Param]) -> dict[str, Any]:
    """The config's own value of every parameter that exists for it (the baseline trial), as Optuna params.

    A value outside the searched range is left out (Optuna's distributions could not hold it): the baseline
    then samples that parameter.
    """
    values: dict[str, Any] = {}
    for param in params:
        if not _active(param, values, cfg):
            continue
        value = _current(param.key, values, cfg)
        if param.type == "categorical":
            if _label(value) in param.labels():
                values[param.key] = _label(value)
        elif isinstance(value, (int, float)) and param.low <= value <= param.high:
            values[param.key] = value
    return values


def grid_space(params: list[Param]) -> dict[str, list[Any]]:
    """The finite grid of every parameter (Optuna's GridSampler); UserError where one is continuous."""
    grid: dict[str, list[Any]] = {}
    for param in params:
        if param.type == "categorical":
            grid[param.key] = param.labels()
        elif param.type == "int" and not param.log:
            grid[param.key] = list(range(int(param.low), int(param.high) + 1, int(param.step or 1)))
        elif param.type == "float" and param.step is not None:
            count = math.floor((param.high - param.low) / param.step + 1e-9) + 1
            grid[param.key] = [round(param.low + i * param.step, 12) for i in range(count)]
        else:
            raise UserError(
                f"tune.sampler grid needs a finite set of values per key, but tune.space.{param.key} is "
                f"continuous{' on a log scale' if param.log else ''}: list its values as choices "
                "(e.g. [1.0e-4, 3.0e-4, 1.0e-3]) or give a step"
            )
    return grid


def space_signature(params: list[Param]) -> str:
    """The space as canonical JSON: a study remembers it and refuses a different one under its name."""
    return json.dumps({p.key: p.describe() for p in params}, sort_keys=True)


def _label(choice: Any) -> Any:
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return json.dumps(choice, sort_keys=True)
