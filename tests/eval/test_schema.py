import pytest

from jsft.eval.schema import schema_error

SCHEMA = {
    "type": "object",
    "properties": {"op": {"type": "string", "enum": ["add", "sub"]}, "n": {"type": "integer"},
                   "xs": {"type": "array", "items": {"type": "number"}}},
    "required": ["op"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("value", [{"op": "add"}, {"op": "sub", "n": -3, "xs": [1, 2.5]}])
def test_fitting_values(value):
    assert schema_error(SCHEMA, value) is None


@pytest.mark.parametrize("value, fragment", [
    ([], "expected object"),
    ({}, "missing required property 'op'"),
    ({"op": "div"}, "not one of"),
    ({"op": "add", "n": "3"}, "$.n: expected integer"),
    ({"op": "add", "n": True}, "$.n: expected integer"),  # JSON true is not an integer, though Python agrees
    ({"op": "add", "n": 1.5}, "$.n: expected integer"),
    ({"op": "add", "xs": [1, "2"]}, "$.xs[1]: expected number"),
    ({"op": "add", "extra": 1}, "unexpected property 'extra'"),
])
def test_violations_name_the_path_and_reason(value, fragment):
    assert fragment in schema_error(SCHEMA, value)


def test_unsupported_types_raise():
    with pytest.raises(ValueError, match="unsupported schema type"):
        schema_error({"type": "int"}, 1)
