"""fl-sim's keys (issue 22, item 6): the fleet authority's private key never sits where the
aggregator's keys are; only its public key does, for the aggregator and the devices to pin."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from aggregator import registry
from aggregator.authority_guard import readable_authority_keys
from fl_sim.run import make_keys
from shared import authority
from shared.crypto import load_private_keys, load_public_keys
from shared.errors import ConfigError

IDS = ["device-0", "device-1"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_the_authority_key_lives_outside_the_aggregators_key_directory(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "authority.key").write_text("an older run's layout")
    keys = make_keys(tmp_path / "keys", IDS)
    keydir, authdir = Path(keys["aggregator"]).parent, tmp_path / "authority"
    assert Path(keys["authority_key"]).parent == authdir and keydir == tmp_path / "keys"
    assert _mode(authdir) == 0o700 and _mode(Path(keys["authority_key"])) == 0o600
    auth = load_private_keys(keys["authority_key"]).public
    # Where the aggregator reads: the public half only, and no file that holds the private half.
    assert Path(keys["authority_pub"]).parent == keydir and load_public_keys(keys["authority_pub"]) == auth
    assert not (keydir / "authority.key").exists()
    assert readable_authority_keys(keys["authority_pub"], keys["aggregator"]) == []
    for f in keydir.iterdir():
        assert "flm-private-keys" not in f.read_text() or load_private_keys(f).public != auth, f
    # The fleet still works from it: every device is certified by that authority and enrolled.
    reg = registry.load(Path(keys["registry"]))
    for dev in IDS:
        authority.verify(authority.load(Path(keys[f"{dev}_cert"])), auth, dev)
        assert reg[dev].to_json() == load_private_keys(keys[dev]).public.to_json()


@pytest.mark.parametrize("inside", [".", "authority"])
def test_an_authority_directory_inside_the_aggregators_is_refused(tmp_path: Path, inside: str) -> None:
    with pytest.raises(ConfigError, match="outside the aggregator's key directory"):
        make_keys(tmp_path / "keys", IDS, authority_dir=tmp_path / "keys" / inside)
    assert not (tmp_path / "keys" / "authority.key").exists()
