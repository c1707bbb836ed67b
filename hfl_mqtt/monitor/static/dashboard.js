// hfl-mqtt dashboard: loads /api/state, then follows /api/events (server-sent snapshots).
// No library: the tree and the charts are drawn as SVG here. Every node of the tree is an SVG
// group with data-node="<id>"; the latest accuracy is in #accuracy-value (data-value: exact).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const ui = {
  selected: null, state: null, treeKey: "", chartKey: "", filter: "", shapes: new Map(), clusters: new Map(),
  hover: null, treeSize: [0, 0], mode: "live",
};

// Ids in natural order: worker-8 before worker-10.
const collator = new Intl.Collator("en", { numeric: true });
function natural(a, b) { return collator.compare(a, b) || (a < b ? -1 : a > b ? 1 : 0); }
function byLevelThenId(a, b) {
  return (a.level ?? Infinity) - (b.level ?? Infinity) || natural(a.id, b.id);
}

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

function text(value) { return value === null || value === undefined ? "–" : String(value); }

function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let v = value, i = 0;
  while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 60) return `${value.toFixed(value < 10 ? 1 : 0)} s`;
  if (value < 3600) return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
  return `${Math.floor(value / 3600)} h ${Math.round((value % 3600) / 60)} min`;
}

function clock(wall) { return new Date(wall * 1000).toLocaleTimeString([], { hour12: false }); }

function age(value, state) {
  // In a replay, an age is the run's (to the replayed moment), not one from now.
  if (value === null || value === undefined) return "–";
  if (state.mode !== "replay") return `${seconds(value)} ago`;
  return `${seconds(value)} before the replayed moment (${clock(state.t - value)})`;
}

// --- the tree ----------------------------------------------------------------------------------
//
// The layout is computed in the SVG's own pixels (its viewBox is its size on the page), so the
// tree fills its card and text keeps its CSS size whatever the number of nodes. Leaves sit on
// slots, a parent centred over its children, one row per depth; when the leaves would be closer
// than MIN_GAP px, each parent's leaves are packed in a grid under it, as many columns as give
// the largest cells. A row's labels are shown in full if they fit, else shortened (the ids'
// common prefix cut off: worker-12 as 12), else hidden; hovering a node shows its full id.

const MIN_GAP = 18;       // px between neighbouring leaves before they are packed in grids
const GROUP_GAP = 0.6;    // extra slot between the leaves of two parents
const MIN_ROW = 64, MAX_ROW = 170, MAX_SLOT = 150;  // px
const PAD = { l: 20, r: 20, t: 30, b: 30 };

function treeShape(nodes) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const children = new Map(nodes.map((n) => [n.id, []]));
  const roots = [];
  for (const n of nodes) {
    if (n.parent && byId.has(n.parent) && n.parent !== n.id) children.get(n.parent).push(n.id);
    else roots.push(n.id);
  }
  for (const kids of children.values()) kids.sort(natural);
  roots.sort((a, b) => (byId.get(a).level ?? 99) - (byId.get(b).level ?? 99) || natural(a, b));
  return { children, roots };
}

function place(shape, nodes, cols) {
  // Slots for every node; ``cols`` (or null: one row) is the width of a grid of leaves: a parent
  // of more than 4 children, all leaves, puts them in one. Nodes whose parent is unknown start
  // their own trees, side by side; a cycle of parents is still shown.
  const { children, roots } = shape;
  const pos = new Map(), seen = new Set();
  let slot = 0, last, depthMax = 0, subMax = 0;
  const advance = (parent) => { if (last !== undefined && last !== parent) slot += GROUP_GAP; last = parent; };
  function visit(id, depth, parent) {
    seen.add(id);
    depthMax = Math.max(depthMax, depth);
    const kids = children.get(id).filter((k) => !seen.has(k));
    if (!kids.length) { advance(parent); pos.set(id, { x: slot, depth, sub: 0 }); slot += 1; return; }
    if (cols && kids.length > 4 && kids.every((k) => !children.get(k).length)) {
      const c = Math.min(cols, kids.length);
      advance(id);
      kids.forEach((k, i) => {
        seen.add(k);
        pos.set(k, { x: slot + (i % c), depth: depth + 1, sub: Math.floor(i / c), packed: true });
      });
      subMax = Math.max(subMax, Math.ceil(kids.length / c) - 1);
      depthMax = Math.max(depthMax, depth + 1);
      pos.set(id, { x: slot + (c - 1) / 2, depth, sub: 0 });
      slot += c;
      return;
    }
    let lo = Infinity, hi = -Infinity;
    for (const k of kids) { visit(k, depth + 1, id); const x = pos.get(k).x; lo = Math.min(lo, x); hi = Math.max(hi, x); }
    pos.set(id, { x: (lo + hi) / 2, depth, sub: 0 });
  }
  for (const r of roots) visit(r, 0, null);
  for (const n of nodes) if (!pos.has(n.id)) visit(n.id, 0, null);
  return { pos, span: Math.max(slot - 1, 0), depths: depthMax + 1, subMax };
}

function layout(nodes, W, H) {
  const shape = treeShape(nodes);
  const aw = Math.max(W - PAD.l - PAD.r, 40), ah = Math.max(H - PAD.t - PAD.b, 40);
  let p = place(shape, nodes, null);
  let gx = aw / Math.max(p.span, 1), gy = 0;
  if (gx < MIN_GAP) {
    const widest = Math.max(...[...shape.children.values()].map((k) => k.length));
    let best = -1;
    for (let c = 1; c <= widest; c += 1) {
      const q = place(shape, nodes, c);
      const sx = aw / Math.max(q.span, 1);
      const sy = q.subMax ? (ah - (q.depths - 1) * MIN_ROW) / q.subMax : sx;
      if (Math.min(sx, sy) > best) { best = Math.min(sx, sy); p = q; gx = sx; gy = Math.min(sx, sy); }
    }
  }
  gx = Math.min(gx, MAX_SLOT);
  const rowGap = p.depths > 1 ? Math.min(MAX_ROW, (ah - p.subMax * gy) / (p.depths - 1)) : 0;
  const x0 = PAD.l + (aw - p.span * gx) / 2;
  const y0 = PAD.t + Math.max(0, (ah - (p.depths - 1) * rowGap - p.subMax * gy) / 2);
  const xy = (id) => {
    const q = p.pos.get(id);
    return [x0 + q.x * gx, y0 + q.depth * rowGap + q.sub * gy];
  };
  return { pos: p.pos, xy, gx, gy, rowGap };
}

function textWidth(value, size) { return value.length * size * 0.6; }

function commonPrefix(ids) {
  // The ids' common prefix, cut back to end on a non-digit (worker-1, worker-12: "worker-").
  let prefix = ids[0] || "";
  for (const id of ids) while (!id.startsWith(prefix)) prefix = prefix.slice(0, -1);
  while (prefix && /\d/.test(prefix[prefix.length - 1])) prefix = prefix.slice(0, -1);
  return prefix;
}

function rows(nodes, pos, xy) {
  // For each depth's row of unpacked nodes: the closest two neighbours (px) and how its labels
  // are shown ("full", "short" or "none") with the prefix a short label drops.
  const byDepth = new Map();
  for (const n of nodes) {
    const q = pos.get(n.id);
    if (q.packed) continue;
    if (!byDepth.has(q.depth)) byDepth.set(q.depth, []);
    byDepth.get(q.depth).push(n);
  }
  const out = new Map();
  for (const [depth, row] of byDepth) {
    const xs = row.map((n) => xy(n.id)[0]).sort((a, b) => a - b);
    let spacing = Infinity;
    for (let i = 1; i < xs.length; i += 1) spacing = Math.min(spacing, xs[i] - xs[i - 1]);
    const size = row.every((n) => n.role === "worker") ? 11 : 12;
    const ids = row.map((n) => n.id);
    const prefix = commonPrefix(ids);
    const widest = (list) => Math.max(...list.map((v) => textWidth(v, size)));
    let mode = "none";
    if (widest(ids) + 6 <= spacing) mode = "full";
    else if (prefix && widest(ids.map((id) => id.slice(prefix.length) || id)) + 4 <= spacing) mode = "short";
    out.set(depth, { spacing, mode, prefix, size });
  }
  return out;
}

function radius(node, room) {
  const base = node.role === "root" || node.level === 0 ? 16 : node.role === "aggregator" ? 12 : 7;
  return Math.max(2.5, Math.min(base, room * 0.36));
}

function treeHeight(nodes) {
  // Taller for many workers: their grids get cells a mouse can hit.
  const n = nodes.length;
  return n > 400 ? 720 : n > 150 ? 600 : 480;
}

function drawTree(state) {
  const svg = $("tree");
  const nodes = state.nodes;
  const height = `${treeHeight(nodes)}px`;
  if (svg.style.height !== height) svg.style.height = height;
  const box = svg.getBoundingClientRect();
  const W = Math.round(box.width) || 900, H = Math.round(box.height) || 480;
  const key = `${W}x${H}|` + nodes.map((n) => `${n.id}<${n.parent}:${n.role}`).join("|");
  if (key !== ui.treeKey) {
    buildTree(svg, nodes, W, H);
    ui.treeKey = key;
  }
  const rateOf = (n) => (n.rate_out || 0) + (n.rate_in || 0);
  const clusters = new Map();
  for (const n of nodes) {
    if (ui.clusters.has(n.parent) && ui.shapes.get(n.id)?.packed) {
      const c = clusters.get(n.parent) || { rate: 0, count: 0 };
      c.rate += rateOf(n); c.count += 1;
      clusters.set(n.parent, c);
    }
  }
  const maxRate = Math.max(1, ...nodes.map(rateOf), ...[...clusters.values()].map((c) => c.rate));
  const width = (rate) => (1.2 + 8 * Math.log1p(rate) / Math.log1p(maxRate)).toFixed(2);
  for (const [parent, c] of clusters) {
    const { edge, flow } = ui.clusters.get(parent);
    edge.setAttribute("stroke-width", width(c.rate));
    edge.querySelector("title").textContent = `${parent} – its ${c.count} workers: ${bytes(c.rate)}/s`;
    flow.classList.toggle("active", c.rate > 0);
  }
  for (const n of nodes) {
    const shape = ui.shapes.get(n.id);
    if (!shape) continue;
    const { group, edge, flow } = shape;
    group.setAttribute("data-status", n.status || "unknown");
    group.classList.toggle("selected", n.id === ui.selected);
    const badge = group.querySelector("text.badge");
    if (badge) badge.textContent = n.version === null || n.version === undefined ? "" : `v${n.version}`;
    group.querySelector("title").textContent =
      `${n.id} (${n.role || "?"}): ${n.status}, version ${text(n.version)}, ` +
      `${bytes(n.rate_out)}/s out, ${bytes(n.rate_in)}/s in`;
    if (edge) {
      const rate = rateOf(n);
      edge.setAttribute("stroke-width", width(rate));
      edge.querySelector("title").textContent = `${n.parent} – ${n.id}: ${bytes(rate)}/s`;
      flow.classList.toggle("active", rate > 0 && n.status !== "offline");
    }
  }
}

function buildTree(svg, nodes, W, H) {
  svg.replaceChildren();
  ui.shapes = new Map();
  ui.clusters = new Map();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const { pos, xy, gx, gy, rowGap } = layout(nodes, W, H);
  const labels = rows(nodes, pos, xy);
  // Links first, nodes over them, the hover label over everything: a click on a node (its
  // circle, its label, or the transparent box around them) never lands on a link.
  const edges = el("g", { class: "edges" }, svg), groups = el("g", { class: "nodes" }, svg);
  const cell = Math.min(gx, gy || gx);
  for (const n of nodes) {
    if (!n.parent || !pos.has(n.parent) || pos.get(n.id).depth === 0) continue;
    const [x1, y1] = xy(n.parent);
    if (pos.get(n.id).packed) {
      if (!ui.clusters.has(n.parent)) {  // one link into the grid of the parent's leaves
        const d = `M${x1},${y1} L${x1},${xy(n.id)[1] - 0.6 * cell}`;
        const edge = el("path", { class: "edge", "data-cluster": n.parent, d }, edges);
        el("title", {}, edge);
        ui.clusters.set(n.parent, { edge, flow: el("path", { class: "flow", d }, edges) });
      }
      continue;
    }
    const [x2, y2] = xy(n.id);
    const mid = (y1 + y2) / 2;
    const d = `M${x1},${y1} C${x1},${mid} ${x2},${mid} ${x2},${y2}`;
    const edge = el("path", { class: "edge", "data-child": n.id, d }, edges);
    el("title", {}, edge);
    ui.shapes.set(n.id, { edge, flow: el("path", { class: "flow", "data-child": n.id, d }, edges) });
  }
  const built = [];
  for (const n of nodes) {
    const [x, y] = xy(n.id);
    const q = pos.get(n.id);
    const row = q.packed ? null : labels.get(q.depth);
    const room = q.packed ? cell : Math.min(row.spacing, rowGap || Infinity);
    const r = radius(n, room);
    const mode = row ? row.mode : "none";
    const g = el("g", {
      class: "node", "data-node": n.id, "data-label": mode, id: `node-${n.id}`,
      transform: `translate(${x.toFixed(1)},${y.toFixed(1)})`,
    }, groups);
    el("title", {}, g);
    el("circle", { class: "ring", r: r + 3.5 }, g);
    el("circle", { class: "body", r }, g);
    if (mode !== "none") {
      const label = mode === "full" ? n.id : n.id.slice(row.prefix.length) || n.id;
      el("text", { class: "label", y: r + row.size + 2, style: `font-size:${row.size}px` }, g).textContent = label;
    }
    if (n.role !== "worker" && n.level !== null && !q.packed && row.spacing > 2 * r + 40) {
      el("text", { class: "badge", x: r + 5, y: 4 }, g);
    }
    built.push([g, q.packed ? Math.max(r + 2, cell / 2 - 0.5) : r + 4]);
    ui.shapes.set(n.id, { ...(ui.shapes.get(n.id) || {}), group: g, packed: Boolean(q.packed) });
  }
  // Each node's hit box: its circle and label, measured once all are laid out (one layout pass).
  const boxes = built.map(([g, half]) => {
    const b = g.getBBox();
    const x1 = Math.min(b.x, -half), y1 = Math.min(b.y, -half);
    return [g, x1, y1, Math.max(b.x + b.width, half) - x1, Math.max(b.y + b.height, half) - y1];
  });
  for (const [g, x, y, w, h] of boxes) {
    g.insertBefore(el("rect", { class: "hit", x, y, width: w, height: h }), g.firstChild);
  }
  const hover = el("g", { class: "hover-label", visibility: "hidden" }, svg);
  el("rect", { rx: 4, height: 18 }, hover);
  el("text", { y: 13 }, hover);
  ui.hover = hover;
  ui.treeSize = [W, H];
}

function showHover(group) {
  const hover = ui.hover;
  if (!hover) return;
  if (!group || group.dataset.label === "full") { hover.setAttribute("visibility", "hidden"); return; }
  const [W] = ui.treeSize;
  const label = hover.querySelector("text"), box = hover.querySelector("rect");
  label.textContent = group.dataset.node;
  const w = textWidth(group.dataset.node, 12) + 12;
  const m = /translate\(([-\d.]+),([-\d.]+)\)/.exec(group.getAttribute("transform"));
  const x = Math.max(2, Math.min(W - w - 2, Number(m[1]) - w / 2));
  const r = Number(group.querySelector("circle.body").getAttribute("r"));
  const y = Math.max(2, Number(m[2]) - r - 24);
  box.setAttribute("width", w);
  label.setAttribute("x", w / 2);
  hover.setAttribute("transform", `translate(${x.toFixed(1)},${y.toFixed(1)})`);
  hover.setAttribute("visibility", "visible");
}

// --- charts ------------------------------------------------------------------------------------

function ticks(lo, hi, count) {
  if (hi <= lo) hi = lo + 1;
  const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
  return out;
}

function decimals(step) {
  // The fewest decimals that still tell ticks ``step`` apart (0.025: 3, 0.05: 2).
  let d = 0;
  while (d < 6 && Math.abs(Number(step.toFixed(d)) - step) > step * 1e-6) d += 1;
  return d;
}

function lineChart(svg, points, opts) {
  svg.replaceChildren();
  const box = svg.getBoundingClientRect();
  const W = Math.max(320, box.width || 560), H = Math.max(180, box.height || 240);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const m = { l: 48, r: 16, t: 12, b: 36 };
  if (!points.length) {
    el("text", { class: "empty", x: W / 2, y: H / 2 }, svg).textContent = opts.empty;
    return;
  }
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const x0 = Math.min(0, ...xs), x1 = Math.max(...xs, x0 + 1e-9);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const spread = Math.max(y1 - y0, 0.05);
  y0 = Math.max(0, y0 - spread * 0.15); y1 = Math.min(1, y1 + spread * 0.15);
  if (y1 <= y0) y1 = y0 + 0.05;
  const sx = (v) => m.l + (v - x0) / (x1 - x0) * (W - m.l - m.r);
  const sy = (v) => H - m.b - (v - y0) / (y1 - y0) * (H - m.t - m.b);
  const defs = el("defs", {}, svg);
  const grad = el("linearGradient", { id: `${svg.id}-fill`, x1: 0, y1: 0, x2: 0, y2: 1 }, defs);
  el("stop", { offset: "0%", "stop-color": opts.color, "stop-opacity": 0.35 }, grad);
  el("stop", { offset: "100%", "stop-color": opts.color, "stop-opacity": 0 }, grad);
  const yTicks = ticks(y0, y1, 5);
  const yDecimals = decimals(yTicks.length > 1 ? yTicks[1] - yTicks[0] : 0.1);
  for (const v of yTicks) {
    el("line", { class: "gridline", x1: m.l, x2: W - m.r, y1: sy(v), y2: sy(v) }, svg);
    el("text", { class: "tick", x: m.l - 6, y: sy(v) + 3, "text-anchor": "end" }, svg).textContent = v.toFixed(yDecimals);
  }
  const xTicks = ticks(x0, x1, 5);
  const xStep = xTicks.length > 1 ? xTicks[1] - xTicks[0] : 1;
  for (const v of xTicks) {
    el("text", { class: "tick", x: sx(v), y: H - m.b + 14, "text-anchor": "middle" }, svg).textContent = opts.xFormat(v, xStep);
  }
  el("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }, svg);
  el("text", { class: "axis-label", x: W - m.r, y: H - 4, "text-anchor": "end" }, svg).textContent = opts.xLabel;
  const line = points.map((p, i) => `${i ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join("");
  const area = `${line}L${sx(points[points.length - 1].x).toFixed(1)},${H - m.b}L${sx(points[0].x).toFixed(1)},${H - m.b}Z`;
  el("path", { d: area, fill: `url(#${svg.id}-fill)` }, svg);
  el("path", { class: "series", d: line, stroke: opts.color }, svg);
  const every = Math.ceil(points.length / 60);
  points.forEach((p, i) => {
    if (i % every && i !== points.length - 1) return;
    const dot = el("circle", { class: "point", cx: sx(p.x), cy: sy(p.y), r: i === points.length - 1 ? 4.5 : 3, fill: opts.color }, svg);
    el("title", {}, dot).textContent = p.label;
  });
}

function histogram(container, level, stats, names) {
  const box = document.createElement("div");
  box.className = "histogram";
  box.dataset.level = level;
  const title = document.createElement("div");
  title.className = "title";
  title.innerHTML = "<strong></strong><span class='muted'></span>";
  title.children[0].textContent = `level ${level}${names ? ` · ${names}` : ""}`;
  title.children[1].textContent = `n ${text(stats.n)} · p50 ${text(stats.p50)} · p95 ${text(stats.p95)} · max ${text(stats.max)}`;
  box.appendChild(title);
  const hist = Array.isArray(stats.hist) ? stats.hist : [];
  let last = hist.length - 1;
  while (last > 0 && !hist[last]) last -= 1;
  const bars = hist.slice(0, last + 1);
  while (bars.length < 4) bars.push(0);
  const W = 220, H = 110, b = 16, top = Math.max(1, ...bars);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" }, box);
  const w = W / bars.length;
  bars.forEach((count, i) => {
    const h = (H - b - 4) * count / top;
    const rect = el("rect", { x: i * w + 2, y: H - b - h, width: Math.max(1, w - 4), height: h, rx: 2 }, svg);
    el("title", {}, rect).textContent = `staleness ${i === 16 ? "16+" : i}: ${count}`;
    if (bars.length <= 17) el("text", { class: "tick", x: i * w + w / 2, y: H - 4 }, svg).textContent = i === 16 ? "16+" : i;
  });
  container.appendChild(box);
}

// --- panels ------------------------------------------------------------------------------------

function select(id) {
  ui.selected = id;
  if (ui.state) render(ui.state);
}

function facts(pairs) {
  const dl = document.createElement("dl");
  dl.className = "facts";
  for (const [label, value, cls] of pairs) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = label; dd.textContent = value;
    if (cls) dd.className = cls;
    dl.append(dt, dd);
  }
  return dl;
}

function drawNodePanel(state) {
  const panel = $("node-panel");
  const node = state.nodes.find((n) => n.id === ui.selected);
  if (!node) { panel.innerHTML = "<p class='muted'>No node selected.</p>"; return; }
  panel.replaceChildren();
  panel.dataset.node = node.id;
  const h = document.createElement("h3");
  const pill = document.createElement("span");
  pill.className = `pill ${node.status}`; pill.textContent = node.status;
  h.append(node.id, pill);
  panel.appendChild(h);
  const kids = state.nodes.filter((n) => n.parent === node.id).map((n) => n.id).sort(natural);
  const rejected = Object.entries(node.rejected || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  const st = node.staleness;
  panel.appendChild(facts([
    ["role", `${text(node.role)}, level ${text(node.level)}`],
    ["parent", text(node.parent)],
    ["children", kids.length ? `${kids.length}: ${kids.slice(0, 8).join(", ")}${kids.length > 8 ? ", …" : ""}` : "–"],
    ["version / round", `${text(node.version)} / ${text(node.round)}`],
    ["updates", `${node.accepted} accepted${rejected ? `; rejected: ${rejected}` : ""}`],
    ["staleness", st ? `mean ${text(st.mean)}, p95 ${text(st.p95)}, max ${text(st.max)} (n ${text(st.n)})` : "–"],
    ["sent", `${bytes(node.bytes_out)} (${bytes(node.rate_out)}/s)`],
    ["received", `${bytes(node.bytes_in)} (${bytes(node.rate_in)}/s)`],
    ["trained", text(node.trained)],
    ["reconnects", text(node.reconnects)],
    ["memory / cpu", `${bytes(node.rss)} / ${node.cpu_s === null || node.cpu_s === undefined ? "–" : seconds(node.cpu_s)}`],
    ["uptime", seconds(node.uptime_s)],
    ["last record", age(node.age_s, state)],
    ["last error", text(node.last_error), node.last_error ? "error-text" : ""],
  ]));
  const kinds = Object.entries(node.traffic || {});
  if (kinds.length) {
    const table = document.createElement("table");
    table.className = "grid";
    table.innerHTML = "<thead><tr><th>topic kind</th><th class='num'>msgs out</th><th class='num'>out</th><th class='num'>msgs in</th><th class='num'>in</th></tr></thead>";
    const body = table.createTBody();
    for (const [kind, [mo, bo, mi, bi]] of kinds) {
      const row = body.insertRow();
      for (const [value, num] of [[kind, false], [mo, true], [bytes(bo), true], [mi, true], [bytes(bi), true]]) {
        const cell = row.insertCell(); cell.textContent = value; if (num) cell.className = "num";
      }
    }
    panel.appendChild(table);
  }
}

function drawNodeList(state) {
  const body = $("node-list");
  const rows = new Map([...body.rows].map((r) => [r.dataset.nodeRow, r]));
  const filter = ui.filter.toLowerCase();
  [...state.nodes].sort(byLevelThenId).forEach((n, index) => {
    let row = rows.get(n.id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.nodeRow = n.id;
      for (let i = 0; i < 13; i += 1) row.insertCell().className = i >= 5 ? "num" : "";
      row.addEventListener("click", () => select(n.id));
    }
    rows.delete(n.id);
    if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
    const rejected = Object.values(n.rejected || {}).reduce((a, b) => a + b, 0);
    const cells = [n.id, text(n.role), text(n.level), text(n.parent), n.status, text(n.version), text(n.round),
      n.accepted, rejected, bytes(n.rate_out), bytes(n.rate_in), bytes(n.bytes_out), n.age_s === null || n.age_s === undefined ? "–" : seconds(n.age_s)];
    cells.forEach((value, i) => { if (row.cells[i].textContent !== String(value)) row.cells[i].textContent = value; });
    row.cells[4].className = `status-cell ${n.status}`;
    row.classList.toggle("selected", n.id === ui.selected);
    row.hidden = Boolean(filter) && ![n.id, n.role, n.status].some((v) => String(v).toLowerCase().includes(filter));
  });
  for (const stale of rows.values()) stale.remove();
}

function drawRejections(state) {
  const body = $("rejections");
  body.replaceChildren();
  for (const r of state.rejections || []) {
    const row = body.insertRow();
    for (const [value, cls] of [[clock(r.t), ""], [r.node, ""], [r.reason, ""], [r.count, "num"], [text(r.detail), "detail"]]) {
      const cell = row.insertCell(); cell.textContent = value; cell.className = cls;
    }
    row.addEventListener("click", () => select(r.node));
  }
  $("rejections-count").textContent = state.rejections.length ? `${state.rejections.length} latest` : "none";
}

function drawStaleness(state) {
  const box = $("staleness");
  box.replaceChildren();
  const levels = Object.entries(state.staleness || {});
  if (!levels.length) { box.innerHTML = "<p class='muted'>No update accepted yet.</p>"; return; }
  for (const [level, stats] of levels) {
    const at = state.nodes.filter((n) => String(n.level) === level).map((n) => n.id);
    const names = at.length > 3 ? `${at.length} aggregators` : at.join(", ");
    histogram(box, level, stats, names);
  }
}

function drawHeader(state) {
  $("federation").textContent = text(state.federation);
  document.title = `hfl-mqtt · ${state.federation || "federation"}`;
  const acc = state.accuracy || [];
  const last = acc[acc.length - 1];
  const value = $("accuracy-value");
  value.textContent = last ? last.accuracy.toFixed(4) : "–";
  value.dataset.value = last ? String(last.accuracy) : "";
  $("accuracy-hint").textContent = last ? `loss ${text(last.loss === null ? null : last.loss.toFixed(4))} · at ${seconds(last.t)}` : "no evaluation yet";
  const root = state.nodes.find((n) => n.role === "root") || state.nodes.find((n) => n.level === 0);
  $("version-value").textContent = root ? text(root.version) : "–";
  $("round-hint").textContent = root ? `${text(root.id)} · round ${text(root.round)}` : "";
  const t = state.totals || {};
  $("online-value").textContent = `${text(t.online)} / ${text(t.nodes)}`;
  const down = state.nodes.filter((n) => n.status === "offline").length;
  $("nodes-hint").textContent = down ? `${down} offline` : "none offline";
  $("bytes-value").textContent = bytes(t.bytes_out);
  $("rate-hint").textContent = `${bytes(t.rate_out)}/s ${ui.mode === "replay" ? "then" : "now"}`;
  $("acc-count").textContent = acc.length ? `${acc.length} evaluations` : "";
  $("updated").textContent = ui.mode === "replay"
    ? `replay of a finished run · state as at ${new Date(state.t * 1000).toLocaleString([], { hour12: false })}`
    : `state at ${clock(state.t)}`;
  const ageHead = $("age-head");
  ageHead.textContent = ui.mode === "replay" ? "age (run)" : "age";
  ageHead.title = ui.mode === "replay"
    ? "time from the node's last record to the replayed moment of the run"
    : "time since the node's last record";
}

function render(state) {
  ui.state = state;
  ui.mode = state.mode === "replay" ? "replay" : "live";
  if (ui.selected === null && state.nodes.length) ui.selected = state.nodes[0].id;
  drawHeader(state);
  drawTree(state);
  drawNodePanel(state);
  drawNodeList(state);
  drawRejections(state);
  drawStaleness(state);
  const acc = state.accuracy || [];
  const last = acc[acc.length - 1] || {};
  const chartKey = `${acc.length}:${last.t}:${last.bytes}:${window.innerWidth}`;
  if (chartKey !== ui.chartKey) {
    ui.chartKey = chartKey;
    drawCharts(acc);
  }
  document.body.dataset.nodes = String(state.nodes.length);
}

function drawCharts(acc) {
  const label = (p) => `version ${text(p.version)}: accuracy ${p.accuracy.toFixed(4)}`;
  lineChart($("chart-time"), acc.map((p) => ({ x: p.t, y: p.accuracy, label: `${label(p)} at ${seconds(p.t)}` })),
    { color: "#60a5fa", xLabel: "seconds since the root started", xFormat: (v, step) => v.toFixed(decimals(step)), empty: "no evaluation yet" });
  lineChart($("chart-bytes"), acc.filter((p) => p.bytes !== null && p.bytes !== undefined)
    .map((p) => ({ x: p.bytes, y: p.accuracy, label: `${label(p)} after ${bytes(p.bytes)}` })),
    { color: "#a78bfa", xLabel: "bytes the tree carried (models and deltas)", xFormat: bytes, empty: "no evaluation with byte counts yet" });
}

function connection(stateName, label) {
  $("connection").dataset.state = stateName;
  $("connection-text").textContent = label;
}

function connected() {
  // A replay is a finished run shown again: not "live", whatever the stream's state.
  if (ui.mode === "replay") connection("replay", "replay");
  else connection("live", "live");
}

function start() {
  $("filter").addEventListener("input", (e) => { ui.filter = e.target.value; if (ui.state) drawNodeList(ui.state); });
  window.addEventListener("resize", () => { if (ui.state) render(ui.state); });
  const tree = $("tree");
  tree.addEventListener("click", (e) => {
    const node = e.target.closest?.("g.node");
    if (node) select(node.dataset.node);
  });
  tree.addEventListener("pointerover", (e) => showHover(e.target.closest?.("g.node")));
  tree.addEventListener("pointerleave", () => showHover(null));
  new ResizeObserver(() => { if (ui.state) drawTree(ui.state); }).observe(tree);
  follow();
}

async function follow() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (response.ok) { render(await response.json()); connected(); }
    window.firstRender = performance.now();
  } catch (err) {
    connection("lost", "server unreachable");
  }
  const events = new EventSource("/api/events");
  events.addEventListener("snapshot", (e) => { render(JSON.parse(e.data)); connected(); });
  events.addEventListener("open", connected);
  events.addEventListener("error", () => connection(events.readyState === EventSource.CLOSED ? "ended" : "lost",
    events.readyState === EventSource.CLOSED ? "stream ended" : "reconnecting…"));
}

start();
