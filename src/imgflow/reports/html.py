"""Self-contained HTML: inline CSS, images as base64 data URIs, no scripts, every text escaped.

A page is built from small functions returning `Markup` (HTML that is already safe); anything
else passed in is text and gets escaped, so a class or file name can never inject markup.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Iterable, Mapping, Sequence

CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: #222; max-width: 1180px; margin: 0 auto; padding: 1.5em 2em 4em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2.2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
.subtitle { color: #666; margin-top: 0; }
nav { font-size: 0.92em; margin: 1em 0 0; }
nav a { margin-right: 0.9em; color: #1f5fa8; text-decoration: none; white-space: nowrap; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { padding: 0.25em 0.75em; border-bottom: 1px solid #e6e6e6; text-align: left;
         vertical-align: top; }
th { background: #f4f6f8; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eef7ee; font-weight: 600; }
table.kv th { background: none; font-weight: normal; color: #555; }
.headline { font-size: 1.15em; }
.big { font-size: 1.5em; font-weight: 600; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.9em; margin: 0.8em 0; }
.muted { color: #777; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0.5em 0; max-width: 100%; overflow-x: auto; }
figure img { max-width: none; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
code { font-size: 0.92em; background: #f4f4f4; padding: 0 0.25em; }
.scroll { max-height: 28em; overflow-y: auto; }
"""


class Markup(str):
    """HTML that is safe to insert as is (built by this module's functions)."""


def esc(value) -> Markup:
    """Text -> HTML; Markup passes through unchanged."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable) -> Markup:
    return Markup("".join(esc(p) for p in parts))


def tag(name: str, *content, **attrs) -> Markup:
    """<name attrs>content</name>; attribute names use _ for - and a trailing _ for keywords."""
    rendered = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"'
                       for k, v in attrs.items() if v is not None)
    return Markup(f"<{name}{rendered}>{join(content)}</{name}>")


def number(value: float, text: str, id: str | None = None) -> Markup:
    """A formatted number that carries its exact value, so a reader (or test) can check it."""
    return tag("span", text, id=id, class_="value", data_value=repr(value))


def image(png: Path, alt: str, caption: str | None = None) -> Markup:
    """A PNG embedded as a data URI, inside a <figure> with an optional caption.

    Shown at its own size (one image pixel per CSS pixel, the size its fonts were chosen for);
    a figure wider than the page scrolls rather than shrinking its text below legibility.
    """
    from PIL import Image

    data = Path(png).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        width = im.width
    encoded = base64.b64encode(data).decode("ascii")
    img = Markup(f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}" '
                 f'style="width:{width}px">')
    return tag("figure", img, tag("figcaption", caption) if caption else "")


def figures(*items: Markup) -> Markup:
    """Figures side by side, wrapping on narrow screens."""
    return tag("div", *items, class_="figures")


def paragraph(*content, class_: str | None = None) -> Markup:
    return tag("p", *content, class_=class_)


def note(*content) -> Markup:
    return tag("div", *content, class_="note")


def table(header: Sequence, rows: Iterable[Sequence], numeric: Sequence[int] = (),
          row_classes: Sequence[str | None] | None = None, id: str | None = None) -> Markup:
    """A table; columns whose index is in `numeric` are right-aligned."""
    numeric = set(numeric)
    head = tag("tr", *(tag("th", h, class_="num" if i in numeric else None)
                       for i, h in enumerate(header)))
    body = []
    for r, row in enumerate(rows):
        cls = row_classes[r] if row_classes is not None else None
        body.append(tag("tr", *(tag("td", c, class_="num" if i in numeric else None)
                                for i, c in enumerate(row)), class_=cls))
    return tag("table", tag("thead", head), tag("tbody", *body), id=id)


def key_values(items: Mapping, id: str | None = None) -> Markup:
    """A two-column table of name -> value; lists are joined with commas."""
    def show(v) -> str:
        if isinstance(v, (list, tuple)):
            return ", ".join(str(x) for x in v)
        return "—" if v is None else str(v)

    rows = "".join(tag("tr", tag("th", k), tag("td", v if isinstance(v, Markup) else show(v)))
                   for k, v in items.items())
    return tag("table", Markup(rows), class_="kv", id=id)


def section(id: str, title: str, *content) -> Markup:
    return tag("section", tag("h2", title), *content, id=id)


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, Markup]]) -> str:
    """The whole document: title, a table of contents, then (id, heading, body) sections."""
    nav = tag("nav", *(tag("a", heading, href=f"#{sid}") for sid, heading, _ in sections))
    body = join(section(sid, heading, content) for sid, heading, content in sections)
    return ("<!DOCTYPE html>\n"
            + tag("html",
                  tag("head", Markup('<meta charset="utf-8">'),
                      Markup('<meta name="viewport" content="width=device-width, initial-scale=1">'),
                      tag("title", title), tag("style", Markup(CSS))),
                  tag("body", tag("h1", title), paragraph(subtitle, class_="subtitle"), nav, body),
                  lang="en")
            + "\n")
