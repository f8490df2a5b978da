"""Caches keyed on code: the digest follows the source files a module can run, and only those."""
from __future__ import annotations

from pathlib import Path

import pytest

from packager.core.code_version import SOURCE_ROOT, code_digest, source_files


def _tree(root: Path) -> Path:
    files = {
        "packager/__init__.py": "__version__ = '0'\n",
        "packager/stage.py": "from packager import helper\n\ndef run():\n    from runtime.shared import f\n    return f()\n",
        "packager/helper.py": "X = 1\n",
        "packager/page.py": "import packager.helper\n",
        "runtime/__init__.py": "",
        "runtime/shared.py": "from .deep import g\n\ndef f():\n    return g()\n",
        "runtime/deep.py": "import numpy\n\ndef g():\n    return 1\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_digest_follows_imports_at_any_depth(tmp_path):
    root = _tree(tmp_path)
    names = sorted(p.relative_to(root).as_posix() for p in source_files(("packager.stage",), root))
    assert names == ["packager/__init__.py", "packager/helper.py", "packager/stage.py", "runtime/__init__.py",
                     "runtime/deep.py", "runtime/shared.py"]
    before = code_digest("packager.stage", root=root)
    code_digest.cache_clear()
    (root / "packager/page.py").write_text("import packager.helper\nTITLE = 'new'\n")  # not run by the stage
    assert code_digest("packager.stage", root=root) == before
    code_digest.cache_clear()
    (root / "runtime/deep.py").write_text("def g():\n    return 2\n")  # two imports away, inside a function
    assert code_digest("packager.stage", root=root) != before
    code_digest.cache_clear()


def test_unknown_modules_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no source file for module"):
        code_digest("packager.nowhere", root=_tree(tmp_path))


def test_real_stages_cover_the_code_they_run():
    def files(module):
        return {p.relative_to(SOURCE_ROOT).as_posix() for p in source_files((module,))}

    assert {"packager/verify.py", "packager/quality.py", "runtime/translator.py", "runtime/protect.py"} <= files("packager.verify")
    assert "packager/report.py" not in files("packager.verify")
    assert "converters/gguf/gguf_file.py" in files("converters.gguf.export")
    assert len(code_digest("packager.prune")) == 64
