"""The documentation site builds offline with warnings as errors (`mkdocs build --strict`)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("mkdocstrings") is None
    or importlib.util.find_spec("material") is None,
    reason="needs the docs extra: pip install -e '.[docs]'",
)


def _build(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for the tests of this module."""
    site = tmp_path_factory.mktemp("docs") / "site"
    result = _build(site)
    assert result.returncode == 0, result.stderr[-4000:]
    return site


def _text(html: str) -> str:
    """The visible text of a page: tags dropped, entities left as they are."""
    return re.sub(r"<[^>]+>", "", html)


def test_docs_build_strict_with_api_reference_and_guide(site):
    api = (site / "api" / "results" / "index.html").read_text()
    assert "load_run" in api and "weights_only" in api  # rendered from the docstrings
    guide = (site / "finished-runs-in-python" / "index.html").read_text()
    assert "to_inference_data" in guide  # a user-guide page of its own
    assert (site / "examples" / "sp500" / "index.html").is_file()
    assert (site / "examples" / "sp500" / "config.toml").is_file()  # links into examples/
    assert (site / "architecture" / "index.html").is_file()
    assert (site / "tutorial.ipynb").is_file()
    assert 'href="../examples/sp500/config.toml"' in (
        (site / "the-gradcal-command" / "index.html").read_text()
    )  # a page's ../examples/ link points at the published copy


def test_no_sphinx_math_role_left_in_the_site(site):
    raw = {
        str(page.relative_to(site)): m.group(0)
        for page in site.rglob("*.html")
        for m in [re.search(r".{0,40}:math:.{0,40}", _text(page.read_text()))]
        if m
    }
    assert not raw, f"math shown as raw text (write $...$ or $$...$$): {raw}"


def test_math_is_marked_for_mathjax_in_api_and_guide(site):
    infer = (site / "api" / "infer" / "index.html").read_text()
    assert 'class="arithmatex"' in infer  # the docstrings' $...$
    assert "\\(" in infer and "\\[" in infer  # inline and display math
    guide = (site / "calibrating-generalised-variational-inference" / "index.html").read_text()
    assert 'class="arithmatex"' in guide
    index = (site / "index.html").read_text()
    assert "javascripts/mathjax.js" in index and "mathjax" in index.lower()


def test_home_page_is_the_front_page(site):
    readme = (ROOT / "README.md").read_text()
    first = readme.split("\n\n")[1].split()[:12]  # the README's first sentence, opening words
    home = " ".join(_text((site / "index.html").read_text()).split())
    assert " ".join(first) in home
    assert "vi.run(y, n_epochs=100" in home  # the front page's calibration
    assert 'href="installation/"' in (site / "index.html").read_text()  # docs/ links resolve
    assert 'class="md-search' in (site / "index.html").read_text()  # the theme's search


def test_home_page_hook_relinks_readme():
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        from site_hook import home_page
    finally:
        sys.path.pop(0)
    home = home_page(ROOT)
    assert "](installation.md)" in home  # docs/ prefix dropped
    assert "](docs/" not in home
    assert "](examples/sp500/README.md)" in home
