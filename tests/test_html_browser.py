"""The HTML report as a person sees it: rendered by headless Chromium, then read back from
the screenshot's pixels.

Two renderings of the same page at the same window size: one of the page exactly as written
(the screenshot), one of a copy with a measuring script appended that records where every
heat-map cell and legend swatch landed (``--dump-dom``). The script only sets attributes, so
both layouts are identical. Then the screenshot's pixels at those places must show the
verdict colours: a blocked bucket red, a rejected one orange, a bucket with one blocked port
in a thousand a visible red band, and so on.

Set UDPREACH_SCREENSHOT_DIR to keep the screenshot for a look.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from docsamples import build_doc

from udpreach.core.expect import judge, parse_expect
from udpreach.render.html import COLOURS, write_html

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1400, 1000

MEASURE = """<script>
for (const el of document.querySelectorAll('.cell, .legend [data-legend] .swatch')) {
  const r = el.getBoundingClientRect();
  el.setAttribute('data-rect', [r.x, r.y, r.width, r.height].join(','));
  el.setAttribute('data-bg', getComputedStyle(el).backgroundImage + ' ' +
                  getComputedStyle(el).backgroundColor);
}
document.body.setAttribute('data-measured', 'yes');
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
            f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={WIDTH},{HEIGHT}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ, HOME=str(tmp)),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# A small PNG reader (8-bit RGB/RGBA, not interlaced: what Chromium writes).


def read_png(data: bytes, max_rows: int | None = None) -> tuple[int, int, int, list[bytes]]:
    """Decode a PNG into (width, height, bytes per pixel, rows of raw pixel bytes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    width = height = bpp = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8, depth
            assert ctype in (2, 6), ctype
            assert interlace == 0
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(min(height, max_rows or height)):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif ftype == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev, strict=True))
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif ftype == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def _hex(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


class Shot:
    def __init__(self, png: bytes, max_rows: int) -> None:
        self.width, self.height, self.bpp, self.rows = read_png(png, max_rows)

    def pixel(self, x: float, y: float) -> tuple[int, int, int]:
        row = self.rows[int(y)]
        i = int(x) * self.bpp
        return row[i], row[i + 1], row[i + 2]

    def looks(self, x: float, y: float, colour: str, tol: int = 8) -> bool:
        got = self.pixel(x, y)
        return all(abs(g - w) <= tol for g, w in zip(got, _hex(colour), strict=True))


class _Measured(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[int, int], dict[str, Any]] = {}
        self.legend: dict[str, dict[str, Any]] = {}
        self._legend_key: str | None = None
        self.measured = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body" and a.get("data-measured") == "yes":
            self.measured = True
        if "data-legend" in a:
            self._legend_key = a["data-legend"]
        rect = a.get("data-rect")
        if not rect:
            return
        x, y, w, h = (float(v) for v in rect.split(","))
        info = dict(a, x=x, y=y, w=w, h=h)
        if "cell" in a.get("class", "").split():
            self.cells[(int(a["data-dst"]), int(a["data-first"]))] = info
        elif self._legend_key:
            self.legend[self._legend_key] = info


# ---------------------------------------------------------------------------------------


def _doc() -> dict[str, Any]:
    """Buckets of 1008 ports from 1024: bucket k starts at 1024 + 1008 k."""

    def bucket(k: int) -> tuple[int, int]:
        return 1024 + 1008 * k, 1024 + 1008 * k + 1007

    b10, b20, b5, b6, b40 = bucket(10), bucket(20), bucket(5), bucket(6), bucket(40)
    b30 = bucket(30)
    spans = [
        {"dst": 5000, "first": b10[0], "last": b10[1], "verdict": "blocked"},
        {"dst": 5000, "first": b20[0], "last": b20[1], "verdict": "rejected",
         "icmp": {"type": 3, "code": 13, "from": "198.18.2.1"}},
        {"dst": 5001, "first": b5[0], "last": b5[1], "verdict": "untested"},
        {"dst": 5001, "first": b6[0], "last": b6[1], "verdict": "unknown"},
        # Two thirds open, one third blocked.
        {"dst": 5002, "first": b30[0] + 672, "last": b30[1], "verdict": "blocked"},
        # One blocked port in the bucket: it must still show.
        {"dst": 5002, "first": bucket(50)[0] + 500, "last": bucket(50)[0] + 500,
         "verdict": "blocked"},
        {"dst": 5003, "first": b40[0], "last": b40[1], "verdict": "open", "translated": True},
    ]  # fmt: skip
    doc = build_doc("browser-run", dst=(5000, 5001, 5002, 5003), spans=spans, complete=False)
    # The expectation covers 5000 and 5001 only: their closed buckets are outlined.
    entries = parse_expect(
        '[[expect]]\ndst_ports = "5000-5001"\nsrc_ports = "1024-65535"\nverdict = "open"\n'
    )
    doc["deviations"] = judge(doc, entries)
    return doc


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[_Measured, Shot, str]:
    if CHROMIUM is None:
        who = "as root, `make test` installs it" if os.geteuid() == 0 else "not root"
        pytest.skip(f"chromium is not installed ({who}); the page cannot be looked at")
    tmp = tmp_path_factory.mktemp("browser")
    page = tmp / "run.html"
    write_html(_doc(), page)
    text = page.read_text()
    probe = tmp / "measure.html"
    probe.write_text(text.replace("</body>", MEASURE + "</body>"))

    dom = _chromium(tmp, "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    measured = _Measured()
    measured.feed(dom.stdout)
    assert measured.measured, "the measuring script did not run"

    png = tmp / "run.png"
    shot = _chromium(tmp, f"--screenshot={png}", page.as_uri())
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.exists(), shot.stderr[-2000:]
    keep = os.environ.get("UDPREACH_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / "udpreach-run.png")
    bottom = max(c["y"] + c["h"] for c in measured.cells.values())
    assert bottom < HEIGHT, "the heat map should be visible without scrolling"
    return measured, Shot(png.read_bytes(), int(bottom) + 2), dom.stdout


def _centre(c: dict[str, Any]) -> tuple[float, float]:
    return c["x"] + c["w"] / 2, c["y"] + c["h"] / 2


def test_every_bucket_is_drawn(rendered: tuple[_Measured, Shot, str]) -> None:
    measured, shot, _ = rendered
    assert len(measured.cells) == 4 * 64
    assert shot.width == WIDTH
    for c in measured.cells.values():
        assert c["w"] >= 6, c  # large enough to see and hover
        assert c["h"] >= 12, c


@pytest.mark.parametrize(
    ("dst", "bucket", "verdict"),
    [
        (5000, 0, "open"),
        (5000, 10, "blocked"),
        (5000, 20, "rejected"),
        (5001, 5, "untested"),
        (5001, 6, "unknown"),
        (5003, 40, "open"),
    ],
)
def test_pure_buckets_show_their_verdict_colour(
    rendered: tuple[_Measured, Shot, str], dst: int, bucket: int, verdict: str
) -> None:
    measured, shot, _ = rendered
    c = measured.cells[(dst, 1024 + 1008 * bucket)]
    assert c["data-verdict"] == verdict
    x, y = _centre(c)
    assert shot.looks(x, y, COLOURS[verdict]), (shot.pixel(x, y), COLOURS[verdict])
    assert f"{verdict} 1008" in c["title"]


def test_a_mixed_bucket_shows_both_colours(rendered: tuple[_Measured, Shot, str]) -> None:
    measured, shot, _ = rendered
    c = measured.cells[(5002, 1024 + 1008 * 30)]
    assert c["data-verdict"] == "mixed"
    assert json.loads(c["data-counts"]) == {"open": 672, "blocked": 336}
    assert "open 672, blocked 336" in c["title"]
    x = c["x"] + c["w"] / 2
    # Open is the lower band (two thirds), blocked the upper third.
    assert shot.looks(x, c["y"] + c["h"] * 0.85, COLOURS["open"])
    assert shot.looks(x, c["y"] + c["h"] * 0.12, COLOURS["blocked"])


def test_one_blocked_port_in_a_thousand_still_shows(rendered: tuple[_Measured, Shot, str]) -> None:
    measured, shot, _ = rendered
    c = measured.cells[(5002, 1024 + 1008 * 50)]
    assert json.loads(c["data-counts"]) == {"open": 1007, "blocked": 1}
    x = c["x"] + c["w"] / 2
    assert shot.looks(x, c["y"] + c["h"] * 0.08, COLOURS["blocked"])
    assert shot.looks(x, c["y"] + c["h"] * 0.7, COLOURS["open"])


def test_deviating_buckets_are_outlined(rendered: tuple[_Measured, Shot, str]) -> None:
    measured, shot, _ = rendered
    dev = measured.cells[(5000, 1024 + 1008 * 10)]
    plain = measured.cells[(5002, 1024 + 1008 * 30)]  # blocked, but not judged
    assert "dev" in dev["class"]
    assert "dev" not in plain["class"]
    # The outline is 2 px of black inside the cell's edge; the colour shows inside it.
    x = dev["x"] + dev["w"] / 2
    assert shot.looks(x, dev["y"] + 0.5, "#000000", tol=40)
    assert shot.looks(x, dev["y"] + dev["h"] - 0.5, "#000000", tol=40)
    assert shot.looks(x, dev["y"] + 3.5, COLOURS["blocked"])
    x = plain["x"] + plain["w"] / 2
    assert shot.looks(x, plain["y"] + 0.5, COLOURS["blocked"])


def test_translated_buckets_carry_a_white_dot(rendered: tuple[_Measured, Shot, str]) -> None:
    measured, shot, _ = rendered
    c = measured.cells[(5003, 1024 + 1008 * 40)]
    assert "nat" in c["class"]
    assert "1008 translated (NAT)" in c["title"]
    # The dot: 4x4 px, 2 px from the top right corner.
    assert shot.looks(c["x"] + c["w"] - 4, c["y"] + 4, "#ffffff", tol=30)


def test_the_legend_names_every_colour(rendered: tuple[_Measured, Shot, str]) -> None:
    measured, shot, _ = rendered
    for verdict, colour in COLOURS.items():
        sw = measured.legend[verdict]
        assert shot.looks(*_centre(sw), colour), verdict
    assert {"mixed", "nat", "deviation", "none"} <= measured.legend.keys()


def test_the_page_lists_the_deviations(rendered: tuple[_Measured, Shot, str]) -> None:
    _, _, dom = rendered
    section = dom[dom.index('id="deviations"') :]
    section = section[: section.index("</section>")]
    text = re.sub(r"<[^>]+>", " ", section)
    assert "4,032 cells deviate" in text  # four closed buckets of 1008 on 5000-5001
    rows = re.findall(r"<tr>(.*?)</tr>", section)
    cells = [re.sub(r"<[^>]+>", "", r) for r in rows]
    assert any("11104-12111" in r and "blocked" in r and "open" in r for r in cells), cells
    assert any("6064-7071" in r and "untested" in r for r in cells), cells
