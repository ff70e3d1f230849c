"""The explainer's printable forms: they build, fit four to five A4 pages, and are up to date."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from experiments.normalization import printable
from experiments.normalization.figures import FILES

DOCS = printable.DOCS


def _main_text_words(markdown: str) -> int:
    """Words of the main text: before the appendix, without the glossary box, tables, images."""
    main = markdown.split("## Appendix")[0]
    kept = [
        line
        for line in main.splitlines()
        if not line.startswith(("|", ">", "![", "```", "python -m"))
    ]
    return len(" ".join(kept).split())


def test_pdf_builds_in_four_to_five_pages_and_the_committed_copies_are_current(
    tmp_path: Path,
) -> None:
    # The command CI runs (make docs-check), in its own process: the build must not change
    # process-wide state of the test run (WeasyPrint flips a Pillow flag on import).
    built = subprocess.run(
        [sys.executable, "-m", "experiments.normalization.printable", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    pages = printable.pdf_page_count(tmp_path / printable.PDF_NAME)
    assert built.stdout.strip().endswith(f"{pages} A4 pages")
    printed = printable.Printed(
        tmp_path / printable.HTML_NAME, tmp_path / printable.PDF_NAME, pages
    )
    assert printed.pages in printable.PAGES, f"{printed.pages} A4 pages"
    assert printed.pdf.read_bytes()[:5] == b"%PDF-"
    # The committed HTML is what the committed Markdown renders to, and the committed PDF has
    # the page count of a fresh build (its bytes differ run to run: font subset timestamps).
    assert (DOCS / printable.HTML_NAME).read_text() == printed.html.read_text(), (
        "docs/normalization.html is stale: run `make docs`"
    )
    assert printable.pdf_page_count(DOCS / printable.PDF_NAME) == printed.pages


def test_every_figure_is_printed_with_its_caption() -> None:
    html = printable.render_html((DOCS / printable.SOURCE).read_text(), "t")
    figures = re.findall(r'<figure class="([\w-]+)"><img src="figures/\1\.png"', html)
    assert sorted(f"{name}.png" for name in figures) == sorted(FILES)
    captions = re.findall(r"<figcaption>Figure (\d)\. ", html)
    assert captions == [str(n) for n in range(1, len(FILES) + 1)]
    assert "<table>" in html and "<blockquote>" in html  # tables and the glossary box render


def test_main_text_is_about_two_thousand_words_with_a_glossary_first() -> None:
    markdown = (DOCS / printable.SOURCE).read_text()
    assert _main_text_words(markdown) <= 2000
    glossary = markdown.index("> **Words used on this page**")
    # Terms are defined before they are used: the glossary precedes every section.
    assert glossary < markdown.index("## 1.")
    for term in ("*Device, data parallel*", "*Pre-training, fine-tuning*", "*Seed*", "*Head*"):
        assert markdown.index(term) < markdown.index("## 1.")


def test_the_build_leaves_pillow_refusing_truncated_images(tmp_path: Path) -> None:
    from PIL import ImageFile

    printable.build(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_page_count_reader_refuses_a_non_pdf(tmp_path: Path) -> None:
    not_pdf = tmp_path / "x.pdf"
    not_pdf.write_bytes(b"hello")
    try:
        printable.pdf_page_count(not_pdf)
    except ValueError as error:
        assert "no page tree" in str(error)
    else:
        raise AssertionError("a non-PDF was given a page count")
