// hfl-mqtt dashboard: loads /api/state, then follows /api/events (server-sent snapshots).
// No library: the tree and the charts are drawn as SVG here. Every node of the tree is an SVG
// group with data-node="<id>"; the latest accuracy is in #accuracy-value (data-value: exact).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const ui = {
  selected: null, state: null, treeKey: "", chartKey: "", filter: "", shapes: new Map(), clusters: new Map(),
};

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

// --- the tree ----------------------------------------------------------------------------------

function layout(nodes) {
  // A tidy tree: leaves on consecutive slots, a parent centred over its children, one row per
  // depth. Nodes whose parent is unknown start their own trees, side by side. A large tree
  // (dense) packs each parent's leaves in a square grid under it (1,000 workers in a row
  // would be specks).
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const children = new Map(nodes.map((n) => [n.id, []]));
  const roots = [];
  for (const n of nodes) {
    if (n.parent && byId.has(n.parent) && n.parent !== n.id) children.get(n.parent).push(n.id);
    else roots.push(n.id);
  }
  const pos = new Map();
  const dense = nodes.filter((n) => !children.get(n.id).length).length > 48;
  let slot = 0, depthMax = 0, subMax = 0;
  const seen = new Set();
  function place(id, depth) {
    seen.add(id);
    depthMax = Math.max(depthMax, depth);
    const kids = children.get(id).filter((k) => !seen.has(k));
    if (!kids.length) { pos.set(id, { x: slot, depth, sub: 0 }); slot += 1; return; }
    if (dense && kids.length > 4 && kids.every((k) => !children.get(k).length)) {
      const cols = Math.ceil(Math.sqrt(kids.length));
      kids.forEach((k, i) => {
        seen.add(k);
        pos.set(k, { x: slot + (i % cols), depth: depth + 1, sub: Math.floor(i / cols), packed: true });
      });
      subMax = Math.max(subMax, Math.ceil(kids.length / cols) - 1);
      depthMax = Math.max(depthMax, depth + 1);
      pos.set(id, { x: slot + (cols - 1) / 2, depth, sub: 0 });
      slot += cols + 1;
      return;
    }
    const xs = kids.map((k) => { place(k, depth + 1); return pos.get(k).x; });
    pos.set(id, { x: (Math.min(...xs) + Math.max(...xs)) / 2, depth, sub: 0 });
  }
  roots.sort((a, b) => (byId.get(a).level ?? 99) - (byId.get(b).level ?? 99) || a.localeCompare(b));
  for (const r of roots) place(r, 0);
  for (const n of nodes) if (!pos.has(n.id)) place(n.id, 0); // a cycle of parents: still shown
  return { pos, slots: Math.max(slot, 1), depths: depthMax + 1, dense, subMax };
}

function radius(node, dense) {
  if (node.role === "root" || node.level === 0) return dense ? 14 : 18;
  if (node.role === "aggregator") return dense ? 10 : 13;
  return dense ? 4 : 8;
}

function drawTree(state) {
  const svg = $("tree");
  const nodes = state.nodes;
  const key = nodes.map((n) => `${n.id}<${n.parent}:${n.role}`).join("|");
  if (key !== ui.treeKey) {
    buildTree(svg, nodes);
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

function buildTree(svg, nodes) {
  svg.replaceChildren();
  ui.shapes = new Map();
  ui.clusters = new Map();
  const { pos, slots, depths, dense, subMax } = layout(nodes);
  const gap = dense ? 14 : 64, rowGap = dense ? 90 : 120, pad = 40;
  const width = Math.max(720, slots * gap + 2 * pad);
  const height = Math.max(260, (depths - 1) * rowGap + subMax * gap + 2 * pad + 20);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  const offset = (width - (slots - 1) * gap) / 2;
  const xy = (id) => { const p = pos.get(id); return [offset + p.x * gap, pad + p.depth * rowGap + p.sub * gap]; };
  const edges = el("g", {}, svg), groups = el("g", {}, svg);
  for (const n of nodes) {
    if (!n.parent || !pos.has(n.parent) || pos.get(n.id).depth === 0) continue;
    const [x1, y1] = xy(n.parent);
    if (pos.get(n.id).packed) {
      if (!ui.clusters.has(n.parent)) {  // one edge into the grid of the parent's leaves
        const y2 = y1 + rowGap - gap;
        const d = `M${x1},${y1} L${x1},${y2}`;
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
  for (const n of nodes) {
    const [x, y] = xy(n.id);
    const packed = Boolean(pos.get(n.id).packed);
    const r = packed ? 5.5 : radius(n, dense);
    const g = el("g", { class: "node", "data-node": n.id, id: `node-${n.id}`, transform: `translate(${x},${y})` }, groups);
    el("title", {}, g);
    el("circle", { class: "ring", r: r + 4 }, g);
    el("circle", { class: "body", r }, g);
    const showLabel = !dense || n.role !== "worker";
    if (showLabel) el("text", { y: r + 14 }, g).textContent = n.id;
    if (n.role !== "worker" && n.level !== null) el("text", { class: "badge", x: r + 6, y: 4, "text-anchor": "start" }, g);
    g.addEventListener("click", () => select(n.id));
    ui.shapes.set(n.id, { ...(ui.shapes.get(n.id) || {}), group: g, packed });
  }
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
  const kids = state.nodes.filter((n) => n.parent === node.id).map((n) => n.id);
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
    ["last record", node.age_s === null ? "–" : `${seconds(node.age_s)} ago`],
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
  state.nodes.forEach((n, index) => {
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
      n.accepted, rejected, bytes(n.rate_out), bytes(n.rate_in), bytes(n.bytes_out), n.age_s === null ? "–" : seconds(n.age_s)];
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
  $("rate-hint").textContent = `${bytes(t.rate_out)}/s now`;
  $("acc-count").textContent = acc.length ? `${acc.length} evaluations` : "";
  $("updated").textContent = `state at ${clock(state.t)}`;
}

function render(state) {
  ui.state = state;
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
    { color: "#a78bfa", xLabel: "bytes sent by all nodes", xFormat: bytes, empty: "no evaluation with byte counts yet" });
}

function connection(stateName, label) {
  $("connection").dataset.state = stateName;
  $("connection-text").textContent = label;
}

async function start() {
  $("filter").addEventListener("input", (e) => { ui.filter = e.target.value; if (ui.state) drawNodeList(ui.state); });
  window.addEventListener("resize", () => { if (ui.state) render(ui.state); });
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (response.ok) render(await response.json());
    window.firstRender = performance.now();
  } catch (err) {
    connection("lost", "server unreachable");
  }
  const events = new EventSource("/api/events");
  events.addEventListener("snapshot", (e) => { connection("live", "live"); render(JSON.parse(e.data)); });
  events.addEventListener("open", () => connection("live", "live"));
  events.addEventListener("error", () => connection(events.readyState === EventSource.CLOSED ? "ended" : "lost",
    events.readyState === EventSource.CLOSED ? "stream ended" : "reconnecting…"));
}

start();
