"""The explainer's printable forms: docs/normalization.md -> normalization.html -> normalization.pdf.

    python -m experiments.normalization.printable                 # writes both into docs/
    python -m experiments.normalization.printable --out-dir /tmp/x   # elsewhere (CI's check)

Markdown is rendered by markdown-it-py (CommonMark + tables), the PDF by WeasyPrint (A4, figures
at text width, page numbers). Both are Python packages from the dev lock file, so the build
needs no system tool beyond the Pango library WeasyPrint draws text with. The HTML references
the figures relatively, so it works in docs/ as it is; the PDF embeds them.
"""

from __future__ import annotations

import argparse
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

DOCS = Path(__file__).resolve().parents[2] / "docs"
SOURCE = "normalization.md"
HTML_NAME = "normalization.html"
PDF_NAME = "normalization.pdf"
# The print budget: four to five A4 pages, figures included.
PAGES = range(4, 6)

CSS = """
@page {
  size: A4;
  margin: 16mm 17mm 17mm 17mm;
  @bottom-center { content: counter(page) " / " counter(pages); font-size: 8pt; color: #555; }
}
html { font-family: "DejaVu Serif", serif; font-size: 9.2pt; line-height: 1.33; color: #111; }
body { max-width: 46em; margin: 0 auto; }
h1 { font-family: "DejaVu Sans", sans-serif; font-size: 15pt; margin: 0 0 0.4em; line-height: 1.2; }
h2 { font-family: "DejaVu Sans", sans-serif; font-size: 11.5pt; margin: 1.0em 0 0.3em;
     break-after: avoid; }
h3 { font-family: "DejaVu Sans", sans-serif; font-size: 10pt; margin: 0.8em 0 0.25em;
     break-after: avoid; }
p, li { margin: 0.25em 0; text-align: left; }
ul, ol { margin: 0.2em 0; padding-left: 1.4em; }
code { font-family: "DejaVu Sans Mono", monospace; font-size: 0.86em; }
pre { background: #f4f4f4; padding: 0.35em 0.6em; font-size: 8pt; white-space: pre-wrap; }
blockquote { border: 0.6pt solid #888; background: #f7f7f2; margin: 0.6em 0; padding: 0.2em 0.8em;
             font-size: 8.6pt; break-inside: avoid; }
table { border-collapse: collapse; width: 100%; margin: 0.5em 0; font-size: 7.8pt;
        break-inside: avoid; }
th, td { border-bottom: 0.5pt solid #bbb; padding: 0.15em 0.35em; text-align: left;
         vertical-align: top; }
th { border-bottom: 0.9pt solid #444; font-family: "DejaVu Sans", sans-serif; }
td + td { white-space: nowrap; }  /* "80.5 ± 4.5" never splits; the first column wraps */
figure { margin: 0.5em auto 0.6em; break-inside: avoid; width: 100%; }
figure img { display: block; width: 100%; margin: 0 auto; }
figcaption { font-size: 8pt; font-style: italic; color: #333; margin-top: 0.15em; }
/* The figures are drawn 16 cm wide (figures.py), so at this width their lettering prints at
   8 pt or more; a figure that would not fit moves to the next page whole. */
figure { width: 92%; }
a { color: #1a4d8f; text-decoration: none; }
"""


@dataclass(frozen=True)
class Printed:
    html: Path
    pdf: Path
    pages: int


# A figure in the Markdown is an image with its italic caption on the next line (one paragraph).
_FIGURE = re.compile(
    r'<p><img src="figures/(?P<name>[\w-]+)\.png" alt="(?P<alt>[^"]*)" />\n'
    r"<em>(?P<caption>.*?)</em></p>",
    flags=re.DOTALL,
)


def _figure(match: re.Match[str]) -> str:
    name, alt, caption = match["name"], match["alt"], match["caption"]
    return (
        f'<figure class="{name}"><img src="figures/{name}.png" alt="{alt}" />'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def render_html(markdown: str, title: str) -> str:
    """A standalone HTML page: the rendered Markdown and the print stylesheet."""
    body = _FIGURE.sub(_figure, MarkdownIt("commonmark").enable("table").render(markdown))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )


def title_of(markdown: str) -> str:
    match = re.search(r"^# (.+)$", markdown, flags=re.MULTILINE)
    return match.group(1) if match else SOURCE


def build(out_dir: Path, docs: Path = DOCS) -> Printed:
    """Write the HTML and the PDF of docs/normalization.md into out_dir; count the pages."""
    from PIL import ImageFile

    # weasyprint sets Pillow's process-wide LOAD_TRUNCATED_IMAGES on import; a process that
    # goes on decoding other images (a test run) must still refuse truncated ones.
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    from weasyprint import HTML  # imported here: only this build needs it (and Pango)

    ImageFile.LOAD_TRUNCATED_IMAGES = truncated

    markdown = (docs / SOURCE).read_text(encoding="utf-8")
    html = render_html(markdown, title_of(markdown))
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, pdf_path = out_dir / HTML_NAME, out_dir / PDF_NAME
    html_path.write_text(html, encoding="utf-8")
    # base_url = docs/: the figures are found where the Markdown says they are.
    document = HTML(string=html, base_url=str(docs) + "/").render()
    document.write_pdf(pdf_path)
    return Printed(html_path, pdf_path, len(document.pages))


def pdf_page_count(path: Path) -> int:
    """Pages of a PDF WeasyPrint wrote: the /Count of its page tree, which may sit inside a
    compressed object stream (so every Flate stream is inflated and searched)."""
    data = path.read_bytes()
    chunks = [data]
    for match in re.finditer(rb"stream\r?\n", data):
        try:
            chunks.append(zlib.decompressobj().decompress(data[match.end() :]))
        except zlib.error:
            continue  # not a Flate stream (e.g. an image in another encoding)
    for chunk in chunks:
        found = re.search(rb"/Type\s*/Pages\b[^>]*?/Count (\d+)", chunk)
        if found:
            return int(found.group(1))
    raise ValueError(f"{path}: no page tree found; is it a PDF?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DOCS, help="default: docs/")
    args = parser.parse_args(argv)
    printed = build(args.out_dir)
    print(f"wrote {printed.html} and {printed.pdf}: {printed.pages} A4 pages")
    if printed.pages not in PAGES:
        print(
            f"error: {printed.pages} pages; the explainer must print in "
            f"{PAGES.start} to {PAGES.stop - 1} A4 pages",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
