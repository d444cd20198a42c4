"""Schemathesis hooks for the APIs' contract fuzz, loaded through SCHEMATHESIS_HOOKS."""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"[!-~]{1,255}")
POSITION = re.compile(r"\s*[0-9]+\s*")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    # A key reused with another body is refused (422) by design, and generated keys repeat
    # across cases: give every request with a valid key a key of its own. Invalid keys are left
    # as generated, so that their refusal is still checked.
    key = (case.headers or {}).get("Idempotency-Key")
    if key is not None and VALID_KEY.fullmatch(key):
        case.headers["Idempotency-Key"] = str(uuid.uuid4())

    # A well-formed X-Min-Position (or ?min_position=) makes a query wait for that position,
    # and a generated one is usually far past the head: 503 after the wait, by design. Ask for
    # position 0 instead, which every model has; malformed ones are left to check their 422.
    for values in (case.headers, case.query):
        for name in ("X-Min-Position", "min_position"):
            value = (values or {}).get(name)
            if isinstance(value, str) and POSITION.fullmatch(value):
                values[name] = "0"
