"""Canonical JSON: the one way anything signed is turned into bytes.

Signer and verifier must hash the same bytes, and a verifier that re-encodes what it parsed (the
ledger does, to refuse lines edited by hand) must get them back exactly. So: keys sorted, no
whitespace, non-ASCII escaped (``\\uXXXX``), UTF-8. Release manifests, ledger entries and lines,
and the aggregator's audit log use ``canonical_json``; its golden bytes are pinned in
``tests/shared/test_golden_formats.py``, which also proves it byte-identical to the two
``json.dumps`` calls it replaced, so every manifest and ledger already signed still verifies.

``canonical_json_cert_v1`` is the one named variant: device certificates (format version 1) have
always signed ``json.dumps(..., sort_keys=True)`` with the default ``", "`` / ``": "`` separators.
Verification never re-encodes a certificate (it parses the signed payload), so compact bytes
would verify too; the variant is kept only so that a certificate issued today is byte-for-byte
what earlier builds issued for the same input. A certificate format version 2 should use
``canonical_json``.

NaN and infinities are allowed (as ``json.dumps`` allows them) because the ledger has always
recorded them as they were; refusing them now would make a device's append raise mid-round.
"""

from __future__ import annotations

import json
from typing import Any

_COMPACT = (",", ":")


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII-only (``\\uXXXX`` escapes), UTF-8 bytes."""
    return json.dumps(obj, sort_keys=True, separators=_COMPACT, ensure_ascii=True).encode()


def canonical_json_cert_v1(obj: Any) -> bytes:
    """The device-certificate payload of format version 1: as ``canonical_json`` but with
    ``json.dumps``' default ``", "`` and ``": "`` separators (see the module docstring)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()
