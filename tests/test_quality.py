"""packager.quality: scores with signatures and reference-free generation-error detectors."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from packager.quality import (
    ERROR_KINDS,
    ErrorDetector,
    bleu_tokenizer,
    corpus_scores,
    error_summary,
    lost_placeholders,
    max_repeat,
    placeholders,
    script_counts,
    units,
    usual_length_ratio,
)
from runtime.languages import parse_language

HARVEST_TEST = Path(__file__).resolve().parents[1] / "data" / "harvest" / "eval" / "test.jsonl"  # the fixed split


@pytest.fixture(scope="module")
def detector():
    return ErrorDetector(["en", "de", "fr", "es", "ru", "ja", "zh"], {("en", "de"): 1.2})


# -- placeholders ------------------------------------------------------------------------------
def test_placeholders_normal_forms():
    text = ('Open %s in %1$d of %(name)s, %% done, <b>bold</b> <a href="x">l</a> <br/> {0} {name} '
            '%1 %PRODUCTNAME %<x%> %q#T $(ARG1) <file> %i')
    assert placeholders(text) == Counter({
        "%s": 1, "%d": 2, "%(name)s": 1, "{0}": 1, "{name}": 1, "%1": 1, "%PRODUCTNAME": 1,
        "%<": 1, "%>": 1, "%q#T": 1, "$(ARG1)": 1, "<b>": 1, "</b>": 1, "<a>": 1, "</a>": 1, "<br/>": 1,
    })


def test_lost_placeholders_counts_multiplicity_and_allows_reordering():
    assert lost_placeholders("%s of %s", "%2$s von %1$s") == []
    assert lost_placeholders("%s of %s", "%s von") == ["%s"]
    assert lost_placeholders("<b>Bold</b> {0}", "Fett {0}") == ["</b>", "<b>"]
    assert lost_placeholders("100% done", "100 % fertig") == []  # "% d" is not a conversion
    assert lost_placeholders("usage: <file>", "Aufruf: <Datei>") == []  # translated words in <> are text


# -- scripts and units -------------------------------------------------------------------------
def test_script_counts_use_words_for_alphabets_and_characters_for_han_and_kana():
    assert script_counts("PTP 超时") == Counter({"Hani": 2, "Latn": 1})
    assert script_counts("ファイル %s を開く") == Counter({"Kana": 4, "Hira": 2, "Hani": 1})
    assert script_counts("Datei öffnen, 3 mal") == Counter({"Latn": 3})


def test_units_skip_placeholders_digits_and_punctuation():
    assert units("%s%s%s version 10000 ....", parse_language("en")) == ["version"]
    assert units("版本 %s 10000", parse_language("zh")) == ["版", "本"]


def test_max_repeat():
    assert max_repeat("a b c a b c a b c".split()) == (3, 3)
    assert max_repeat(list("abcd")) == (1, 1)
    assert max_repeat("x x x x y".split()) == (4, 1)
    assert max_repeat([]) == (1, 1)


# -- detectors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "src, hyp, expected",
    [
        ("Open file", "Datei öffnen", []),
        ("Open file", "   ", ["empty"]),
        ("", "", []),
        ("Open the file", "Datei Datei Datei Datei", ["repetition"]),
        ("Open the file", "Datei Datei Datei", []),
        ("Save the file to disk", "Die Datei speichern" + " auf der Platte" * 6, ["repetition", "length_ratio"]),
        ("Save the file to disk", "Die Datei speichern" + " auf der Platte" * 3, ["repetition"]),
        ("Open the settings dialog of the printer now", "Druck", ["length_ratio"]),
        ("Open %s", "Datei öffnen", ["lost_placeholder"]),
        ("Open %s", "%s öffnen", []),
        ("Could not open the file because it is locked", "Could not open the file because it is locked", ["wrong_language"]),
        ("Could not open the file because it is locked", "Impossible d'ouvrir le fichier car il est verrouillé", ["wrong_language"]),
        ("Open file", "Открыть файл", ["wrong_script"]),
        ("Open file", "OK", []),
    ],
)
def test_detect_en_de(detector, src, hyp, expected):
    assert detector.detect(src, hyp, "en", "de") == expected


def test_detect_cjk_scripts(detector):
    assert detector.detect("Open file", "ファイルを開く", "en", "ja") == []
    assert detector.detect("Open file", "打开文件", "en", "zh") == []
    assert detector.detect("Open file", "ファイルを開く", "en", "zh") == ["wrong_script"]
    assert detector.detect("Open the file", "Open the file", "en", "ja") == ["wrong_script"]
    # unsegmented script: a loop of characters
    assert detector.detect("Open file", "打开文件文件文件文件", "en", "zh") == ["repetition"]


def test_error_summary():
    summary = error_summary([[], ["empty"], ["repetition", "length_ratio"], []])
    assert summary == {
        "counts": {"empty": 1, "repetition": 1, "length_ratio": 1, "wrong_script": 0, "wrong_language": 0,
                   "lost_placeholder": 0},
        "segments_with_error": 2, "n": 4, "rate": 0.5,
    }
    assert list(summary["counts"]) == list(ERROR_KINDS)


def test_usual_length_ratio_is_a_median_over_long_enough_sources():
    srcs = ["a" * 10, "b" * 20, "c" * 10, "short"]
    refs = ["x" * 12, "y" * 30, "z" * 10, "much much longer"]
    assert usual_length_ratio(srcs, refs) == pytest.approx(1.2)
    assert usual_length_ratio([], []) == 1.0


# -- scores --------------------------------------------------------------------------------------
def test_bleu_tokenizers():
    assert [bleu_tokenizer(code) for code in ("de", "zh-CN", "zh-TW", "ja", "th", "ru")] == ["13a", "zh", "zh", "char", "char", "13a"]


def test_corpus_scores_exact_values_and_signatures():
    result = corpus_scores(["Die Katze sitzt auf der Matte.", "Hallo Welt"], ["Die Katze saß auf der Matte.", "Hallo Welt"], "de")
    assert result == {
        "chrf++": 80.83,
        "bleu": 50.2,
        "chrf_signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:2|space:no|version:2.6.0",
        "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
    }
    perfect = corpus_scores(["猫が座った"], ["猫が座った"], "ja")
    assert perfect["chrf++"] == 100.0 and perfect["bleu"] == 100.0
    assert "tok:char" in perfect["bleu_signature"]


def test_corpus_scores_bootstrap_interval():
    hyps = ["Die Katze sitzt auf der Matte.", "Hallo Welt", "Ein Hund", "Datei öffnen"]
    refs = ["Die Katze saß auf der Matte.", "Hallo Welt", "Der Hund", "Datei öffnen"]
    result = corpus_scores(hyps, refs, "de", n_bootstrap=200)
    assert result["bootstrap"] == 200
    assert 0 < result["chrf++_ci95"] < 50
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        corpus_scores(["a", "b"], ["a"], "de")


# -- false positives on real references ----------------------------------------------------------
@pytest.mark.skipif(not HARVEST_TEST.is_file(), reason="run `make data-eval` first")
def test_reference_false_positive_rate_is_small():
    """The detectors judge human references as erroneous rarely (measured: < 0.5% per direction)."""
    records = [json.loads(line) for line in HARVEST_TEST.open(encoding="utf-8")]
    by_lang: dict[str, list[dict]] = {}
    for record in records:
        by_lang.setdefault(record["tgt_lang"], []).append(record)
    detector = ErrorDetector(["en", *by_lang])
    for lang, rows in sorted(by_lang.items()):
        rows = rows[:400]
        ratio = usual_length_ratio([r["src"] for r in rows], [r["tgt"] for r in rows])
        detector.length_ratios[("en", parse_language(lang).code)] = ratio
        flagged = sum(1 for r in rows if detector.detect(r["src"], r["tgt"], "en", lang))
        assert flagged / len(rows) < 0.02, (lang, flagged)
