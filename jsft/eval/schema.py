"""The small JSON-schema subset tool definitions use: type, enum, properties, required, additionalProperties, items.

Written here rather than depending on `jsonschema`, which jsft does not declare: a tool call "fits its schema" when
`schema_error` returns None.
"""

from typing import Any, Optional

# JSON type name -> Python check. bool is excluded from the numeric types because `True` is an int in Python but
# `true` is not an integer in JSON.
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_error(schema: dict, value: Any, path: str = "$") -> Optional[str]:
    """The first way `value` violates `schema`, as '<json path>: <reason>', or None when it fits."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        unknown = [t for t in names if t not in _TYPES]
        if unknown:
            raise ValueError(f"unsupported schema type {unknown} at {path}; supported: {sorted(_TYPES)}")
        if not any(_TYPES[t](value) for t in names):
            return f"{path}: expected {' or '.join(names)}, got {type(value).__name__} {value!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: {value!r} is not one of {schema['enum']}"
    if isinstance(value, dict):
        return _object_error(schema, value, path)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            if error := schema_error(schema["items"], item, f"{path}[{i}]"):
                return error
    return None


def _object_error(schema: dict, value: dict, path: str) -> Optional[str]:
    properties = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in value:
            return f"{path}: missing required property {key!r}"
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            sub_schema = properties[key]
        elif extra is False:
            return f"{path}: unexpected property {key!r}"
        elif isinstance(extra, dict):
            sub_schema = extra
        else:
            continue
        if error := schema_error(sub_schema, item, f"{path}.{key}"):
            return error
    return None
