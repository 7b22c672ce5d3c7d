"""Hypothesis strategies from an OpenAPI 3.1 document: for every operation, requests valid by its schemas and
requests that break them, so that a fuzz of an app covers each route and field the app declares.

:func:`operations` lists the document's operations. :class:`SchemaStrategies` turns a JSON Schema of the document
into two strategies, one keyword family per method:

- :meth:`SchemaStrategies.valid`: values the schema accepts (``$ref``, ``const``/``enum``, ``anyOf``/``oneOf`` with
  a discriminator, objects with ``properties``/``required``/``additionalProperties``, arrays, strings with
  ``minLength``/``maxLength``/``pattern``, integers and numbers with their bounds), drawing strings partly from a
  pool of known values (real ids, so that valid requests get past validation and reach the app's rules);
- :meth:`SchemaStrategies.broken`: a value that breaks one thing, said by :class:`Broken` (a required field
  dropped, a wrong type, a bound overstepped, a value outside an enum, a non-finite number, deep nesting, an unknown
  field, control characters), at a path into the value.

:meth:`SchemaStrategies.requests` combines them into whole :class:`Request` objects: path parameters (plus hostile
strings: traversal, odd characters), query parameters and JSON bodies, encoded with :func:`encode_json`, which
writes NaN and the infinities as the JSON tokens Python's ``json`` reads, and :class:`RawToken` text as it is.

Not covered: ``allOf`` of more than one schema (drawn from the first, kept when it fits the others' types),
``uniqueItems``, ``format``, string ``pattern`` beyond what :func:`hypothesis.strategies.from_regex` reads, header
and cookie parameters (left out), and non-JSON request bodies (left out).
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
JSON_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
# Path segments no valid id looks like: traversal (plain and encoded), NUL, bidi override, overlong, look-alikes.
HOSTILE_PATH_VALUES: tuple[str, ...] = ("../../keys.json", "..%2F..%2Fetc%2Fpasswd", "..", "\x00", "\u202e")
HOSTILE_PATH_VALUES += ("a" * 300, " ", "%00", "gen-" + "0" * 16, "é/../ü")
NON_FINITE_TOKENS = ("NaN", "Infinity", "-Infinity", "1e999")
DEEP_NESTING = 3000  # levels: past Python's default recursion limit
CONTROL_CHARACTERS = "\x00\x01\x08\x0b\x1b\x1f\x7f\u2028"
MAX_TEXT = 40  # the longest string drawn where a schema sets no maxLength

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12))
any_json: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@dataclass(frozen=True)
class RawToken:
    """JSON text written into a body as it is: what no Python value encodes to (``1e999``, a lone surrogate
    escape, nesting deeper than an encoder recurses)."""

    text: str


@dataclass(frozen=True)
class Broken:
    """A value that breaks its schema in one way: ``kind`` says how, ``at`` where (keys and indexes into ``value``;
    for ``missing-required`` the path of the field left out, for ``unknown-field`` that of the field added)."""

    value: Any
    kind: str
    at: tuple[str | int, ...] = ()

    def nested(self, value: Any, step: str | int) -> Broken:
        return Broken(value, self.kind, (step, *self.at))

    def describe(self) -> str:
        return f"{'.'.join(map(str, self.at)) or 'value'}: {self.kind}"


@dataclass(frozen=True)
class Parameter:
    name: str
    location: str  # path or query
    required: bool
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class Operation:
    """One method of one path of the document."""

    method: str  # upper case
    path: str  # the template, e.g. /designs/{design_id}
    parameters: tuple[Parameter, ...]
    body: Mapping[str, Any] | None  # the application/json requestBody schema
    body_required: bool
    secured: bool  # the operation (or the document) names a security requirement

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class Request:
    """A request drawn for ``operation``; ``breaks`` lists what of it was drawn off the schema (empty: valid by it),
    a hostile path value and control characters included, which may still fit it."""

    operation: Operation
    path: str  # filled in, each value percent-encoded
    path_values: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes | None
    breaks: tuple[str, ...] = field(default=())


def operations(document: Mapping[str, Any]) -> tuple[Operation, ...]:
    """Every operation of the document, in its order."""
    found = []
    secured_by_default = bool(document.get("security"))
    for path, item in document.get("paths", {}).items():
        shared = item.get("parameters", [])
        for method in HTTP_METHODS:
            if method not in item:
                continue
            operation = item[method]
            parameters = tuple(
                Parameter(p["name"], p["in"], bool(p.get("required", p["in"] == "path")), p.get("schema", {}))
                for p in (*shared, *operation.get("parameters", []))
                if p["in"] in ("path", "query")
            )
            request_body = operation.get("requestBody", {})
            body = request_body.get("content", {}).get("application/json", {}).get("schema")
            security = operation.get("security")
            secured = bool(security) if security is not None else secured_by_default
            found.append(Operation(method.upper(), path, parameters, body, bool(request_body.get("required")), secured))
    return tuple(found)


def json_type(value: Any) -> str:
    """The JSON Schema type of a decoded value (a float with no fraction is an integer, as JSON Schema says)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def encode_json(value: Any) -> bytes:
    """JSON text of ``value``: NaN and the infinities as the tokens ``NaN``/``Infinity``, :class:`RawToken` as is."""
    if isinstance(value, RawToken):
        return value.text.encode("utf-8", "surrogatepass")
    if isinstance(value, dict):
        items = (json.dumps(str(k)).encode() + b":" + encode_json(v) for k, v in value.items())
        return b"{" + b",".join(items) + b"}"
    if isinstance(value, list | tuple):
        return b"[" + b",".join(encode_json(v) for v in value) + b"]"
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


class SchemaStrategies:
    """Strategies for the schemas of one OpenAPI document.

    ``strings`` are known values (ids, prompts) drawn for about half the strings whose schema they fit; ``fields``
    are strategies for properties by name (a timestamp near now for ``ts``), drawn for about half of those
    properties where the value fits the property's schema."""

    def __init__(
        self,
        document: Mapping[str, Any],
        strings: Sequence[str] = (),
        fields: Mapping[str, st.SearchStrategy[Any]] | None = None,
    ) -> None:
        self.document = document
        self.strings = tuple(strings)
        self.fields = dict(fields or {})

    # ------------------------------------------------------------------------------------------------ $ref

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """The schema a ``$ref`` points to (local references, ``#/...``), followed until there is none."""
        seen = set()
        while "$ref" in schema:
            ref = schema["$ref"]
            if not ref.startswith("#/") or ref in seen:
                raise ValueError(f"$ref: {ref!r} is not a local, acyclic reference; only #/... are resolved")
            seen.add(ref)
            target: Any = self.document
            for part in ref[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            schema = target
        return schema

    def allowed_types(self, schema: Mapping[str, Any]) -> set[str]:
        """The JSON types some value of the schema has (every type when it does not say)."""
        schema = self.resolve(schema)
        if "const" in schema:
            return {json_type(schema["const"])}
        if "enum" in schema:
            return {json_type(value) for value in schema["enum"]}
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            return set().union(*(self.allowed_types(branch) for branch in branches))
        if schema.get("allOf"):
            return set.intersection(*(self.allowed_types(part) for part in schema["allOf"]))
        declared = schema.get("type")
        if declared is None:
            return set(JSON_TYPES)
        types = {declared} if isinstance(declared, str) else set(declared)
        return types | {"integer"} if "number" in types else types

    # -------------------------------------------------------------------------------------------- valid values

    def valid(self, schema: Mapping[str, Any], name: str | None = None) -> st.SearchStrategy[Any]:
        """Values ``schema`` accepts; ``name`` is the property's, for the ``fields`` strategies."""
        if "$ref" in schema:
            ref = schema["$ref"]
            return st.deferred(lambda: self.valid(self.resolve({"$ref": ref}), name))
        drawn = self._valid_by_keyword(schema)
        hint = self.fields.get(name) if name is not None else None
        return drawn if hint is None else st.one_of(drawn, hint.filter(lambda v: self.fits(v, schema)))

    def _valid_by_keyword(self, schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:
        if "const" in schema or "enum" in schema:
            return self._enum(schema)
        if schema.get("oneOf") or schema.get("anyOf"):
            return self._one_of(schema)
        if schema.get("allOf"):
            first, *rest = schema["allOf"]
            return self.valid(first).filter(lambda v: all(json_type(v) in self.allowed_types(s) for s in rest))
        declared = schema.get("type")
        if isinstance(declared, list):
            return st.one_of([self._valid_by_keyword({**schema, "type": one}) for one in declared])
        by_type: dict[str, Callable[[Mapping[str, Any]], st.SearchStrategy[Any]]] = {
            "object": self._object,
            "array": self._array,
            "string": self._string,
        }
        by_type.update(integer=self._integer, number=self._number)
        if declared in by_type:
            return by_type[declared](schema)
        return {"boolean": st.booleans(), "null": st.none()}.get(str(declared), any_json)

    def _enum(self, schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:
        return st.just(schema["const"]) if "const" in schema else st.sampled_from(list(schema["enum"]))

    def _one_of(self, schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:
        """A branch's value; with a discriminator, every mapped branch is drawn with its discriminating value."""
        branches = schema.get("oneOf") or schema.get("anyOf") or []
        discriminator = schema.get("discriminator")
        if discriminator is None:
            return st.one_of([self.valid(branch) for branch in branches])
        prop, mapping = discriminator["propertyName"], discriminator.get("mapping", {})
        mapped = [self.valid({"$ref": ref}).map(_tagged(prop, tag)) for tag, ref in mapping.items()]
        unmapped = [self.valid(b) for b in branches if b.get("$ref") not in mapping.values()]
        return st.one_of(mapped + unmapped)

    def _object(self, schema: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        """Every required property, each optional one or not, and extra ones only where a schema allows them."""
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        fixed = {name: self.valid(properties.get(name, {}), name) for name in required}
        optional = {name: self.valid(sub, name) for name, sub in properties.items() if name not in required}
        drawn = st.fixed_dictionaries(fixed, optional=optional)
        extra = schema.get("additionalProperties")
        if not isinstance(extra, Mapping):
            return drawn
        names = st.text(min_size=1, max_size=8).filter(lambda n: n not in properties)
        return st.tuples(drawn, st.dictionaries(names, self.valid(extra), max_size=2)).map(lambda p: {**p[1], **p[0]})

    def _array(self, schema: Mapping[str, Any]) -> st.SearchStrategy[list[Any]]:
        low = schema.get("minItems", 0)
        high = min(schema.get("maxItems", low + 4), low + 4)
        return st.lists(self.valid(schema.get("items", {})), min_size=low, max_size=high)

    def _string(self, schema: Mapping[str, Any]) -> st.SearchStrategy[str]:
        """Known strings that fit, strings of the bounds' lengths, and others between them (or of the pattern)."""
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        pattern = schema.get("pattern")
        longest = high if high is not None else max(low, MAX_TEXT)
        if pattern is not None:
            drawn = st.from_regex(pattern).filter(lambda s: low <= len(s) <= longest)
        else:
            typical = st.text(min_size=low, max_size=min(longest, max(low, MAX_TEXT)))
            drawn = st.one_of(typical, st.text(min_size=low, max_size=low), st.text(min_size=longest, max_size=longest))
        known = [s for s in self.strings if self.fits(s, schema)]
        return st.one_of(st.sampled_from(known), drawn) if known else drawn

    def _integer(self, schema: Mapping[str, Any]) -> st.SearchStrategy[int]:
        low, high = integer_bounds(schema)
        ends = [bound for bound in (low, high) if bound is not None]
        drawn = st.integers(min_value=low, max_value=high)
        return st.one_of(st.sampled_from(ends), drawn) if ends else drawn

    def _number(self, schema: Mapping[str, Any]) -> st.SearchStrategy[float]:
        exclusive_low, exclusive_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        low = schema.get("minimum", exclusive_low)
        high = schema.get("maximum", exclusive_high)
        return st.floats(
            min_value=low,
            max_value=high,
            exclude_min=low is not None and "minimum" not in schema,
            exclude_max=high is not None and "maximum" not in schema,
            allow_nan=False,
            allow_infinity=False,
        )

    def fits(self, value: Any, schema: Mapping[str, Any]) -> bool:
        """Whether a decoded value fits the schema: type, const/enum, bounds, pattern, items, properties (for the
        ``strings`` and ``fields`` drawn in place of schema-drawn values; oneOf is read as anyOf)."""
        schema = self.resolve(schema)
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            return any(self.fits(value, branch) for branch in branches)
        if json_type(value) not in self.allowed_types(schema):
            return False
        if "const" in schema or "enum" in schema:
            return value in schema.get("enum", [schema.get("const")])
        if isinstance(value, str):
            pattern = schema.get("pattern")
            inside = schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value))
            return inside and (pattern is None or re.search(pattern, value) is not None)
        if isinstance(value, list):
            inside = schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
            return inside and all(self.fits(item, schema.get("items", {})) for item in value)
        if isinstance(value, dict):
            properties = schema.get("properties", {})
            known = all(self.fits(v, properties[k]) for k, v in value.items() if k in properties)
            closed = schema.get("additionalProperties") is False
            return (
                known
                and set(schema.get("required", [])) <= set(value)
                and not (closed and set(value) - set(properties))
            )
        return isinstance(value, bool) or value is None or _within(value, schema)

    # ----------------------------------------------------------------------------------------- broken values

    def broken(self, schema: Mapping[str, Any], wrong_type: bool = True) -> st.SearchStrategy[Broken]:
        """Values that break ``schema`` in one way each, here or in one of its properties or items (``wrong_type``
        False: not by a wrong type of the value itself, for a branch whose wrong type may be another's)."""
        if "$ref" in schema:
            ref = schema["$ref"]
            return st.deferred(lambda: self.broken(self.resolve({"$ref": ref}), wrong_type))
        options = [self._wrong_type(schema) if wrong_type else None, self._deep_nesting(schema)]
        options += self._outside_enum(schema) + self._out_of_bounds(schema) + self._non_finite(schema)
        options += self._control_characters(schema)
        options += self._broken_branch(schema) + self._broken_object(schema) + self._broken_items(schema)
        # Each way to break it equally likely (st.one_of favours its first branches).
        return st.sampled_from([option for option in options if option is not None]).flatmap(lambda option: option)

    def _wrong_type(self, schema: Mapping[str, Any]) -> st.SearchStrategy[Broken] | None:
        wrong = [name for name in JSON_TYPES if name not in self.allowed_types(schema)]
        if not wrong:
            return None
        by_type: dict[str, st.SearchStrategy[Any]] = {
            "null": st.none(),
            "boolean": st.booleans(),
            "integer": st.integers(-(10**6), 10**6),
            "number": st.floats(-1e6, 1e6).map(lambda f: f + 0.5 if f.is_integer() else f),
            "string": st.text(max_size=12),
            "array": st.lists(scalars, max_size=3),
            "object": st.dictionaries(st.text(max_size=8), scalars, max_size=3),
        }
        return st.one_of([by_type[name] for name in wrong]).map(lambda v: Broken(v, "wrong-type"))

    def _deep_nesting(self, schema: Mapping[str, Any]) -> st.SearchStrategy[Broken]:
        def nest(depth: int) -> Broken:
            return Broken(RawToken("[" * depth + "]" * depth), "deep-nesting")

        return st.integers(DEEP_NESTING, DEEP_NESTING + 100).map(nest)

    def _outside_enum(self, schema: Mapping[str, Any]) -> list[st.SearchStrategy[Broken]]:
        schema = self.resolve(schema)
        if "const" not in schema and "enum" not in schema:
            return []
        allowed = schema.get("enum", [schema.get("const")])
        same_type = st.one_of(st.text(max_size=12), st.integers()) if allowed else any_json
        return [same_type.filter(lambda v: v not in allowed).map(lambda v: Broken(v, "outside-enum"))]

    def _out_of_bounds(self, schema: Mapping[str, Any]) -> list[st.SearchStrategy[Broken]]:
        """A number past a bound, a string longer or shorter than allowed, an array of too many or too few items."""
        schema = self.resolve(schema)
        found: list[st.SearchStrategy[Any]] = []
        kind = schema.get("type")
        if kind in ("integer", "number"):
            low, high = integer_bounds(schema)
            if low is not None:
                found.append(st.integers(max_value=low - 1).filter(lambda v: not _within(v, schema)))
            if high is not None:
                found.append(st.integers(min_value=high + 1).filter(lambda v: not _within(v, schema)))
        if kind == "string":
            if schema.get("minLength", 0) > 0:
                found.append(st.text(max_size=schema["minLength"] - 1))
            if "maxLength" in schema:
                found.append(st.text(min_size=schema["maxLength"] + 1, max_size=schema["maxLength"] + 20))
        if kind == "array":
            items = self.valid(schema.get("items", {}))
            if schema.get("minItems", 0) > 0:
                found.append(st.lists(items, max_size=schema["minItems"] - 1))
            if "maxItems" in schema:
                found.append(st.lists(items, min_size=schema["maxItems"] + 1, max_size=schema["maxItems"] + 3))
        return [strategy.map(lambda v: Broken(v, "out-of-bounds")) for strategy in found]

    def _non_finite(self, schema: Mapping[str, Any]) -> list[st.SearchStrategy[Broken]]:
        if not {"integer", "number"} & self.allowed_types(schema):
            return []
        return [st.sampled_from(NON_FINITE_TOKENS).map(lambda token: Broken(RawToken(token), "non-finite"))]

    def _control_characters(self, schema: Mapping[str, Any]) -> list[st.SearchStrategy[Broken]]:
        """A string with control characters, or with a lone surrogate escape (JSON text no UTF-8 string has)."""
        if "string" not in self.allowed_types(schema):
            return []
        controlled = st.tuples(st.text(max_size=6), st.text(CONTROL_CHARACTERS, min_size=1, max_size=3))
        spliced = controlled.map(lambda parts: Broken(parts[0] + parts[1], "control-characters"))
        surrogate = st.text(max_size=6).map(
            lambda text: Broken(RawToken(json.dumps(text)[:-1] + '\\ud800"'), "control-characters")
        )
        return [spliced, surrogate]

    def _broken_branch(self, schema: Mapping[str, Any]) -> list[st.SearchStrategy[Broken]]:
        """Under anyOf/oneOf: one branch broken; with a discriminator, a tag none of the mapping names too."""
        schema = self.resolve(schema)
        branches = schema.get("oneOf") or schema.get("anyOf")
        if not branches:
            return []
        discriminator = schema.get("discriminator")
        if discriminator is None:
            # A wrong type for one branch may be another's: the union's own wrong type is drawn instead.
            return [self.broken(branch, wrong_type=False) for branch in branches]
        prop, mapping = discriminator["propertyName"], discriminator.get("mapping", {})
        found = []
        for ref in mapping.values():
            # The tag itself is broken by the union's own mutation below, not as the branch's const.
            found.append(
                self.broken({"$ref": ref}).filter(lambda b: not (b.at[:1] == (prop,) and b.kind == "outside-enum"))
            )
            found.append(
                st.tuples(self.valid({"$ref": ref}), st.text(max_size=12).filter(lambda t: t not in mapping)).map(
                    lambda pair: Broken({**pair[0], prop: pair[1]}, "outside-enum", (prop,))
                )
            )
        return found

    def _broken_object(self, schema: Mapping[str, Any]) -> list[st.SearchStrategy[Broken]]:
        """A required property dropped, an unknown one added where none may be, or one property broken."""
        schema = self.resolve(schema)
        if schema.get("type") != "object":
            return []
        properties, required = schema.get("properties", {}), schema.get("required", [])
        whole = self.valid(schema)
        found = [whole.map(_dropped(name)) for name in required]
        if schema.get("additionalProperties") is False:
            unknown = st.text(min_size=1, max_size=10).filter(lambda n: n not in properties)
            found.append(
                st.tuples(whole, unknown, any_json).map(
                    lambda t: Broken({**t[0], t[1]: t[2]}, "unknown-field", (t[1],))
                )
            )
        for name, sub in properties.items():
            found.append(st.tuples(whole, self.broken(sub)).map(_broken_at(name)))
        return found

    def _broken_items(self, schema: Mapping[str, Any]) -> list[st.SearchStrategy[Broken]]:
        schema = self.resolve(schema)
        if schema.get("type") != "array" or "items" not in schema:
            return []
        items = self.valid(schema["items"])
        low = max(schema.get("minItems", 0) - 1, 0)
        high = max(schema.get("maxItems", low + 3) - 1, low)
        return [
            st.tuples(st.lists(items, min_size=low, max_size=high), self.broken(schema["items"])).map(
                lambda pair: pair[1].nested([*pair[0], pair[1].value], len(pair[0]))
            )
        ]

    # ------------------------------------------------------------------------------------------------ requests

    def requests(
        self, operation: Operation, hostile_bodies: st.SearchStrategy[Any] | None = None
    ) -> st.SearchStrategy[Request]:
        """Requests for ``operation``: path and query values valid, broken or hostile; a body valid by its schema,
        broken in one way, or (where given) one of ``hostile_bodies``, written with :func:`encode_json`."""
        parameters = [(parameter, self._parameter_value(parameter)) for parameter in operation.parameters]
        body = self._body(operation, hostile_bodies)

        @st.composite
        def draw_request(draw: st.DrawFn) -> Request:
            breaks: list[str] = []
            values: dict[str, str] = {}
            query: dict[str, str] = {}
            for parameter, strategy in parameters:
                if parameter.location == "query" and not parameter.required and draw(st.booleans()):
                    continue
                value, reason = draw(strategy, label=parameter.name)
                breaks += [reason] if reason is not None else []
                if parameter.location == "path":
                    values[parameter.name] = value if value is not None else ""
                elif value is not None:
                    query[parameter.name] = value
            if draw(st.integers(0, 9)) == 0:  # a query parameter the operation does not declare
                declared = {parameter.name for parameter in operation.parameters}
                query[draw(st.text(min_size=1, max_size=8).filter(lambda n: n not in declared))] = draw(
                    st.text(max_size=12)
                )
                breaks.append("query: unknown parameter")
            path = operation.path
            for name, value in values.items():
                path = path.replace("{" + name + "}", urllib.parse.quote(value, safe=""))
            content, reason = draw(body, label="body")
            breaks += [reason] if reason is not None else []
            return Request(operation, path, values, query, content, tuple(breaks))

        return draw_request()

    def _parameter_value(self, parameter: Parameter) -> st.SearchStrategy[tuple[str | None, str | None]]:
        """The parameter's value as URL text (None: left out), and what of it breaks its schema (None: nothing)."""
        where = f"{parameter.location} {parameter.name}"
        valid = self.valid(parameter.schema, parameter.name).map(lambda v: (_url_text(v), None))
        # In a URL every value is text: where the schema takes a string, no type is wrong (the text is still sent).
        textual = "string" in self.allowed_types(parameter.schema)
        unbroken = ("wrong-type", "non-finite", "deep-nesting") if textual else ()

        def as_text(broken: Broken) -> tuple[str | None, str | None]:
            text = "null" if broken.value is None else _url_text(broken.value)
            fits = broken.kind in unbroken and self.fits(text, parameter.schema)
            return text, None if fits else f"{where}: {broken.kind}"

        broken_text = self.broken(parameter.schema).map(as_text)
        choices = [valid, valid, broken_text]
        if parameter.location == "path":
            choices.append(st.sampled_from(HOSTILE_PATH_VALUES).map(lambda v: (v, f"{where}: hostile")))
        return st.one_of(choices)

    def _body(
        self, operation: Operation, hostile: st.SearchStrategy[Any] | None
    ) -> st.SearchStrategy[tuple[bytes | None, str | None]]:
        """The JSON body as bytes (None: no body), and what of it breaks the schema (None: nothing)."""
        nothing: tuple[bytes | None, str | None] = (None, None)
        if operation.body is None:
            return st.just(nothing)
        valid: st.SearchStrategy[tuple[bytes | None, str | None]] = self.valid(operation.body).map(
            lambda v: (encode_json(v), None)
        )
        broken = self.broken(operation.body).map(lambda b: (encode_json(b.value), f"body {b.describe()}"))
        choices = [valid, valid, broken, broken]
        if hostile is not None:
            choices.append(hostile.map(lambda v: (encode_json(v), "body: hostile")))
        if not operation.body_required:
            choices.append(st.just(nothing))
        return st.one_of(choices)


def integer_bounds(schema: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The least and greatest integers within a schema's minimum/exclusiveMinimum and maximum/exclusiveMaximum."""
    lows = [math.ceil(schema["minimum"])] if "minimum" in schema else []
    highs = [math.floor(schema["maximum"])] if "maximum" in schema else []
    if "exclusiveMinimum" in schema:
        lows.append(math.floor(schema["exclusiveMinimum"]) + 1)
    if "exclusiveMaximum" in schema:
        highs.append(math.ceil(schema["exclusiveMaximum"]) - 1)
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _tagged(prop: str, tag: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda value: {**value, prop: tag}


def _dropped(name: str) -> Callable[[dict[str, Any]], Broken]:
    return lambda value: Broken({k: v for k, v in value.items() if k != name}, "missing-required", (name,))


def _broken_at(name: str) -> Callable[[tuple[dict[str, Any], Broken]], Broken]:
    return lambda pair: pair[1].nested({**pair[0], name: pair[1].value}, name)


def _within(value: float, schema: Mapping[str, Any]) -> bool:
    return (
        value >= schema.get("minimum", -math.inf)
        and value <= schema.get("maximum", math.inf)
        and value > schema.get("exclusiveMinimum", -math.inf)
        and value < schema.get("exclusiveMaximum", math.inf)
    )


def _url_text(value: Any) -> str | None:
    """A value as the text of a path or query parameter; None stays None (a parameter left out)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, RawToken):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    return encode_json(value).decode("utf-8", "surrogatepass") if isinstance(value, list | dict) else str(value)
