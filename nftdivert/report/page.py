"""The report's edges: stream a conversation log into a Digest, render the
page (pure: `render`), write it. The page is one file: inline CSS and SVG,
no script, nothing fetched; a Content-Security-Policy says so to the browser
too, so even a value that slipped past escaping could not run or load anything."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from nftdivert.errors import ConfigError
from nftdivert.report.digest import EXAMPLES, ROWS, TIMELINE, Digest, text
from nftdivert.ruleset.render import template_dir

LINE_LIMIT = 1 << 20  # bytes of one record; a longer line is counted unreadable and skipped
WIDTH, ROW = 960, 7  # the timeline's drawing area: pixels wide, pixels per conversation
COLOURS = {"tcp": "#3b73b9", "udp": "#d9822b", "icmp": "#5f9a35", "icmpv6": "#5f9a35"}


def check(path: str) -> None:
    """A log is a regular file or a pipe: a device (/dev/zero) would never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError("LOG", path, exc.strerror or str(exc)) from None
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise ConfigError("LOG", path, "not a regular file or a pipe")


def read(path: str) -> Digest:
    """Stream the log: one line in memory at a time, at most LINE_LIMIT bytes of it."""
    check(path)
    digest = Digest()
    with open(path, "rb") as log:
        while line := log.readline(LINE_LIMIT + 1):
            if len(line) > LINE_LIMIT:  # the rest of it, skipped a piece at a time
                while line and not line.endswith(b"\n"):
                    line = log.readline(LINE_LIMIT)
                digest.lines += 1
                digest.unreadable += 1
            elif line.strip():
                digest.add_line(line)
    return digest


def link(saved: str, out_dir: Path) -> str:
    """A relative link from the report to a saved file: only absolute paths, percent-encoded
    (so no value from the log can become a scheme like javascript:)."""
    if not saved.startswith("/") or "\0" in saved:
        return ""
    href = quote(os.path.relpath(saved, out_dir), safe="/")
    return href if href.startswith(".") else "./" + href


def timeline(digest: Digest) -> dict:
    """Bars of the first conversations: where each starts and ends on a shared time axis."""
    rows = sorted(digest.timeline.values(), key=lambda r: r["start"])
    if not rows:
        return {"bars": [], "height": 0}
    t0 = rows[0]["start"]
    t1 = max(max((r["end"] or r["start"]) for r in rows), t0)
    span = max((t1 - t0).total_seconds(), 0.001)
    bars = []
    for i, r in enumerate(rows):
        x = (r["start"] - t0).total_seconds() / span * WIDTH
        end = r["end"] if r["end"] is not None and r["end"] >= r["start"] else None
        w = ((end or t1) - r["start"]).total_seconds() / span * WIDTH
        bars.append({"x": round(x, 1), "y": i * ROW, "w": round(max(w, 2.0), 1), "open": end is None,
                     "colour": COLOURS.get(r["protocol"], "#888888"),
                     "title": f"{r['time']}  {r['protocol']} {r['client']} -> {r['destination']}"
                              + (f" ({r['name']})" if r["name"] else "")
                              + (f"  {r['ended']}" if r["ended"] else "  no end record")})
    return {"bars": bars, "height": len(rows) * ROW, "width": WIDTH, "from": _clock(t0), "to": _clock(t1),
            "seconds": round(span, 3), "shown": len(rows), "limit": TIMELINE}


def histogram(digest: Digest, height: int = 80) -> dict:
    """Bars of conversation starts per bin over the whole log, scaled to the busiest bin."""
    bins = digest.starts.bins
    if not bins:
        return {"bars": []}
    low, high, width = min(bins), max(bins), digest.starts.width
    slots = high - low + 1
    step, busiest = WIDTH / slots, max(bins.values())
    bars = []
    for index, count in sorted(bins.items()):
        h = max(1.0, count / busiest * height)
        since = _at(index * width)
        bars.append({"x": round((index - low) * step, 1), "w": round(max(step - 0.5, 1.0), 1),
                     "y": round(height - h, 1), "h": round(h, 1),
                     "title": f"{_clock(since)}, {width} s: {count} conversations"})
    return {"bars": bars, "width": WIDTH, "height": height, "bin": width, "busiest": busiest,
            "from": _clock(_at(low * width)), "to": _clock(_at((high + 1) * width))}


def _at(seconds: int) -> datetime:
    """A bin's edge; one beyond the years a datetime holds is clamped to them."""
    try:
        return datetime.fromtimestamp(seconds, timezone.utc)
    except (ValueError, OverflowError, OSError):
        return (datetime.min if seconds < 0 else datetime.max).replace(tzinfo=timezone.utc)


def _clock(stamp: datetime) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def render(digest: Digest, source: str, out_dir: Path) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(template_dir()), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["link"] = lambda saved: link(saved, out_dir)
    return env.get_template("report.html.j2").render(
        d=digest, source=text(source), rows=ROWS, examples=EXAMPLES, timeline=timeline(digest), histogram=histogram(digest),
        span=(_clock(digest.first), _clock(digest.last)) if digest.first and digest.last else None)


def write(log: str, output: str) -> Digest:
    """The page for `log` at `output`, replaced whole; the output is opened before the log is
    read, so a path that cannot be written fails at once, naming it."""
    check(log)
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        handle = open(tmp, "w", encoding="utf-8")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, output) from None
    try:
        with handle:
            digest = read(log)
            handle.write(render(digest, os.path.basename(log), out.resolve().parent))
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest
