"""Whether the aggregator can read the fleet authority's private key, which it must not hold.

Hardened secure aggregation trusts a device's key advert because the fleet authority certified
that device's key, and the aggregator relays the adverts: an aggregator that can read the
authority's private key can certify peers of its own making, make them a device's neighbours and
unmask that device's input. ``fl-agg run`` warns in one line when such a key is readable in the
places it is most likely to sit by mistake: beside the configured ``authority`` public key, and
beside the aggregator's own ``keys``. It is a warning, not a refusal: it cannot look everywhere,
and the operator who copied the key there is the one to move it (``fl-authority``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shared.crypto import PublicKeys, load_public_keys, parse_private_keys
from shared.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_KEY_FILE_BYTES = 64 * 1024  # a private key file is a few hundred bytes; bigger files are not read
_MARK = b"flm-private-keys"  # shared.crypto's private key file format, to skip other files unparsed


def readable_authority_keys(authority_pub: str | os.PathLike[str], keys: str | os.PathLike[str] | None) -> list[Path]:
    """Private key files we can read whose public half is the authority key in ``authority_pub``,
    found in its directory and in the directory of the aggregator's ``keys`` file. The aggregator's
    own key file is listed only if it *is* the authority's key."""
    try:
        auth = load_public_keys(authority_pub)
    except (OSError, ProtocolError, ValueError):
        return []  # the aggregator's start reports an unreadable or bad authority file itself
    dirs = [Path(authority_pub).parent] + ([Path(keys).parent] if keys else [])
    found: list[Path] = []
    for d in dict.fromkeys(p.resolve() for p in dirs):
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        found += [f for f in entries if _holds(f, auth)]
    return found


def _holds(path: Path, auth: PublicKeys) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > MAX_KEY_FILE_BYTES or not os.access(path, os.R_OK):
            return False
        data = path.read_bytes()
        if _MARK not in data:
            return False
        return parse_private_keys(data).public == auth
    except (OSError, ProtocolError, ValueError):
        return False


def warn_if_readable(authority_pub: str | None, keys: str | None) -> list[Path]:
    """Log one warning line when ``readable_authority_keys`` finds any; return what it found."""
    if not authority_pub:
        return []
    found = readable_authority_keys(authority_pub, keys)
    if found:
        log.warning("the aggregator can read the fleet authority's PRIVATE key (%s): whoever runs it can certify "
                    "fake peers and unmask a device; keep that key off this machine (fl-authority) and leave only "
                    "%s here", ", ".join(map(str, found)), Path(authority_pub).name)
    return found
