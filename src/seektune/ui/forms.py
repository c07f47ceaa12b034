"""The launch form, built from the config's own pydantic models, and its values back into a config.

Every field of `SeektuneConfig` becomes an input with its default and its description, section by
section (a section's sub-sections nest). What a field holds decides the input: a yes/no choice for a
bool, a list of the allowed values for a Literal, a text box otherwise; lists, mappings and unions that
hold sections take YAML (`[a, b]`, `{k: v}`). Only what differs from the starting config is applied, and
the result goes through `validate_config`, the CLI's own validation, so a wrong value gets the CLI's
message ("train.max_steps: input should be a valid integer ...").

Why our own code: form generators for pydantic (e.g. for Streamlit or Gradio) bind to their UI library;
the dashboard serves plain HTML forms.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from seektune.config import SeektuneConfig, validate_config
from seektune.errors import UserError


@dataclass
class FormField:
    key: str  # dotted path: train.learning_rate
    label: str
    kind: str  # "bool", "choice", "text", "yaml"
    description: str
    value: str  # as shown in the input
    choices: list[str] = field(default_factory=list)
    optional: bool = False
    number: bool = False  # an int or float field
    values: list[Any] = field(default_factory=list)  # a Literal's values, as the config holds them
    default: str = ""  # the schema's default, as shown in the input


@dataclass
class FormSection:
    key: str
    title: str
    description: str
    fields: list[FormField] = field(default_factory=list)
    sections: list[FormSection] = field(default_factory=list)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], optional
        return annotation, optional
    return annotation, False


def _section_class(annotation: Any) -> type[BaseModel] | None:
    inner, optional = _unwrap_optional(annotation)
    if (
        not optional
        and typing.get_origin(inner) is None  # list[X] passes isinstance(_, type) on Python 3.11
        and isinstance(inner, type)
        and issubclass(inner, BaseModel)
    ):
        return inner
    return None


def _kind(annotation: Any) -> tuple[str, list[Any]]:
    inner, _ = _unwrap_optional(annotation)
    if inner is bool:
        return "bool", [True, False]
    if typing.get_origin(inner) is Literal:
        return "choice", list(typing.get_args(inner))
    if inner in (int, float, str, Path):
        return "text", []
    return "yaml", []


def show_value(value: Any, kind: str) -> str:
    """How a config value is written in its input."""
    if value is None:
        return ""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "yaml":
        if isinstance(value, str) and _yaml_or_text(value) == value:
            return value  # a plain word ("auto") reads back as itself
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000)
        return text.removesuffix("\n").removesuffix("\n...").strip()  # a scalar's document end marker
    return str(value)


def _yaml_or_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _build(
    model: type[BaseModel], values: dict[str, Any], prefix: str, title: str, description: str
) -> FormSection:
    section = FormSection(prefix, title, description)
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        nested = _section_class(info.annotation)
        value = values.get(name)
        if nested is not None and isinstance(value, dict):
            section.sections.append(_build(nested, value, key, name, info.description or ""))
            continue
        kind, allowed = _kind(info.annotation)
        inner, optional = _unwrap_optional(info.annotation)
        choices = [show_value(v, kind) for v in allowed]
        if kind == "choice" and optional:
            choices.insert(0, "")
        section.fields.append(
            FormField(
                key,
                name,
                kind,
                info.description or "",
                show_value(value, kind),
                choices,
                optional,
                number=inner in (int, float),
                values=allowed,
                default=show_value(to_jsonable_python(info.get_default(call_default_factory=True)), kind),
            )
        )
    return section


def config_form(raw: dict[str, Any] | None = None) -> FormSection:
    """The form of the whole config, filled with `raw` (a config file's contents) over the defaults."""
    cfg = validate_config(raw or {}, "the starting config")
    return _build(SeektuneConfig, cfg.model_dump(mode="json"), "", "config", "")


def _fields(section: FormSection) -> dict[str, FormField]:
    out = {f.key: f for f in section.fields}
    for sub in section.sections:
        out.update(_fields(sub))
    return out


def _parse(formfield: FormField, text: str) -> Any:
    """The value of one input: YAML for numbers, lists and mappings (so that '1e-4' is a float and 'abc'
    stays text for the validator to refuse), the text itself for strings and paths."""
    if text.strip() == "" and formfield.optional:
        return None
    if formfield.kind == "bool":
        return {"true": True, "false": False}.get(text.strip().lower(), text)
    if formfield.kind == "choice":
        return next((v for v in formfield.values if str(v) == text), text)
    if formfield.kind == "yaml" or formfield.number:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            if formfield.number:
                return text
            raise UserError(
                f"{formfield.key}: not valid YAML ({getattr(exc, 'problem', None) or exc}): write e.g. "
                "[a, b] or {k: v}"
            ) from None
    return text


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def config_from_form(
    base: dict[str, Any] | None, submitted: dict[str, str]
) -> tuple[SeektuneConfig, list[str]]:
    """The config from the starting config `base` and the form's values: only fields whose text differs
    from the starting value are applied. Returns the validated config and the changed keys; a UserError
    (the CLI's message) when a value is wrong."""
    raw: dict[str, Any] = yaml.safe_load(yaml.safe_dump(base or {})) or {}
    known = _fields(config_form(base))
    changed = []
    for key, text in submitted.items():
        formfield = known.get(key)
        text = text.replace("\r\n", "\n")  # browsers send a textarea's new lines as CRLF
        if formfield is None or text == formfield.value:
            continue
        value = _parse(formfield, text)
        if value == _parse(formfield, formfield.value):  # written differently, same value (1e-4, 0.0001)
            continue
        _set(raw, key, value)
        changed.append(key)
    return validate_config(raw, "the form"), changed
