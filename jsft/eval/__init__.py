"""Evaluation of generations: tool calls parsed in the chat template's own format (`tool_calls`), their
JSON-schema check (`schema`), and validation by generation on held-out prompts (`generation`)."""
