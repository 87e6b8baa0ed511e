"""Real answers checked against the schemas the OpenAPI document publishes (prerec/schemas.py)."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator

from prerec.schemas import SCHEMAS


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for a schema that may $ref the components, as the OpenAPI document does."""
    document = {**schema, "components": {"schemas": SCHEMAS}}
    return Draft202012Validator(document, format_checker=Draft202012Validator.FORMAT_CHECKER)


def check(name: str, value: Any) -> None:
    """Raise jsonschema.ValidationError unless `value` has the shape named `name`."""
    validator({"$ref": f"#/components/schemas/{name}"}).validate(value)
