"""The harvest (models/harvest.py) without network: reserved packages are never fetched, the demo's
evaluation split does not depend on what else was harvested, and version changes are named."""
from __future__ import annotations

import json
import subprocess

import pytest

from models import harvest

RESERVED_EXAMPLES = [
    "gimp", "gimp-data", "gimp-help-de", "inkscape", "dolphin", "okular", "konsole", "kate", "katepart",
    "k3b", "k3b-i18n", "evolution", "evolution-data-server", "evolution-data-server-common", "gedit",
    "gedit-common", "gnome-software", "gnome-software-common", "totem", "totem-common", "rhythmbox",
    "rhythmbox-data", "shotwell", "shotwell-common", "gtk+3.0", "libgtk-3-common", "libgtk-3-0",
    "xfce4-panel", "xfce4-session", "xfce4-settings", "thunar", "thunar-data", "gnucash", "gnucash-common",
    "gnumeric", "gnumeric-common", "gparted", "gramps", "pidgin", "pidgin-data", "libpurple-data",
    "pypi:gramps", "pypi:Gramps", "GIMP",
]
NOT_RESERVED = ["libreoffice-l10n-de", "xfe-i18n", "libparted-i18n", "claws-mail-i18n", "wordpress-l10n",
                "libokteta-l10n", "pypi:django", "pypi:wagtail", "gcc-12-locales"]


def every_planned_package() -> list[str]:
    names = list(harvest.DEBIAN_EVAL + harvest.DEBIAN_V1 + harvest.DEBIAN_MORE + harvest.DEBIAN_FULL + harvest.UNSEEN_DEBIAN)
    names += [f"pypi:{name}" for name, _, _ in harvest.PYPI_FULL + harvest.UNSEEN_PYPI]
    return names


@pytest.mark.parametrize("name", RESERVED_EXAMPLES)
def test_reserved_names_are_recognised(name):
    assert harvest.is_reserved(name)
    with pytest.raises(harvest.ReservedPackageError):
        harvest.check_not_reserved(name)


@pytest.mark.parametrize("name", NOT_RESERVED)
def test_ordinary_packages_are_not_reserved(name):
    assert not harvest.is_reserved(name)


def test_no_package_list_names_a_reserved_package():
    assert [name for name in every_planned_package() if harvest.is_reserved(name)] == []
    for set_name in ("eval", "full", "v1"):
        plan = harvest.package_plan(set_name)
        for group in plan.values():
            for kind, spec in group:
                assert not harvest.is_reserved(spec if kind == "debian" else f"pypi:{spec[0]}")


def test_unseen_packages_are_never_trained_on():
    plan = harvest.package_plan("full")
    trained = {spec if kind == "debian" else spec[0] for kind, spec in plan["eval"] + plan["train"]}
    unseen = {spec if kind == "debian" else spec[0] for kind, spec in plan["unseen"]}
    assert unseen and not trained & unseen
    assert len(unseen) >= 4


def test_fetchers_refuse_reserved_packages_before_any_download(monkeypatch, tmp_path):
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a reserved package reached a download: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    for name in ("gimp", "k3b-i18n", "libgtk-3-common", "thunar-data"):
        with pytest.raises(harvest.ReservedPackageError):
            harvest.fetch_debian(name, tmp_path)
        with pytest.raises(harvest.ReservedPackageError):
            list(harvest.harvest_debian(name, tmp_path))
    with pytest.raises(harvest.ReservedPackageError):
        list(harvest.harvest_pypi("gramps", "5.2.0", "GPL", tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_reserved_catalogs_inside_other_packages_are_skipped():
    assert harvest.catalog_language("/usr/share/locale/de/LC_MESSAGES/gtk30.mo") is None
    assert harvest.catalog_language("/usr/share/locale/fr/LC_MESSAGES/gimp20-std-plug-ins.mo") is None
    assert harvest.catalog_language("/usr/share/locale/de/LC_MESSAGES/okular.mo") is None
    assert harvest.catalog_language("/usr/share/locale/de/LC_MESSAGES/util-linux.mo") == "de"
    assert harvest.catalog_language("/usr/share/locale/zh_CN/LC_MESSAGES/wx.mo") == "zh"
    assert harvest.catalog_language("/usr/share/wordpress/wp-content/languages/admin-ru_RU.mo") == "ru"
    assert harvest.catalog_language("/usr/share/wordpress/wp-content/languages/pt_BR.mo") is None


# --- the fixed evaluation split, on synthetic catalogs ------------------------------------------

def synthetic_rows(kind, spec, cache, locked=None):
    """A fake harvest_package: a few hundred made-up strings per package, some shared between
    packages with different translations (so deduplication across packages matters)."""
    name = spec if kind == "debian" else f"pypi:{spec[0]}"
    assert not harvest.is_reserved(name)
    version = locked or "1.0-1"
    for lang in ("de", "fr", "ja"):
        for i in range(400):
            src = f"Synthetic setting number {i} of the {name} dialog"
            yield lang, src, f"[{lang}] Einstellung {i} {name}", name, version, "GPL-2+"
            # Shared by every package: the winning translation depends on which packages exist.
            shared = f"Shared option {i} for every application"
            yield lang, shared, f"[{lang}] Gemeinsam {i} aus {name}", name, version, "GPL-2+"


def test_eval_split_hash_is_the_same_with_or_without_the_full_harvest(tmp_path):
    lock = {"debian": {}, "pypi": {}}
    small = harvest.build("eval", tmp_path / "eval", tmp_path / "cache", lock=lock, fetch=synthetic_rows)
    full = harvest.build("full", tmp_path / "full", tmp_path / "cache", lock=lock, fetch=synthetic_rows)
    for split in ("dev", "test"):
        a = (tmp_path / "eval" / "eval" / f"{split}.jsonl").read_bytes()
        b = (tmp_path / "full" / "eval" / f"{split}.jsonl").read_bytes()
        assert a and a == b
        assert small["eval_split"]["sha256"][split] == full["eval_split"]["sha256"][split]
        assert harvest.split_hash(tmp_path / "full" / "eval" / f"{split}.jsonl") == full["eval_split"]["sha256"][split]
    # ... while the in-domain test split does change with the full harvest.
    assert (tmp_path / "eval" / "test.jsonl").read_bytes() != (tmp_path / "full" / "test.jsonl").read_bytes()
    records = [json.loads(line) for line in (tmp_path / "full" / "eval" / "test.jsonl").open(encoding="utf-8")]
    assert {r["package"] for r in records} <= set(harvest.DEBIAN_EVAL)


def test_unseen_packages_stay_out_of_the_training_files(tmp_path):
    harvest.build("full", tmp_path, tmp_path / "cache", lock={"debian": {}, "pypi": {}}, fetch=synthetic_rows)
    unseen_names = set(harvest.UNSEEN_DEBIAN) | {f"pypi:{n}" for n, _, _ in harvest.UNSEEN_PYPI}
    for split in ("train", "dev", "test"):
        for line in (tmp_path / f"{split}.jsonl").open(encoding="utf-8"):
            assert json.loads(line)["package"] not in unseen_names
    unseen = [json.loads(line) for line in (tmp_path / "unseen.jsonl").open(encoding="utf-8")]
    assert unseen and {r["split"] for r in unseen} == {"unseen"}
    assert {r["package"] for r in unseen} <= unseen_names


def test_a_changed_package_version_is_named(tmp_path, capsys):
    lock = {"debian": {"libreoffice-l10n-de": "1:0.9-1"}, "pypi": {}}

    def moved_on(kind, spec, cache, locked=None):  # the archive no longer serves the locked version
        for row in synthetic_rows(kind, spec, cache, None):
            yield row

    card = harvest.build("eval", tmp_path, tmp_path / "cache", lock=lock, fetch=moved_on)
    assert card["version_changes"] == [{"package": "libreoffice-l10n-de", "locked": "1:0.9-1", "harvested": "1.0-1"}]
    assert "VERSION CHANGED libreoffice-l10n-de" in capsys.readouterr().err
    assert card["versions"]["libreoffice-l10n-de"] == "1.0-1"


def _qm_bytes(messages: list[tuple[str, list[str]]]) -> bytes:
    import struct

    body = b""
    for source, translations in messages:
        for text in translations:
            encoded = text.encode("utf-16-be")
            body += b"\x03" + struct.pack(">I", len(encoded)) + encoded
        encoded = source.encode("utf-8")
        body += b"\x06" + struct.pack(">I", len(encoded)) + encoded
        body += b"\x07" + struct.pack(">I", 4) + b"Main" + b"\x01"
    return harvest.QM_MAGIC + b"\x69" + struct.pack(">I", len(body)) + body


def test_qt_catalogs_are_read_and_plurals_skipped(tmp_path):
    path = tmp_path / "demo_de.qm"
    path.write_bytes(_qm_bytes([("Open file", ["Datei öffnen"]), ("%n files", ["%n Datei", "%n Dateien"]),
                                ("Untranslated", [""])]))
    assert list(harvest.read_qm(path)) == [("Open file", "Datei öffnen")]
    assert harvest.qm_language(str(path)) == "de"
    assert harvest.qm_language("/usr/share/qt5/translations/qtbase_zh_CN.qm") == "zh"
    assert harvest.qm_language("/usr/share/konsole/translations/konsole_fr.qm") is None


def test_a_failed_download_stops_the_harvest_unless_allowed(tmp_path):
    lock = {"debian": {}, "pypi": {}}
    first = True

    def one_fails(kind, spec, cache, locked=None):
        nonlocal first
        if first:  # the download of the first package fails (as fetch_debian records it)
            first = False
            harvest.FETCH_FAILURES.append(spec if kind == "debian" else f"pypi:{spec[0]}")
            return
        yield from synthetic_rows(kind, spec, cache, locked)

    with pytest.raises(harvest.MissingPackagesError, match=r"could not fetch 1 package\(s\): .*; nothing was written; "
                                                           r"fix the package sources or pass --allow-missing"):
        harvest.build("eval", tmp_path / "out", tmp_path / "cache", lock=lock, fetch=one_fails)
    assert not (tmp_path / "out").exists()
    first = True
    card = harvest.build("eval", tmp_path / "out", tmp_path / "cache", lock=lock, fetch=one_fails, allow_missing=True)
    assert card["pairs"]
