"""Schemathesis hooks for the fuzz test (loaded through SCHEMATHESIS_HOOKS).

Two properties of an upload are relations the schema cannot state: the body begins with
`OggS` (a pattern does not apply to raw bytes), and a digest header is the digest of the body.
Positive cases get both right, as any real client would send them; negative cases are sent as
generated, so the refusals (400) are exercised too.
"""

import base64
import hashlib
import re

import http_sf
import schemathesis
from schemathesis.transport.serialization import Binary

from prerec.digests import DIGEST_HEADERS, SUPPORTED


def _positive(case) -> bool:  # type: ignore[no-untyped-def]
    return case.meta is not None and case.meta.generation.mode.is_positive


def _body(case) -> bytes:  # type: ignore[no-untyped-def]
    value = case.body
    data = value.data if isinstance(value, Binary) else value if isinstance(value, bytes) else str(value).encode()
    return data if data.startswith(b"OggS") or not _positive(case) else b"OggS" + data


@schemathesis.serializer("audio/ogg")
def ogg(ctx, value):  # type: ignore[no-untyped-def]
    return _body(ctx.case)


@schemathesis.hook
def before_call(ctx, case, **kwargs):  # type: ignore[no-untyped-def]
    if not _positive(case) or not case.headers:
        return
    # Schemathesis 4's coverage phase draws header values from letters and digits only, so for
    # a header whose pattern needs punctuation (an entity tag, a digest) it has no valid value;
    # it then reuses a non-matching one in cases it still calls positive. Those are not requests
    # the spec allows: leave the header out.
    for parameter in case.operation.headers:
        pattern = parameter.definition.get("schema", {}).get("pattern")
        value = case.headers.get(parameter.name)
        if pattern and isinstance(value, str) and not re.search(pattern, value):
            del case.headers[parameter.name]
    if case.method != "PUT":
        return
    body = _body(case)
    if "Content-MD5" in case.headers:
        case.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
    for header in DIGEST_HEADERS:
        if header in case.headers:
            # Keep the generated members and their order; only the checked algorithms get the
            # digest of what is sent (unknown ones are ignored by the server, as RFC 9530 allows).
            members = http_sf.parse(case.headers[header].encode(), tltype="dictionary")
            for name, (_, params) in list(members.items()):
                if name in SUPPORTED:
                    members[name] = (hashlib.new(SUPPORTED[name], body).digest(), params)
            case.headers[header] = http_sf.ser(members)
