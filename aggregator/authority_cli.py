"""``fl-authority``: the fleet authority, run by the operator on a machine the aggregator is not.

Its key certifies devices' long-term keys at enrollment, so a device can check that a peer's
secure-aggregation advert really is that peer's, which the aggregator (who relays the adverts)
could otherwise forge. Keep ``authority.key`` offline; devices pin ``authority.pub.json``.

    fl-authority keygen --out authority/
    fl-authority certify dev-7 keys/dev-7/device.pub.json --key authority/authority.key --out dev-7.cert.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shared.errors import ConfigError, ProtocolError

log = logging.getLogger("fl-authority")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-authority", description=__doc__.splitlines()[0])
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="create the authority's signing key (keep it offline)")
    kg.add_argument("--out", required=True, type=Path)
    kg.add_argument("--force", action="store_true", help="replace an existing authority key (every certificate dies)")
    ce = sub.add_parser("certify", help="certify one device's public keys")
    ce.add_argument("device_id")
    ce.add_argument("pubkey_file", type=Path)
    ce.add_argument("--key", required=True, type=Path, help="authority.key")
    ce.add_argument("--out", required=True, type=Path, help="where the certificate goes (give it to the device)")
    ce.add_argument("--days", type=float, default=None,
                    help="validity in days from now (default 730); peers refuse the device's adverts outside it")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from shared import authority, crypto

    try:
        if a.cmd == "keygen":
            priv, pub = crypto.write_keypair(a.out, "authority", overwrite=a.force)
            log.info("wrote %s (private, 0600: keep it offline) and %s (pin it on every device)", priv, pub)
        else:
            keys = crypto.load_private_keys(a.key)
            dev = crypto.load_public_keys(a.pubkey_file)
            cert = authority.certify(a.device_id, dev, keys, days=a.days if a.days is not None else authority.DEFAULT_DAYS)
            if a.out.exists():
                raise FileExistsError(f"{a.out} exists; remove it first")
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(cert.to_json())
            log.info("certified %s (key fingerprint %s) until %s in %s", a.device_id, dev.fingerprint(),
                     authority.iso_time(cert.not_after or 0), a.out)
    except (ConfigError, ProtocolError, FileExistsError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
