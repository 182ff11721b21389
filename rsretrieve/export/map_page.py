"""A self-contained HTML page of query results: per query, an SVG map of its footprint and its hits'
beside their thumbnails, scores and labels.

The page needs no network at all: the maps are SVG drawn here (Web Mercator fitted to the
footprints, a graticule with degree labels, a scale bar; no web tiles), thumbnails are PNGs inlined
as data URIs, the style and a few lines of script (hovering a card lights its footprint and back)
are inline, and a Content-Security-Policy forbids every fetch. Tooltips are SVG <title>s.

Input is plain data (`rsretrieve.retrieval.results.map_page_data` makes it): GeoJSON geometry dicts
in lon/lat, PNG bytes, numbers and strings; this module reads no store and no dataset.

Where the footprints (1.2 km squares) spread over a region so large that they would shrink below
`TINY_PX` on the map, neighbouring ones (within `PLACE_GAP_M`) are grouped into places: the map
marks each place with a letter, and an inset map per place (up to `MAX_INSETS`) shows its
footprints, numbered.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

EARTH_M = 6378137.0
MAP_W, MAP_H = 560, 380
INSET_W, INSET_H = 270, 200
TINY_PX = 12.0  # a footprint smaller than this on the map is drawn in an inset
PLACE_GAP_M = 5000.0  # footprints this close share an inset
MIN_SPAN_M = 3500.0  # a map spans at least this much ground
MAX_INSETS = 6
QUERY_COLOUR = "#e63c1e"  # the mosaic's query frame
VIRIDIS = ((68, 1, 84), (65, 68, 135), (42, 120, 142), (34, 168, 132), (122, 209, 81))  # rank 1 .. k (no yellow: it needs a light page)
RANDOM_BANNER = "RANDOM WEIGHTS: these scores are not results"
STEPS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 45, 90)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 picture as PNG bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def rank_colour(rank: int, k: int) -> str:
    t = (rank - 1) / max(k - 1, 1) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b, f = VIRIDIS[i], VIRIDIS[i + 1], t - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))


# -- geometry ------------------------------------------------------------------------------------------
def _rings(geometry: dict | None, ref_lon: float) -> list[np.ndarray]:
    """The rings of a GeoJSON (Multi)Polygon as (N, 2) lon/lat arrays, longitudes unwrapped to within
    180 degrees of `ref_lon` (a footprint cut at the antimeridian comes back whole)."""
    if not geometry:
        return []
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    rings = [np.asarray(ring, dtype=np.float64)[:, :2] for polygon in polygons for ring in polygon]
    for ring in rings:
        ring[:, 0] = ref_lon + (ring[:, 0] - ref_lon + 180.0) % 360.0 - 180.0
    return rings


def _merc(lat):
    return np.log(np.tan(np.pi / 4 + np.radians(np.clip(lat, -85.0, 85.0)) / 2))


class _Frame:
    """Web Mercator fitted to a lon/lat box (w, s, e, n) in an SVG of `width` x `height` px."""

    def __init__(self, box, width: int, height: int, pad: float = 0.12):
        w, s, e, n = box
        self.width, self.height = width, height
        lat = (s + n) / 2
        least = MIN_SPAN_M / (EARTH_M * math.cos(math.radians(lat)))  # radians of Mercator x (and y, near `lat`)
        x0, x1, y0, y1 = math.radians(w), math.radians(e), float(_merc(s)), float(_merc(n))
        dx, dy = max(x1 - x0, least) * (1 + 2 * pad), max(y1 - y0, least) * (1 + 2 * pad)
        self.cx, self.cy = (x0 + x1) / 2, (y0 + y1) / 2
        self.scale = min(width / dx, height / dy)  # px per radian
        self.metres_per_px = EARTH_M * math.cos(math.radians(lat)) / self.scale

    def xy(self, lonlat: np.ndarray) -> np.ndarray:
        x = self.width / 2 + (np.radians(lonlat[:, 0]) - self.cx) * self.scale
        y = self.height / 2 - (_merc(lonlat[:, 1]) - self.cy) * self.scale
        return np.column_stack([x, y])

    def lon_at(self, x: float) -> float:
        return math.degrees(self.cx + (x - self.width / 2) / self.scale)

    def lat_at(self, y: float) -> float:
        return math.degrees(2 * math.atan(math.exp(self.cy - (y - self.height / 2) / self.scale)) - math.pi / 2)


def _box(rings: list[np.ndarray]) -> tuple[float, float, float, float]:
    every = np.concatenate(rings)
    return float(every[:, 0].min()), float(every[:, 1].min()), float(every[:, 0].max()), float(every[:, 1].max())


def _degrees(value: float, step: float, axis: str) -> str:
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    if axis == "lon":
        value = (value + 180.0) % 360.0 - 180.0
    hemisphere = ("E", "W") if axis == "lon" else ("N", "S")
    text = f"{abs(value):.{digits}f}"
    return f"{text}°" if float(text) in (0.0, 180.0) else f"{text}°{hemisphere[value < 0]}"


def _step(span: float) -> float:
    return next((s for s in STEPS if span / s <= 5), STEPS[-1])


def _graticule(frame: _Frame) -> list[str]:
    """Meridians and parallels (straight lines in Mercator) with their degree labels."""
    out = ['<g class="graticule">']
    lon0, lon1 = frame.lon_at(0), frame.lon_at(frame.width)
    lat0, lat1 = frame.lat_at(frame.height), frame.lat_at(0)
    for axis, lo, hi in (("lon", lon0, lon1), ("lat", lat0, lat1)):
        step = _step(hi - lo)
        for i in range(math.ceil(lo / step), math.floor(hi / step) + 1):
            value = i * step
            if axis == "lon":  # labels along the top; the left edge has the latitudes, the bottom right the scale bar
                x = float(frame.xy(np.array([[value, lat0]]))[0, 0])
                out.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{frame.height}"/>')
                if 44 < x < frame.width - 44:
                    out.append(f'<text class="deg" x="{x:.1f}" y="11" text-anchor="middle">{_degrees(value, step, axis)}</text>')
            else:
                y = float(frame.xy(np.array([[lon0, value]]))[0, 1])
                out.append(f'<line x1="0" y1="{y:.1f}" x2="{frame.width}" y2="{y:.1f}"/>')
                if 24 < y < frame.height - 6:
                    out.append(f'<text class="deg" x="3" y="{y - 3:.1f}">{_degrees(value, step, axis)}</text>')
    out.append("</g>")
    return out


def _scale_bar(frame: _Frame) -> list[str]:
    wanted = frame.metres_per_px * frame.width / 5
    metres = max((m * 10**e for e in range(0, 8) for m in (1, 2, 5) if m * 10**e <= wanted), default=1)
    px = metres / frame.metres_per_px
    x1, y = frame.width - 12, frame.height - 14
    x0 = x1 - px
    text = f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"
    return [f'<g class="scale"><path d="M{x0:.1f},{y - 4} V{y} H{x1:.1f} V{y - 4}"/>',
            f'<text x="{(x0 + x1) / 2:.1f}" y="{y - 6}" text-anchor="middle">{text}</text></g>']


# -- one map -----------------------------------------------------------------------------------------
def _path(rings: list[np.ndarray], frame: _Frame) -> str:
    return " ".join("M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in frame.xy(ring)) + " Z" for ring in rings)


def _svg(items: list[dict], frame: _Frame, detail: bool, markers: list[tuple[str, float, float, str]], label: str) -> str:
    """One map: graticule, the footprints (biggest first, the query last but on top of its own
    size class), number labels where a footprint is big enough to carry one, place markers."""
    width, height = frame.width, frame.height
    out = [f'<svg class="map{" inset" if detail else ""}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(label)}">',
           f'<rect class="sea" width="{width}" height="{height}"/>', *_graticule(frame)]
    labels = []
    drawn = sorted((it for it in items if it["rings"]), key=lambda it: (-it["area"], it["rank"] == 0))
    for it in drawn:
        pts = frame.xy(np.concatenate(it["rings"]))
        size = float(np.ptp(pts, axis=0).max())
        role = ("query" if it["rank"] == 0 else "result") + ("-detail" if detail else "")
        cls = "fp q" if it["rank"] == 0 else "fp"
        out.append(f'<path class="{cls}" data-role="{role}" data-rank="{it["rank"]}" data-key="{it["key"]}" d="{_path(it["rings"], frame)}" '
                   f'style="--c:{it["colour"]}"><title>{html.escape(it["tooltip"])}</title></path>')
        if size >= TINY_PX:  # on the footprint, or beside it where it is small: its colour stays visible
            x, y = (pts.min(axis=0) + pts.max(axis=0)) / 2
            x, anchor = (float(pts[:, 0].max()) + 3, "start") if size < 3 * TINY_PX else (float(x), "middle")
            labels.append((it["rank"], x, float(y), it["short"], anchor))
    merged: list[list] = []  # footprints on top of each other (a query that is an archive patch and its copy) share a label
    for _, x, y, text, anchor in sorted(labels):
        near = next((m for m in merged if abs(m[0] - x) < 16 and abs(m[1] - y) < 12), None)
        if near:
            near[2] += "," + text
        else:
            merged.append([x, y, text, anchor])
    for letters, x, y, tip in markers:
        w = 10 + 7 * len(letters)
        out.append(f'<g class="place"><title>{html.escape(tip)}</title><rect x="{x - w / 2:.1f}" y="{y - 9:.1f}" width="{w}" height="18" rx="9"/>'
                   f'<text x="{x:.1f}" y="{y + 4:.1f}">{letters}</text></g>')
    for x, y, text, anchor in merged:  # a white halo under the number: the same text, stroked
        out += [f'<text class="{cls}" x="{x:.1f}" y="{y + 4:.1f}" text-anchor="{anchor}">{text}</text>' for cls in ("num halo", "num")]
    out += _scale_bar(frame) + ["</svg>"]
    return "".join(out)


def _places(items: list[dict], frame: _Frame) -> list[list[dict]]:
    """Footprints too small on `frame`, grouped by single linkage: within PLACE_GAP_M of each other
    (their lon/lat boxes, compared in metres). Ordered by their best rank (the query's place first)."""
    tiny = []
    for it in items:
        if it["rings"] and float(np.ptp(frame.xy(np.concatenate(it["rings"])), axis=0).max()) < TINY_PX:
            tiny.append(it)
    group = list(range(len(tiny)))

    def root(i):
        while group[i] != i:
            i = group[i]
        return i

    for i, a in enumerate(tiny):
        for j in range(i):
            b = tiny[j]
            lat = math.radians((a["box"][1] + b["box"][3]) / 2)
            gap_x = max(a["box"][0] - b["box"][2], b["box"][0] - a["box"][2], 0) * math.cos(lat)
            gap_y = max(a["box"][1] - b["box"][3], b["box"][1] - a["box"][3], 0)
            if math.radians(math.hypot(gap_x, gap_y)) * EARTH_M <= PLACE_GAP_M:
                group[root(i)] = root(j)
    places: dict[int, list[dict]] = {}
    for i, it in enumerate(tiny):
        places.setdefault(root(i), []).append(it)
    return sorted(places.values(), key=lambda p: min(it["rank"] for it in p))


def _maps(items: list[dict], number: int) -> str:
    """The section's maps: one fitted to every footprint; when some are too small to see there, a
    letter marker per place on it and an inset map per place."""
    located = [it for it in items if it["rings"]]
    if not located:
        return '<p class="nomap">No footprint to map: neither the query nor its results are georeferenced.</p>'
    frame = _Frame(_box([r for it in located for r in it["rings"]]), MAP_W, MAP_H)
    places = _places(located, frame)
    markers, insets = [], []
    for n, place in enumerate(places):
        letter = chr(ord("A") + n) if n < 26 else str(n + 1)
        for it in place:
            it["place"] = letter
        box = _box([r for it in place for r in it["rings"]])
        x, y = frame.xy(np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]]))[0]
        near = next((m for m in markers if abs(m[1] - x) < 24 and abs(m[2] - y) < 18), None)
        tip = f"{letter}: " + ", ".join(it["short"] for it in place)
        if near:  # places that overlap on the map share one marker
            markers[markers.index(near)] = (near[0] + letter, near[1], near[2], near[3] + "\n" + tip)
        else:
            markers.append((letter, float(x), float(y), tip))
        if n < MAX_INSETS:
            inset = _Frame(box, INSET_W, INSET_H)
            caption = f"{letter}: " + ", ".join("query" if it["rank"] == 0 else f"#{it['rank']}" for it in place)
            insets.append(f'<figure class="inset-fig">{_svg(items, inset, True, [], f"place {letter} of query {number}")}'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts = [f'<figure class="main-fig">{_svg(items, frame, False, markers, f"map of query {number} and its results")}']
    lost = [it["short"] for it in items if not it["rings"]]
    note = f" Not georeferenced: {', '.join(lost)}." if lost else ""
    if places:
        note += " Lettered markers: footprints too small at this scale, shown in the insets below."
        if len(places) > MAX_INSETS:
            note += f" ({len(places) - MAX_INSETS} more places have no inset.)"
    parts.append(f"<figcaption>Web Mercator, WGS84 degrees. Query outlined in red, results coloured by rank.{html.escape(note)}</figcaption></figure>")
    if insets:
        parts.append(f'<div class="insets">{"".join(insets)}</div>')
    return "".join(parts)


# -- the page ------------------------------------------------------------------------------------------
def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _card(it: dict, png: bytes, lines: list[str]) -> str:
    cls = "card q" if it["rank"] == 0 else "card"
    where = f" · place {it['place']}" if it.get("place") else ("" if it["rings"] else " · no location")
    text = "".join(f"<div>{line}</div>" for line in lines)
    return (f'<li class="{cls}" data-key="{it["key"]}"><span class="swatch" style="background:{it["colour"]}">{it["short"]}</span>'
            f'<img class="thumb" src="{_data_uri(png)}" alt="{html.escape(it["tooltip"].splitlines()[0])}" width="120" height="120">'
            f'<div class="meta">{text}<div class="where">{where.lstrip(" ·")}</div></div></li>')


def _section(section: dict, number: int) -> str:
    hits = section["hits"]
    k = len(hits)
    ref = None
    for geometry in [section["query_geometry"], *[h["geometry"] for h in hits]]:
        if geometry and ref is None:
            ref = float(np.asarray(_rings(geometry, 0.0)[0])[0, 0])
    items = [{"key": f"s{number}-q", "rank": 0, "short": "Q", "colour": QUERY_COLOUR, "rings": _rings(section["query_geometry"], ref or 0.0),
              "tooltip": f"query: {section['query']}\n{section['modality'].upper()}"}]
    for h in hits:
        labels = "; ".join(h["labels"]) or "(no labels)"
        items.append({"key": f"s{number}-r{h['rank']}", "rank": h["rank"], "short": str(h["rank"]), "colour": rank_colour(h["rank"], k),
                      "rings": _rings(h["geometry"], ref or 0.0), "tooltip": f"#{h['rank']}  score {h['score']:.4f}\n{h['patch_id']}\n{labels}"})
    for it in items:
        it["box"] = _box(it["rings"]) if it["rings"] else None
        it["area"] = (it["box"][2] - it["box"][0]) * (it["box"][3] - it["box"][1]) if it["box"] else 0.0
    maps = _maps(items, number)
    esc = html.escape
    cards = [_card(items[0], section["query_png"], [f"<b>query</b> · {section['modality'].upper()} {'tile' if section['kind'] == 'tile' else 'archive patch'}",
                                                    f'<span class="id">{esc(section["query"])}</span>'])]
    for it, h in zip(items[1:], hits):
        cards.append(_card(it, h["png"], [f"<b>#{h['rank']}</b> · score <b>{h['score']:.4f}</b> · {esc(h['split'] or '-')}",
                                          esc("; ".join(h["labels"]) or "(no labels)"), f'<span class="id">{esc(h["patch_id"])}</span>']))
    return (f'<section class="query-section" id="query-{number}"><h2>{number}. {esc(section["title"])} → {section["target"].upper()}, top {k}</h2>'
            f'<div class="layout"><div class="maps">{maps}</div><ol class="cards">{"".join(cards)}</ol></div></section>')


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1a1a1a;background:#fff}
header,main,footer{padding:0 20px}h1{font-size:20px;margin:16px 0 4px}h2{font-size:16px;margin:18px 0 8px;word-break:break-all}
.sub{color:#555;margin:0 0 10px}
.random-banner{background:#c0121b;color:#fff;padding:10px 20px;font-size:15px}.random-banner strong{font-size:17px;letter-spacing:.02em}
.query-section{border-top:1px solid #ddd;padding-bottom:10px}
.layout{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}.maps{width:562px}
figure{margin:0}figcaption{font-size:12px;color:#555;margin:4px 0 8px}
.insets{display:flex;flex-wrap:wrap;gap:16px}
svg.map{display:block;border:1px solid #9aa4ad;background:#eef2f5}
.sea{fill:#eef2f5}.graticule line{stroke:#b8c2cc;stroke-width:.8}.deg{font-size:10px;fill:#56616b}
.fp{fill:var(--c);fill-opacity:.45;stroke:var(--c);stroke-width:1.6}
.fp.q{fill-opacity:.12;stroke-width:2.6;stroke-dasharray:6 3}
.fp.hl,.fp:hover{fill-opacity:.85;stroke:#000;stroke-width:2.6}
.num{font:bold 12px system-ui,sans-serif;fill:#000;pointer-events:none}.num.halo{stroke:#fff;stroke-width:3px;stroke-linejoin:round}
.place rect{fill:#fff;stroke:#222;stroke-width:1.4}.place text{font:bold 11px system-ui,sans-serif;text-anchor:middle}
.scale path{fill:none;stroke:#222;stroke-width:1.5}.scale text{font-size:10px;fill:#222}
.cards{list-style:none;margin:0;padding:0;display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:10px;flex:1;min-width:300px}
.card{display:flex;gap:8px;align-items:flex-start;border:1px solid #ddd;border-radius:6px;padding:6px;position:relative}
.card.q{border:2px solid #e63c1e}.card.hl{background:#fff6d6;border-color:#000}
.thumb{image-rendering:pixelated;flex:none;border:1px solid #999}
.swatch{position:absolute;left:2px;top:2px;min-width:20px;height:20px;border-radius:10px;color:#fff;font:bold 12px/20px system-ui;text-align:center}
.meta{font-size:12px;min-width:0}.id{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all;color:#333}.where{color:#666}
.nomap{color:#555;font-style:italic}
"""

SCRIPT = """
document.querySelectorAll("[data-key]").forEach(function (el) {
  var key = el.getAttribute("data-key");
  function light(on) {
    document.querySelectorAll('[data-key="' + key + '"]').forEach(function (x) { x.classList.toggle("hl", on); });
  }
  el.addEventListener("mouseenter", function () { light(true); });
  el.addEventListener("mouseleave", function () { light(false); });
});
"""


def render_map_page(page: dict) -> str:
    """The HTML5 text of a page: `page` holds title, random_init, model, checkpoint and sections,
    each with title, query, kind, modality, target, query_geometry (GeoJSON or None), query_png
    and hits (rank, score, patch_id, pair_id, labels, split, geometry, png)."""
    esc = html.escape
    sections = "".join(_section(s, n) for n, s in enumerate(page["sections"], start=1))
    banner = (f'<div class="random-banner" role="alert"><strong>{RANDOM_BANNER}</strong> — the archive\'s model has no trained '
              "checkpoint: its embeddings, neighbours and scores mean nothing. Index with real CSMoE/CSMAE weights (--checkpoint).</div>"
              if page.get("random_init") else "")
    model = f"model {page.get('model') or '?'}" + (f", checkpoint {page['checkpoint']}" if page.get("checkpoint") else ", random weights" if page.get("random_init") else "")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n<link rel="icon" href="data:,">\n'
            f"<title>{esc(page['title'])}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{esc(page['title'])}</h1><p class=\"sub\">{esc(model)}; scores are cosine similarities. "
            "Hover a footprint or a card to find its pair.</p></header>\n"
            f"{banner}\n<main>{sections}</main>\n"
            "<footer><p class=\"sub\">Written by rsretrieve. Footprints: WGS84; result patches are 1,200 m squares in their UTM zone.</p></footer>\n"
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def write_map_page(page: dict, path: str | Path) -> Path:
    """Write `render_map_page(page)` to `path`, through a temporary file beside it (no half page)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(render_map_page(page), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["RANDOM_BANNER", "png_bytes", "rank_colour", "render_map_page", "write_map_page"]
