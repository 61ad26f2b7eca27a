"""A static gallery page for a sweep: thumbnails, filters by axis values, full metadata per image.

The page shows every row of a small sweep; of a large one, `gallery.max_images` rows sampled by
a hash of their ids (spread evenly over prompts, axis values and shards), whose thumbnails the
contact sheet pass wrote. It lists the first `gallery.max_sheets` contact sheets and says how
many more there are. Text is escaped with `html.escape` and embedded JSON cannot close its
<script>; one fixed template is small enough not to need a template engine.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from typing import TYPE_CHECKING, Any

from sdray.sweep.contact_sheets import SheetPlan
from sdray.sweep.paths import (
    GALLERY_PAGE,
    SHEETS_INDEX,
    display_value,
    format_value,
    strip_path,
    thumbnail_path,
    write_web_file,
)

if TYPE_CHECKING:
    from sdray.sweep.contact_sheets import SweepViews


def _sort_key(plan: SheetPlan, names: list[str]):
    """Rows by prompt, then by each axis in its spec order, then by id."""

    def key(row: dict[str, Any]) -> tuple:
        parts: list[Any] = [row.get("prompt_index") or 0]
        for name in names:
            at = plan.position(name, row.get(name))
            parts.append((at is None, at or 0, format_value(row.get(name))))
        parts.append(str(row.get("id")))
        return tuple(parts)

    return key


def _json_for_script(data: Any) -> str:
    """JSON that cannot close the <script> element it sits in."""
    text = json.dumps(data, ensure_ascii=False, default=str, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _href(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


def render_gallery(
    record: dict[str, Any],
    rows: list[dict[str, Any]],
    total: int,
    sheets: list[dict[str, Any]],
    image_links: bool = True,
    sheets_total: int | None = None,
) -> str:
    """The gallery page as one self-contained HTML string (metadata embedded as JSON).

    `rows` are the rows shown (of `total`), `sheets` the contact sheets listed (of
    `sheets_total`, default all of them)."""
    plan = SheetPlan.from_record(record)
    axis_names = [a["name"] for a in record["axes"]]
    rows = sorted(rows, key=_sort_key(plan, axis_names))
    sheets_total = len(sheets) if sheets_total is None else sheets_total
    esc = html.escape

    filters = []
    prompts = dict.fromkeys((r.get("prompt_index"), r.get("prompt")) for r in rows)
    if len(prompts) > 1:
        options = "".join(
            f'<option value="{esc(str(i))}">{esc(_short(p or "", 60))}</option>' for i, p in prompts
        )
        filters.append(_select("prompt_index", "prompt", options))
    for name in axis_names:
        values = plan.order(name, [r.get(name) for r in rows if r.get(name) is not None])
        if len(values) > 1:
            options = "".join(
                f'<option value="{esc(display_value(v))}">{esc(_short(display_value(v), 40))}'
                "</option>"
                for v in values
            )
            filters.append(_select(name, name, options))
    if any(r.get("status") != "ok" for r in rows):
        options = '<option value="ok">ok</option><option value="error">error</option>'
        filters.append(_select("status", "status", options))

    shown_axes = [n for n in axis_names if len({r.get(n) for r in rows}) > 1]
    cells = []
    for index, row in enumerate(rows):
        data = [f'data-prompt_index="{esc(str(row.get("prompt_index")))}"']
        data += [f'data-{n}="{esc(display_value(row.get(n)))}"' for n in axis_names]
        data.append(f'data-status="{esc(str(row.get("status")))}"')
        if row.get("status") == "ok" and row.get("preview_path"):
            data.append(f'data-strip="{esc(_href(strip_path(row["id"])))}"')
        caption = " · ".join(f"{n} {display_value(row.get(n))}" for n in shown_axes)
        if len(prompts) > 1:
            caption = f"{_short(row.get('prompt') or '', 40)} · {caption}"
        anchor = urllib.parse.quote(str(row["id"]), safe="")
        link = f'href="#id={anchor}" title="{esc(row.get("prompt") or "")}"'
        if row.get("status") == "ok":
            thumb = _href(thumbnail_path(row["id"]))
            body = f'<img class="thumb" src="{thumb}" alt="{esc(row["id"])}" loading="lazy">'
        else:
            body = f'<div class="failed">error<br>{esc(_short(row.get("error") or "", 120))}</div>'
        cells.append(
            f'<figure class="cell" data-row="{index}" {" ".join(data)}>'
            f"<a {link}>{body}</a><figcaption>{esc(caption)}</figcaption></figure>"
        )

    sheet_items = "".join(
        f'<li><a href="{_href(s["file"])}">{esc(_short(s.get("prompt") or "", 70))}'
        f"{esc(_fixed_text(s.get('fixed') or {}))}</a></li>"
        for s in sheets
    )
    if sheets_total > len(sheets):
        sheet_items += (
            f'<li class="more">{sheets_total - len(sheets)} more contact sheets not listed here '
            f'(gallery.max_sheets); all are in <a href="{_href(SHEETS_INDEX)}">{SHEETS_INDEX}</a>'
            "</li>"
        )
    ok = sum(r.get("status") == "ok" for r in rows)
    note = (
        f"showing {len(rows)} of {total} rows, sampled across prompts and axis values "
        "(gallery.max_images); all rows are in metadata/"
        if total > len(rows)
        else f"{total} rows"
    )
    if plan.strip:
        sheet_axes = "strips in zip order"
    else:
        sheet_axes = f"rows: {plan.rows or '-'}, cols: {plan.cols or '-'}"
    return PAGE.format(
        title=esc(record["name"]),
        summary=esc(f"{note} · {ok} images shown · mode {record['mode']}"),
        filters="".join(filters),
        cells="".join(cells),
        sheets_count=sheets_total,
        sheet_axes=esc(sheet_axes),
        sheet_items=sheet_items,
        rows_json=_json_for_script(rows),
        options_json=_json_for_script({"imageLinks": image_links}),
        script=SCRIPT,
        style=STYLE,
    )


def _select(name: str, label: str, options: str) -> str:
    return (
        f'<label>{html.escape(label)} <select data-filter="{html.escape(name)}">'
        f'<option value="">all</option>{options}</select></label>'
    )


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fixed_text(fixed: dict[str, Any]) -> str:
    return "".join(f" · {k}={_short(display_value(v), 30)}" for k, v in fixed.items())


def write_gallery(
    output_uri: str,
    record: dict[str, Any],
    views: SweepViews,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write OUTPUT/index.html for a finished sweep from the sheets pass; returns its URI."""
    from sdray.storage import filesystem, join

    fs, root = filesystem(output_uri, storage_options)
    rows = views.gallery_rows
    links = all("#" not in (r.get("image_path") or "") for r in rows)
    page = render_gallery(
        record,
        rows,
        views.rows,
        views.listed_sheets,
        image_links=links,
        sheets_total=views.sheet_count,
    )
    write_web_file(fs, join(root, GALLERY_PAGE), page.encode("utf-8"))
    return join(output_uri, GALLERY_PAGE)


STYLE = """
:root { color-scheme: light; font-family: system-ui, sans-serif; }
body { margin: 0; background: #f4f4f5; color: #18181b; }
header { padding: 12px 16px 4px; }
h1 { margin: 0; font-size: 20px; }
.summary { margin: 4px 0; color: #52525b; font-size: 13px; }
#filters { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; gap: 10px;
  align-items: center; padding: 8px 16px; background: #fff; border-bottom: 1px solid #e4e4e7;
  font-size: 13px; }
#filters select { margin-left: 4px; }
#count { margin-left: auto; color: #52525b; }
details { padding: 4px 16px; font-size: 13px; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px;
  padding: 12px 16px; }
.cell { margin: 0; background: #fff; border: 1px solid #e4e4e7; border-radius: 6px;
  overflow: hidden; }
.cell[hidden] { display: none; }
.cell a { display: block; color: inherit; text-decoration: none; }
.thumb { display: block; width: 100%; aspect-ratio: 1; object-fit: contain; background: #27272a;
  image-rendering: pixelated; }
.failed { aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
  text-align: center; padding: 6px; color: #b91c1c; background: #fee2e2; font-size: 12px;
  overflow: hidden; }
figcaption { padding: 4px 6px; font-size: 11px; color: #3f3f46; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
#detail { position: fixed; inset: 0; z-index: 3; background: rgba(0,0,0,.6); display: flex;
  align-items: flex-start; justify-content: center; overflow: auto; padding: 24px; }
#detail[hidden] { display: none; }
#detail .panel { background: #fff; border-radius: 8px; padding: 12px 16px; max-width: 900px;
  width: 100%; }
#detail img.strip { max-height: 30vh; }
#detail img { max-width: 100%; max-height: 60vh; image-rendering: pixelated; display: block;
  margin: 0 auto; min-width: 256px; }
#detail table { border-collapse: collapse; font-size: 12px; width: 100%; margin-top: 8px; }
#detail td { border-top: 1px solid #e4e4e7; padding: 3px 6px; vertical-align: top;
  word-break: break-all; }
#detail td:first-child { font-weight: 600; white-space: nowrap; word-break: normal; }
#detail pre { font-size: 11px; background: #f4f4f5; padding: 8px; overflow: auto; }
"""

SCRIPT = r"""
(function () {
  const rows = JSON.parse(document.getElementById('sdray-rows').textContent);
  const options = JSON.parse(document.getElementById('sdray-options').textContent);
  const selects = Array.from(document.querySelectorAll('select[data-filter]'));
  const cells = Array.from(document.querySelectorAll('#grid .cell'));
  const count = document.getElementById('count');
  const byId = new Map(rows.map((row, index) => [row.id, index]));
  const params = new URLSearchParams(location.search);
  for (const select of selects) {
    const wanted = params.get(select.dataset.filter);
    if (wanted !== null && Array.from(select.options).some(o => o.value === wanted)) {
      select.value = wanted;
    }
  }
  function apply() {
    const active = selects.filter(s => s.value !== '').map(s => [s.dataset.filter, s.value]);
    let shown = 0;
    for (const cell of cells) {
      const match = active.every(([k, v]) => cell.getAttribute('data-' + k) === v);
      cell.hidden = !match;
      if (match) shown += 1;
    }
    count.textContent = shown + ' of ' + cells.length + ' shown';
    const query = new URLSearchParams(active);
    try {
      history.replaceState(null, '', (active.length ? '?' + query : location.pathname)
        + location.hash);
    } catch (e) { /* some browsers refuse on file:// pages; the filters still work */ }
  }
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function showDetail() {
    const detail = document.getElementById('detail');
    const match = /^#id=(.+)$/.exec(location.hash);
    const index = match ? byId.get(decodeURIComponent(match[1])) : undefined;
    const row = index === undefined ? undefined : rows[index];
    if (!row) { detail.hidden = true; return; }
    const panel = detail.querySelector('.panel');
    panel.replaceChildren();
    panel.append(el('a', {href: '#', class: 'close'}, 'close ✕'));
    panel.append(el('h2', {}, row.id));
    if (row.status === 'ok') {
      const img = el('img', {src: cells[index].querySelector('img').getAttribute('src'),
        alt: row.id});
      if (options.imageLinks && row.image_path) {
        const full = encodeURI(row.image_path);
        img.setAttribute('src', full);
        const link = el('a', {href: full}); link.append(img); panel.append(link);
        panel.append(el('p', {}, 'full image: ' + row.image_path));
      } else {
        panel.append(img);
        panel.append(el('p', {}, 'stored at: ' + row.image_path));
      }
      const strip = cells[index].dataset.strip;
      if (strip) {
        panel.append(el('p', {}, 'how it emerged (the model\'s estimate of the final image, '
          + 'step by step):'));
        panel.append(el('img', {src: strip, class: 'strip', alt: 'filmstrip of ' + row.id}));
      }
    }
    const table = el('table');
    for (const [k, v] of Object.entries(row)) {
      const tr = el('tr');
      tr.append(el('td', {}, k), el('td', {}, v === null ? 'null' : String(v)));
      table.append(tr);
    }
    panel.append(table, el('pre', {}, JSON.stringify(row, null, 2)));
    detail.hidden = false;
  }
  for (const select of selects) select.addEventListener('change', apply);
  document.getElementById('detail').addEventListener('click', (event) => {
    if (event.target.id === 'detail') location.hash = '';
  });
  window.addEventListener('hashchange', showDetail);
  apply();
  showDetail();
})();
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · sdray sweep</title>
<style>{style}</style>
</head>
<body>
<header><h1>{title}</h1><p class="summary">{summary}</p></header>
<nav id="filters">{filters}<span id="count"></span></nav>
<details id="sheets"><summary>{sheets_count} contact sheets ({sheet_axes})</summary>
<ul>{sheet_items}</ul></details>
<main id="grid">{cells}</main>
<div id="detail" hidden><div class="panel"></div></div>
<script type="application/json" id="sdray-rows">{rows_json}</script>
<script type="application/json" id="sdray-options">{options_json}</script>
<script>{script}</script>
</body>
</html>
"""
