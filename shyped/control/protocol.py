"""The control protocol: newline-delimited JSON requests and responses. Pure: no I/O.

One request is one line of UTF-8 JSON, an object::

    {"version": 1, "id": 7, "op": "status", "args": {}}

and gets exactly one response line, in order::

    {"version": 1, "id": 7, "ok": true, "result": {...}}
    {"version": 1, "id": 7, "ok": false, "error": {"code": "not-found", "message": "...",
                                                   "details": {...}}}

`id` is optional (any JSON string, integer or null; echoed back). `args` is optional for ops
without arguments. Error codes (`ErrorCode`) are stable: clients match on them; messages are
for people and may change. docs/control-protocol.md is the reference for every op.

`OPS` maps each op to its argument class, result class and the access it needs (``read`` or
``admin``), all defined in `shyped.control.backend`. Arguments are validated strictly with a
cattrs converter: exact JSON types (no ``"1"`` for 1, no ``true`` for 1), no unknown keys, and
the classes' own validators.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar, cast

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    CattrsError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from shyped.control import attestops as at
from shyped.control import backend as b

#: The protocol version this code speaks; a request with another one is refused.
VERSION: Final = 1
#: Longest request line (bytes, newline excluded) from an admin peer: a 4 MiB policy, escaped.
MAX_ADMIN_LINE: Final = 12 * 1024 * 1024
#: Longest request line from a read-only peer (no read op needs more).
MAX_READ_LINE: Final = 64 * 1024
#: Deepest JSON nesting accepted in a request.
MAX_DEPTH: Final = 16


class ErrorCode(enum.StrEnum):
    """Stable error codes (the wire value never changes once released)."""

    BAD_JSON = "bad-json"  #: not UTF-8, not JSON, or nested too deep
    TOO_LARGE = "too-large"  #: the request line is longer than allowed (connection closed)
    REQUEST_TIMEOUT = "request-timeout"  #: a request line was not finished in time (closed)
    BAD_REQUEST = "bad-request"  #: JSON, but not a valid request (shape, argument types)
    UNSUPPORTED_VERSION = "unsupported-version"
    UNKNOWN_OP = "unknown-op"
    PERMISSION_DENIED = "permission-denied"
    BUSY = "busy"  #: too many connections or requests
    NOT_FOUND = "not-found"
    UNKNOWN_LABEL = "unknown-label"  #: the policy has no such label (details.suggestions)
    INVALID_ARGUMENT = "invalid-argument"
    DENIED = "denied"  #: the policy said no (details.reasons)
    POLICY_INVALID = "policy-invalid"  #: the policy text does not load (details.problems)
    POLICY_REJECTED = "policy-rejected"  #: valid, but the running system violates it
    UNAVAILABLE = "unavailable"  #: the daemon is not ready (e.g. before the first reconcile)
    ADMISSION_TIMEOUT = "admission-timeout"
    INTERNAL = "internal"


class ControlError(Exception):
    """A refused or failed request: a stable `code`, a message for people, optional details."""

    def __init__(
        self, code: ErrorCode, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.details:
            doc["details"] = self.details
        return doc


@attrs.frozen
class Op:
    """One request kind: its argument and result classes and who may ask."""

    name: str
    args: type[Any]
    result: type[Any]
    access: b.Access
    #: ControlBackend method called (with the args unless `args` is NoArgs).
    method: str
    #: Expensive (a policy parse in a worker process): the server runs a few at once per
    #: access class, the rest wait their turn.
    heavy: bool = False


def _op(
    name: str,
    args: type[Any],
    result: type[Any],
    access: b.Access,
    method: str = "",
    *,
    heavy: bool = False,
) -> Op:
    return Op(name, args, result, access, method or name, heavy)


OPS: Final[Mapping[str, Op]] = {
    op.name: op
    for op in (
        _op("ping", b.NoArgs, b.Pong, "read"),
        _op("status", b.NoArgs, b.Status, "read"),
        _op("getenforce", b.NoArgs, b.EnforceMode, "read"),
        _op("labels", b.LabelsArgs, b.LabelList, "read"),
        _op("validate_label", b.ValidateLabelArgs, b.LabelInfo, "read"),
        _op("list", b.NoArgs, b.DomainList, "read", "list_domains"),
        _op("get_domain_label", b.DomainArgs, b.DomainInfo, "read"),
        _op("get_resource_label", b.ResourceArgs, b.ResourceInfo, "read"),
        _op("resources", b.NoArgs, b.ResourceList, "read"),
        _op("dry_run", b.DryRunArgs, b.DryRunResult, "read"),
        _op("wait_admission", b.WaitAdmissionArgs, b.Admission, "read"),
        _op("policy_show", b.PolicyShowArgs, b.PolicyText, "read"),
        _op("policy_check", b.PolicySource, b.PolicyCheckResult, "read", heavy=True),
        _op("placement", b.PlacementArgs, b.PlacementResult, "read"),
        _op("setenforce", b.SetEnforceArgs, b.EnforceMode, "admin"),
        _op("register_domain", b.RegisterDomainArgs, b.Registration, "admin"),
        _op("relabel_domain", b.RelabelDomainArgs, b.DomainInfo, "admin"),
        _op("set_resource_label", b.SetResourceLabelArgs, b.ResourceLabelChange, "admin"),
        _op("policy_load", b.PolicyLoadArgs, b.PolicyLoadResult, "admin", heavy=True),
        _op("policy_reset", b.NoArgs, b.PolicyLoadResult, "admin", heavy=True),
        _op("forget_domain", b.DomainArgs, b.Forgotten, "admin"),
        _op("reserve", b.ReserveArgs, b.ReserveResult, "admin"),
        _op("attest_quote", at.AttestQuoteArgs, at.AttestQuote, "read", heavy=True),
        _op("attest_ak", b.NoArgs, at.AttestAk, "read"),
    )
}


# --------------------------------------------------------------------------- conversion

_T = TypeVar("_T")


def _strict(kind: type[Any]) -> Callable[[Any, Any], Any]:
    def check(value: Any, _type: Any) -> Any:
        if type(value) is not kind:
            raise TypeError(f"expected {_json_name(kind)}, got {_json_name(type(value))}")
        if kind is float and not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value

    return check


def _number(value: Any, _type: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise TypeError(f"expected a number, got {_json_name(type(value))}")
    return float(value)


def _json_name(kind: type[Any]) -> str:
    return {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(kind, kind.__name__)


def _is_tuple(t: Any) -> bool:
    return getattr(t, "__origin__", None) is tuple


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for kind in (str, int, bool):
        conv.register_structure_hook(kind, _strict(kind))
    conv.register_structure_hook(float, _number)

    def tuple_hook(value: Any, t: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise TypeError(f"expected array, got {_json_name(type(value))}")
        (item,) = [a for a in t.__args__ if a is not Ellipsis][:1]
        errors: list[Exception] = []
        out: list[Any] = []
        for i, v in enumerate(value):
            try:
                out.append(conv.structure(v, item))
            except Exception as exc:  # collected with the index, as cattrs does
                exc.__notes__ = [*getattr(exc, "__notes__", []), f"@ [{i}]"]
                errors.append(exc)
        if errors:
            raise IterableValidationError("invalid items", errors, t)
        return tuple(out)

    conv.register_structure_hook_func(_is_tuple, tuple_hook)

    def attrs_hook_factory(cls: type[Any]) -> Callable[[Any, Any], Any]:
        base = cattrs.gen.make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True)

        def hook(value: Any, t: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected object, got {_json_name(type(value))}")
            return base(value, t)

        return hook

    conv.register_structure_hook_factory(attrs.has, attrs_hook_factory)
    return conv


_CONVERTER: Final = _make_converter()


def _format_error(exc: BaseException) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown key(s): {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, CattrsError) and " not in literal " in str(exc):
        value, _, allowed = str(exc).partition(" not in literal typing.Literal")
        return f"{value[:60]!r} is not one of {allowed}"
    if isinstance(exc, TypeError | ValueError | CattrsError):
        return str(exc).split("\n")[0][:200] or type(exc).__name__
    return type(exc).__name__


def _step(exc: BaseException) -> str:
    """The path step a cattrs note puts on a sub-error: ``.attr`` or ``[index]``."""
    for note in getattr(exc, "__notes__", []):
        if isinstance(note, AttributeValidationNote):
            return "." + note.name
        if isinstance(note, IterableValidationNote):
            return f"[{note.index}]"
        if isinstance(note, str) and note.startswith("@ ["):
            return note[2:]
    return ""


def _messages(exc: BaseException, path: str) -> list[str]:
    """Flatten a cattrs error tree into ``path: message`` lines."""
    if isinstance(exc, ClassValidationError | IterableValidationError):
        out: list[str] = []
        for sub in exc.exceptions:
            out.extend(_messages(sub, path + _step(sub)))
        return out
    return [f"{path}: {_format_error(exc)}"]


def structure(data: Any, cls: type[_T], path: str = "args") -> _T:
    """Validate JSON data into `cls`; `ControlError(bad-request)` listing every problem."""
    try:
        return _CONVERTER.structure(data, cls)
    except (ClassValidationError, IterableValidationError) as exc:
        problems = _messages(exc, path)
    except (TypeError, ValueError, KeyError, CattrsError) as exc:
        problems = [f"{path}: {_format_error(exc)}"]
    raise ControlError(ErrorCode.BAD_REQUEST, "; ".join(problems[:10]), {"problems": problems[:50]})


def unstructure(obj: Any) -> Any:
    """An attrs result as JSON-ready data (tuples become lists)."""
    return _CONVERTER.unstructure(obj)


# --------------------------------------------------------------------------- envelopes

RequestId = str | int | None


@attrs.frozen
class Request:
    op: Op
    args: Any
    id: RequestId = None


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ControlError(ErrorCode.BAD_JSON, f"JSON nested deeper than {MAX_DEPTH}")
    if isinstance(value, dict):
        for v in value.values():
            _check_depth(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_depth(v, depth + 1)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_line(line: bytes) -> Any:
    """One line of UTF-8 JSON (NaN/Infinity refused); `ControlError(bad-json)` otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlError(ErrorCode.BAD_JSON, f"request is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ControlError(ErrorCode.BAD_JSON, "JSON nested too deep") from None
    except ValueError as exc:
        raise ControlError(ErrorCode.BAD_JSON, f"malformed JSON: {exc}"[:300]) from None
    _check_depth(value)
    return value


def request_id(doc: Any) -> RequestId:
    """The request's id if it has a usable one (so even an error answer can carry it)."""
    if isinstance(doc, dict):
        rid = doc.get("id")
        if rid is None or (isinstance(rid, str) and len(rid) <= 256):
            return rid
        if isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) < 2**63:
            return rid
    return None


def parse_request(line: bytes) -> Request:
    """Parse and validate a request line; `ControlError` with a stable code otherwise."""
    return parse_document(decode_line(line))


def parse_document(doc: Any) -> Request:
    """Validate a decoded request; `ControlError` with a stable code otherwise."""
    if not isinstance(doc, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "a request must be a JSON object")
    unknown = set(doc) - {"version", "id", "op", "args"}
    if unknown:
        raise ControlError(
            ErrorCode.BAD_REQUEST, f"unknown request key(s): {', '.join(sorted(unknown)[:5])}"
        )
    version = doc.get("version")
    if type(version) is not int:
        raise ControlError(ErrorCode.BAD_REQUEST, 'a request needs "version": <integer>')
    if version != VERSION:
        raise ControlError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported (this daemon speaks {VERSION})",
            {"supported": [VERSION]},
        )
    if "id" in doc and request_id(doc) != doc["id"]:
        raise ControlError(ErrorCode.BAD_REQUEST, '"id" must be a string, an integer or null')
    name = doc.get("op")
    if not isinstance(name, str):
        raise ControlError(ErrorCode.BAD_REQUEST, 'a request needs "op": <string>')
    op = OPS.get(name)
    if op is None:
        raise ControlError(ErrorCode.UNKNOWN_OP, f"unknown op {name[:64]!r}")
    raw_args = doc.get("args", {})
    return Request(op=op, args=structure(raw_args, op.args), id=doc.get("id"))


def encode(doc: Mapping[str, Any]) -> bytes:
    """One JSON line (compact, ASCII-safe), newline included."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def encode_request(op: str, args: Any = None, rid: RequestId = None) -> bytes:
    """A request line for `op` with attrs (or plain dict) `args`."""
    doc: dict[str, Any] = {"version": VERSION, "op": op}
    if rid is not None:
        doc["id"] = rid
    if args is not None:
        doc["args"] = unstructure(args) if attrs.has(type(args)) else args
    return encode(doc)


def encode_result(rid: RequestId, result: Any) -> bytes:
    encoded = getattr(result, "encoded", None)
    if isinstance(encoded, bytes) and encoded:  # a large answer encoded off the reactor thread
        return encode({"version": VERSION, "id": rid, "ok": True})[:-2] + (
            b',"result":' + encoded + b"}\n"
        )
    return encode({"version": VERSION, "id": rid, "ok": True, "result": unstructure(result)})


def encode_error(rid: RequestId, error: ControlError) -> bytes:
    return encode({"version": VERSION, "id": rid, "ok": False, "error": error.to_json()})


def parse_response(line: bytes, result_type: type[_T]) -> tuple[RequestId, _T]:
    """Client side: a response line as (id, result); a `ControlError` for ``ok: false``.

    A response that cannot be understood is a `ControlError` with code ``bad-json``/``internal``
    (the daemon is broken or not a shyped daemon).
    """
    doc = decode_line(line)
    if not isinstance(doc, dict) or doc.get("version") != VERSION or "ok" not in doc:
        raise ControlError(ErrorCode.INTERNAL, "not a shyped control response")
    rid = request_id(doc)
    if doc["ok"] is True:
        try:
            return rid, structure(doc.get("result"), result_type, "result")
        except ControlError as exc:
            raise ControlError(
                ErrorCode.INTERNAL, f"unexpected response from the daemon: {exc.message}"
            ) from None
    err = doc.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        raise ControlError(ErrorCode.INTERNAL, "malformed error response")
    try:
        code = ErrorCode(err["code"])
    except ValueError:
        code = ErrorCode.INTERNAL
    details = err.get("details")
    raise ControlError(
        code,
        str(err.get("message", "")),
        cast(dict[str, Any], details) if isinstance(details, dict) else None,
    )
