"""Generated JSON schemas for the structured-output tests: nested objects, arrays, enums, bounded
numbers, required fields. Small on purpose (short strings, few items), so outputs stay short."""
from __future__ import annotations

import random
from typing import Any

_WORDS = ["name", "id", "city", "score", "tags", "kind", "level", "owner", "items", "price", "color", "size",
          "active", "count", "label", "note", "rank", "zone"]


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "const", "null"])
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 6)}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
    if kind == "number":
        lo = rng.randint(-10, 10)
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 20)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", 1, 2, True], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["v1", 7, False])}
    return {"type": "null"}


def _node(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if depth > 0 and roll < 0.35:
        return _object(rng, depth - 1)
    if depth > 0 and roll < 0.55:
        return {"type": "array", "items": _node(rng, depth - 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 2)}
    return _leaf(rng)


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(_WORDS, rng.randint(1, 3 if depth == 0 else 2))
    props = {n: _node(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": required}
    if rng.random() < 0.5:
        schema["additionalProperties"] = False
    return schema


def generated_schemas(count: int = 50, seed: int = 17) -> list[dict[str, Any]]:
    """``count`` schemas, deterministic for a seed; objects at the top, up to 2 levels of nesting."""
    rng = random.Random(seed)
    return [_object(rng, depth=rng.randint(0, 2)) for _ in range(count)]
