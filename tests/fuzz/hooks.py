"""Schemathesis hooks for the command API's contract fuzz, loaded through SCHEMATHESIS_HOOKS."""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"[!-~]{1,255}")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    # A key reused with another body is refused (422) by design, and generated keys repeat
    # across cases: give every request with a valid key a key of its own. Invalid keys are left
    # as generated, so that their refusal is still checked.
    key = (case.headers or {}).get("Idempotency-Key")
    if key is not None and VALID_KEY.fullmatch(key):
        case.headers["Idempotency-Key"] = str(uuid.uuid4())
