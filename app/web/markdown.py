"""Safe Markdown: model output and admin text become HTML with raw HTML disabled, then sanitised."""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt

# html=False: any HTML in the source is escaped as text, so `<script>` shows literally.
_md = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True}).enable("table")
_ALLOWED_TAGS = {
    "p",
    "br",
    "pre",
    "code",
    "em",
    "strong",
    "ul",
    "ol",
    "li",
    "blockquote",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "a",
    "del",
}


def render_markdown(text: str) -> str:
    html = _md.render(text)
    # Defence in depth: even if the renderer let something through, only harmless tags survive.
    return nh3.clean(
        html,
        tags=_ALLOWED_TAGS,
        attributes={"a": {"href", "title"}, "code": {"class"}},
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )
