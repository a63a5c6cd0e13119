"""The one learned-state file format: what reads, what is corrupt, what belongs to someone else."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from aded.drafters.state_file import CorruptState, StateError, StateFile
from aded.store.datastore import TokenizerIdentity

IDENTITY = TokenizerIdentity("toy", 16, "a" * 64)


def test_round_trip_and_header(tmp_path):
    file = StateFile(tmp_path / "s.npz", "suffix", IDENTITY)
    file.save({"tokens": np.arange(5), "calibration": np.array("[]")}, meta={"note": 1})
    header, arrays = file.read()
    assert arrays["tokens"].tolist() == [0, 1, 2, 3, 4] and str(arrays["calibration"]) == "[]"
    assert header["drafter"] == "suffix" and header["meta"] == {"note": 1} and header["version"] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # written through a renamed temporary


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04 not a zip"])
def test_unreadable_bytes_are_corrupt(tmp_path, content):
    (tmp_path / "s.npz").write_bytes(content)
    with pytest.raises(CorruptState, match="not a readable state file") as err:
        StateFile(tmp_path / "s.npz", "suffix", IDENTITY).read()
    assert "allow_pickle" not in str(err.value)  # no hint to load a damaged file unsafely


def test_a_single_npy_array_is_corrupt_not_a_crash(tmp_path):
    path = tmp_path / "s.npz"
    with open(path, "wb") as f:
        np.save(f, np.arange(3))
    with pytest.raises(CorruptState, match="single array"):
        StateFile(path, "suffix", IDENTITY).read()


def test_missing_header_fields_are_corrupt(tmp_path):
    path = tmp_path / "s.npz"
    buffer = io.BytesIO()
    np.savez(buffer, __header__=np.array(json.dumps({"format": "aded-learned-state", "version": 2})), tokens=np.arange(2))
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CorruptState, match="header"):
        StateFile(path, "suffix", IDENTITY).read()


def test_other_drafter_or_tokenizer_is_a_configuration_error(tmp_path):
    StateFile(tmp_path / "s.npz", "suffix", IDENTITY).save({"tokens": np.arange(2)})
    with pytest.raises(StateError, match="'suffix' drafter, not 'aded'"):
        StateFile(tmp_path / "s.npz", "aded", IDENTITY).read()
    with pytest.raises(StateError, match="tokenizer"):
        StateFile(tmp_path / "s.npz", "suffix", TokenizerIdentity("other", 16, "b" * 64)).read()


def test_the_servers_earlier_format_is_refused_by_version(tmp_path):
    header = {"format": "aded-server-state", "version": 1, "drafter": "suffix", "tokenizer": IDENTITY.to_json(),
              "saved_at": 0, "keys": ["tokens"]}
    buffer = io.BytesIO()
    np.savez(buffer, __header__=np.array(json.dumps(header)), tokens=np.arange(3))
    (tmp_path / "s.npz").write_bytes(buffer.getvalue())
    with pytest.raises(CorruptState, match="'aded-server-state' version 1, expected 'aded-learned-state' version 2"):
        StateFile(tmp_path / "s.npz", "suffix", IDENTITY).read()


def test_objects_are_never_pickled(tmp_path):
    with pytest.raises(ValueError, match="pickle"):
        StateFile(tmp_path / "s.npz", "suffix", IDENTITY).save({"bad": np.array([{}], dtype=object)})
