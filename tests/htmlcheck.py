"""A page our code wrote, checked as a browser would parse it: html5lib's strict
parser (the HTML5 parsing algorithm, failing on any parse error), then a walk
of the tree for anything active: scripts, handlers, loads, links out."""

from __future__ import annotations

import html5lib

ACTIVE = {"script", "iframe", "object", "embed", "img", "link", "base", "form", "audio", "video",
          "source", "frame", "frameset", "applet"}


def strict_tree(html: str):
    """html5lib's strict parser raises on any parse error; then nothing active may be in the tree."""
    doc = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(html)
    for el in doc.iter():
        tag = el.tag.split("}")[-1].lower() if isinstance(el.tag, str) else ""
        assert tag not in ACTIVE, f"<{tag}> in the report"
        for attr, value in el.attrib.items():
            attr = attr.split("}")[-1].lower()
            assert not attr.startswith("on"), f"{attr}= on <{tag}>"
            if attr in ("href", "src", "xlink:href", "action"):
                assert value.startswith(("./", "../")) and ":" not in value, f"{attr}={value!r} on <{tag}>"
            else:
                assert "javascript" not in value.lower(), f"{attr}={value!r}"
        if tag == "meta" and el.attrib.get("http-equiv", "").lower() == "refresh":
            raise AssertionError("a refresh in the report")
        if tag == "style":
            assert "url(" not in (el.text or "") and "@import" not in (el.text or "")
    return doc


def text_of(doc) -> str:
    return "".join(doc.itertext())
