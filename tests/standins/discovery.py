"""Google's own reference for its REST APIs, held against what a stand-in answers: the discovery documents that PyPI's
google-api-python-client ships (googleapiclient/discovery_cache/documents/). Nobody here wrote them.

`problems(doc, method, path, status, body)` finds the API method a request was for (by HTTP method and path template),
then checks the answer against the method's response schema: no field the schema lacks, every field of the type it
names, every enum as its number (the REST client asks for `enum-encoding=int`) and one the reference knows, and the
`Any` values of operations (`response`, `metadata`) against the schema their `@type` names. An error answer is checked
against Google's error body (`code`, `message`, `status`, `details` whose entries carry an `@type`).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

TYPE_PREFIX = "type.googleapis.com/google.cloud.tpu.v2."
OTHER_TPU_TYPES = "type.googleapis.com/google.cloud.tpu."  # a v2 answer never names another version's types


@cache
def document(name: str) -> dict[str, Any]:
    """A discovery document by file name ("tpu.v2.json"), from the installed google-api-python-client."""
    import googleapiclient

    return json.loads((Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / name).read_text())


def methods(doc: dict[str, Any]) -> list[tuple[str, re.Pattern[str], dict[str, Any]]]:
    """(HTTP method, path pattern, method) for every method of the document."""
    found = []

    def walk(resource: dict[str, Any]) -> None:
        for method in resource.get("methods", {}).values():
            template = method.get("flatPath") or method["path"]
            pattern = re.escape(template)
            pattern = re.sub(r"\\\{[^}]+\\\}", "[^/:]+", pattern)
            found.append((method["httpMethod"], re.compile(f"^/?{pattern}$"), method))
        for child in resource.get("resources", {}).values():
            walk(child)

    walk(doc)
    return found


def method_for(doc: dict[str, Any], http_method: str, path: str) -> dict[str, Any] | None:
    path = path.lstrip("/")
    matches = [m for verb, pattern, m in methods(doc) if verb == http_method and pattern.match(path)]
    # the most specific template wins (".../nodes/{id}" over ".../{+name}")
    return max(matches, key=lambda m: len(m.get("flatPath", "")), default=None)


def problems(
    doc: dict[str, Any], http_method: str, path: str, status: int, body: Any, enums_as_numbers: bool = True
) -> list[str]:
    """What is wrong with `body`, the answer to `http_method path` with HTTP `status`, by the document; enums are
    numbers where the request asked for `$alt=json;enum-encoding=int` (`enums_as_numbers`), else their names."""
    if status >= 400:
        return _error_problems(body)
    method = method_for(doc, http_method, path)
    if method is None:
        return [f"{http_method} {path}: no method of {doc['name']} {doc['version']} has this path"]
    ref = method.get("response", {}).get("$ref")
    if ref is None:
        return [] if body in ({}, None) else [f"{http_method} {path}: answered a body where the method returns none"]
    return Checker(doc, enums_as_numbers).check(body, {"$ref": ref}, ref)


def _error_problems(body: Any) -> list[str]:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(body) != {"error"}:
        return [f"an error answer is not {{'error': {{...}}}}: {body!r}"]
    found = [
        f"error.{k}: not in Google's error body" for k in error if k not in ("code", "message", "status", "details")
    ]
    if not isinstance(error.get("code"), int) or not isinstance(error.get("message"), str):
        found.append(f"error without an int code and a message: {error!r}")
    for detail in error.get("details", []):
        if not isinstance(detail, dict) or "@type" not in detail:
            found.append(f"error.details entry without @type: {detail!r}")
    return found


def enum_numbers(owner: str | None, field: str | None) -> dict[int, str]:
    """Number -> name of the enum field `field` (camelCase) of message `owner`, from the protos google-cloud-tpu was
    generated from (the discovery document names an enum's values but not their numbers, which skip: TIMEOUT is 3)."""
    if owner is None or field is None:
        return {}
    from google.cloud import tpu_v2

    message = getattr(tpu_v2, owner, None)
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", field).lower()
    proto_field = getattr(getattr(message, "meta", None), "fields", {}).get(snake)
    enum = getattr(proto_field, "enum", None)
    return {member.value: name for name, member in enum.__members__.items()} if enum is not None else {}


class Checker:
    """Holds answers to one document; enums as numbers or as names, as the request asked."""

    def __init__(self, doc: dict[str, Any], enums_as_numbers: bool):
        self.doc, self.enums_as_numbers = doc, enums_as_numbers

    def check(
        self, value: Any, schema: dict[str, Any], where: str, owner: str | None = None, field: str | None = None
    ) -> list[str]:
        """Problems of `value` against `schema` (a property `field` of schema `owner`, or {"$ref": NAME})."""
        if "$ref" in schema:
            schema = self.doc["schemas"][schema["$ref"]]
        kind = schema.get("type")
        if kind == "any":
            return []
        if "enum" in schema:
            return self._enum(value, schema["enum"], where, owner, field)
        if kind == "object":
            return self._object(value, schema, where)
        if kind == "array":
            if not isinstance(value, list):
                return [f"{where}: {value!r} is not an array"]
            return [p for i, item in enumerate(value) for p in self.check(item, schema["items"], f"{where}[{i}]")]
        if kind == "integer":  # int32 and uint32 travel as JSON numbers (int64 as strings: type "string")
            ok = isinstance(value, int) and not isinstance(value, bool)
            return [] if ok else [f"{where}: {value!r} is not an integer"]
        expected = {"string": str, "boolean": bool, "number": (int, float)}
        if kind in expected and not isinstance(value, expected[kind]):
            return [f"{where}: {value!r} is not a {kind}"]
        return []

    def _enum(self, value: Any, names: list[str], where: str, owner: str | None, field: str | None) -> list[str]:
        if not self.enums_as_numbers:
            return [] if value in names else [f"{where}: {value!r} is none of the values the reference knows"]
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: {value!r} is not an enum number (the request asked for enum-encoding=int)"]
        numbers = enum_numbers(owner, field)
        if numbers and numbers.get(value) not in names:
            return [f"{where}: {value} is none of the values the reference knows ({', '.join(names)})"]
        return []

    def _object(self, value: Any, schema: dict[str, Any], where: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object"]
        kind = str(value.get("@type", ""))
        if kind.startswith(OTHER_TPU_TYPES) and not kind.startswith(TYPE_PREFIX):
            return [f"{where}: @type {kind} is none the reference knows (another API version's)"]
        if kind.startswith(TYPE_PREFIX):  # an Any: held to the schema it names
            named = value["@type"].removeprefix(TYPE_PREFIX)
            if named not in self.doc["schemas"]:
                return [f"{where}: @type {value['@type']} is no schema of the reference"]
            rest = {k: v for k, v in value.items() if k != "@type"}
            return self.check(rest, {"$ref": named}, f"{where}<{named}>")
        found = []
        properties, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += self.check(item, properties[key], f"{where}.{key}", schema.get("id"), key)
            elif extra is not None:
                found += self.check(item, extra, f"{where}[{key!r}]")
            else:
                found.append(f"{where}.{key}: a field {schema.get('id', where)} does not have")
        return found


def held_to_reference(api: Any, reference: str, service_path: str = "", enums_as_numbers: bool = True) -> None:
    """Every answer `api` (a jsonapi.JsonApi) gave, held to Google's discovery document `reference` for it (as
    conftest does the TPU stand-in's); enums as names where the API's client reads them so (Compute Engine's)."""
    doc = document(reference)
    found = [
        f"{a.request.method} {a.request.path} -> {a.status}: {problem}"
        for a in api.answers
        for problem in problems(
            doc, a.request.method, a.request.path.removeprefix(service_path), a.status, a.body, enums_as_numbers
        )
    ]
    assert not found, f"{type(api).__name__} answered unlike {reference}:\n" + "\n".join(found[:20])
