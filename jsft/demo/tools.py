"""The demo's two tools: their JSON schemas (what the model is shown) and their implementations (what runs).

The data generator and the validation episodes both execute calls through `run_tool`, so a reference
conversation and a live episode can never disagree about a tool's result.
"""

import json
from typing import Any

# A fixed, fictional table: the model cannot know these facts, so it must call `lookup` and copy the result.
COUNTRIES = {
    "Avalor": {"capital": "Brightwater", "population": 4821},
    "Brenmark": {"capital": "Tollgate", "population": 1375},
    "Corvia": {"capital": "Redhill", "population": 9204},
    "Dunmere": {"capital": "Ashford", "population": 2650},
    "Eldoria": {"capital": "Silverpine", "population": 7318},
    "Fenwick": {"capital": "Marlow", "population": 583},
    "Galdor": {"capital": "Stonebridge", "population": 6047},
    "Harrowin": {"capital": "Oakmere", "population": 3192},
    "Istrel": {"capital": "Windhaven", "population": 8465},
    "Jorvald": {"capital": "Kingsport", "population": 1909},
    "Kestria": {"capital": "Fallowmoor", "population": 5736},
    "Lunmark": {"capital": "Greywick", "population": 2284},
}
FIELDS = ("capital", "population")
OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Add, subtract or multiply two integers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "op": {"type": "string", "enum": list(OPS)},
                    "a": {"type": "integer"},
                    "b": {"type": "integer"},
                },
                "required": ["op", "a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up the capital or population of a country.",
            "parameters": {
                "type": "object",
                "properties": {
                    "country": {"type": "string", "enum": list(COUNTRIES)},
                    "field": {"type": "string", "enum": list(FIELDS)},
                },
                "required": ["country", "field"],
                "additionalProperties": False,
            },
        },
    },
]


def run_tool(name: str, arguments: dict) -> Any:
    """Execute one call whose arguments already fit the tool's schema (see `protocol.checked_calls`)."""
    if name == "calculator":
        return OPS[arguments["op"]](arguments["a"], arguments["b"])
    if name == "lookup":
        return COUNTRIES[arguments["country"]][arguments["field"]]
    raise ValueError(f"unknown tool {name!r}; known: calculator, lookup")


def tool_response(value: Any) -> str:
    """The content of the `tool` message carrying a result; one shape for every tool keeps the language small."""
    return json.dumps({"result": value})
