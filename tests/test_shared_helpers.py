"""One helper for each shared thing: the --pairs grammar, file hashes, /proc status, versions."""
from __future__ import annotations

import hashlib
import os

import pytest

from packager.calibration_data import CalibrationError
from packager.calibration_data import parse_pair_list as calibrate_pairs
from packager.verify import VerifyError
from packager.verify import parse_pair_list as verify_pairs
from runtime.file_hash import file_sha256
from runtime.memory import proc_status


@pytest.mark.parametrize("spec, slugs", [
    ("en-de,en->fr", ["en-de", "en-fr"]),
    ("en->de,fr", ["en-de", "en-fr"]),
    ("en<->de,fr", ["en-de", "de-en", "en-fr", "fr-en"]),
    ("deu-eng, en-zh-Hant,en-de", ["de-en", "en-zh-Hant", "en-de"]),
    ("en->de,en-fr,de-en", ["en-de", "en-fr", "de-en"]),
])
def test_calibrate_and_verify_read_pairs_alike(spec, slugs):
    assert calibrate_pairs(spec) == slugs
    assert [pair.slug for pair in verify_pairs(spec)] == slugs


def test_bad_pairs_are_one_line_in_both():
    with pytest.raises(CalibrationError, match=r"^--pairs: cannot read direction 'en-xx'"):
        calibrate_pairs("en-de,en-xx")
    with pytest.raises(VerifyError, match=r"^--pairs: cannot read direction 'en-xx'"):
        verify_pairs("en-de,en-xx")


def test_file_sha256_is_sha256sum(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_proc_status_in_bytes():
    status = proc_status()
    if not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    assert status["VmHWM"] >= status["VmRSS"] > 1024 * 1024 and status["RssAnon"] > 0
    assert proc_status(2**22 + 12345) == {}
