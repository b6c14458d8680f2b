// Drawing for the ttmm page: the 2-D map, sparklines, bars and small charts, in plain SVG and HTML.
// Exported as window.plot; everything else stays inside this function.
(() => {
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a",
];

/** Colour of cluster k of K: a fixed palette up to 12, golden-angle hues beyond. */
function clusterColor(k, K) {
  if (K <= PALETTE.length) return PALETTE[k];
  return `hsl(${((k * 137.508) % 360).toFixed(1)}, 62%, 46%)`;
}

/** An element (SVG when ns is given) with attributes, appended to parent. */
function make(name, attrs = {}, parent = null, ns = null) {
  const node = ns ? document.createElementNS(ns, name) : document.createElement(name);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  if (parent) parent.appendChild(node);
  return node;
}
const svg = (name, attrs, parent) => make(name, attrs, parent, SVG_NS);

/** Linear map from data coordinates to the SVG box, with a margin. */
function mapScale(xs, ys, width, height, margin = 28) {
  const lo = (v) => Math.min(...v), hi = (v) => Math.max(...v);
  const [x0, x1, y0, y1] = [lo(xs), hi(xs), lo(ys), hi(ys)];
  const span = Math.max(x1 - x0, y1 - y0, 1e-9);
  const unit = Math.min((width - 2 * margin) / span, (height - 2 * margin) / span);
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  const clamp = (v, max) => Math.max(4, Math.min(max - 4, v));
  return (x, y) => [
    clamp(width / 2 + (x - cx) * unit, width),
    clamp(height / 2 - (y - cy) * unit, height),  // y grows upwards
  ];
}

/** A five-pointed star centred on (x, y). */
function starPoints(x, y, outer = 11, inner = 4.5) {
  const points = [];
  for (let i = 0; i < 10; i++) {
    const r = i % 2 ? inner : outer, a = Math.PI / 2 + (i * Math.PI) / 5;
    points.push(`${(x + r * Math.cos(a)).toFixed(1)},${(y - r * Math.sin(a)).toFixed(1)}`);
  }
  return points.join(" ");
}

/**
 * Draw the map: chunks as dots and centroids as diamonds coloured by cluster.
 * Returns a view with setQuery(point, plan) to show where a prompt lands.
 */
function drawMap(root, map, experts, onHover) {
  const [width, height] = [640, 440];
  root.replaceChildren();
  const K = experts.length;
  const xs = map.points.map((p) => p[0]).concat(map.centroids.map((c) => c[0]));
  const ys = map.points.map((p) => p[1]).concat(map.centroids.map((c) => c[1]));
  const scale = mapScale(xs, ys, width, height);
  svg("rect", { x: 0, y: 0, width, height, class: "map-bg" }, root);
  const chunks = svg("g", { class: "chunks" }, root);
  const links = svg("g", { class: "links" }, root);
  const centroids = svg("g", { class: "centroids" }, root);
  const query = svg("g", { class: "query-layer" }, root);
  for (const [x, y, k, text] of map.points) {
    const [px, py] = scale(x, y);
    const dot = svg("circle", {
      cx: px.toFixed(1), cy: py.toFixed(1), r: 3.2, fill: clusterColor(k, K),
      class: "chunk", "data-expert": k,
    }, chunks);
    dot.addEventListener("mouseenter", () => onHover(dot, `${experts[k].label}: ${text}`));
    dot.addEventListener("mouseleave", () => onHover(null, ""));
  }
  const centres = map.centroids.map(([x, y]) => scale(x, y));
  centres.forEach(([px, py], k) => {
    const s = 8;
    const mark = svg("polygon", {
      points: `${px},${py - s} ${px + s},${py} ${px},${py + s} ${px - s},${py}`,
      fill: clusterColor(k, K), class: "centroid", "data-expert": k,
    }, centroids);
    svg("text", { x: px + 10, y: py - 8, class: "centroid-label", text: String(k) }, centroids);
    mark.addEventListener("mouseenter", () => onHover(mark, `expert ${k}: ${experts[k].label}`));
    mark.addEventListener("mouseleave", () => onHover(null, ""));
  });
  return {
    setQuery(point, plan) {
      query.replaceChildren();
      links.replaceChildren();
      if (!point) return;
      const [qx, qy] = scale(point.x, point.y);
      for (const e of plan ? plan.experts : []) {
        const [cx, cy] = centres[e.id];
        svg("line", {
          x1: qx, y1: qy, x2: cx, y2: cy, class: "link", "data-expert": e.id,
          "stroke-width": (1 + 7 * e.weight).toFixed(2), stroke: clusterColor(e.id, K),
        }, links);
      }
      svg("polygon", { points: starPoints(qx, qy), class: "query" }, query);
    },
  };
}

/** A small SVG line of a loss curve; a dash when there is none. */
function sparkline(values, width = 110, height = 26) {
  if (!values || values.length < 2) return make("span", { class: "muted", text: "–" });
  const root = svg("svg", { width, height, class: "spark", viewBox: `0 0 ${width} ${height}` });
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const pts = values.map((v, i) => [
    (2 + (i * (width - 4)) / (values.length - 1)).toFixed(1),
    (2 + ((hi - v) * (height - 4)) / span).toFixed(1),
  ]);
  svg("polyline", { points: pts.map((p) => p.join(",")).join(" "), class: "spark-line" }, root);
  const title = `loss ${values[0].toFixed(3)} → ${values[values.length - 1].toFixed(3)}`;
  svg("title", { text: title }, root);
  return root;
}

/** A horizontal bar: a track with a fill of the given share (0..1) and colour. */
function bar(share, color, cls = "") {
  const track = make("div", { class: `bar ${cls}` });
  const width = `${(100 * Math.max(0, Math.min(1, share))).toFixed(1)}%`;
  make("div", { class: "fill", style: `width:${width};background:${color}` }, track);
  return track;
}

/** Round values covering [lo, hi], about `count` of them, spaced 1, 2 or 5 × 10^k (as d3
 * picks them; whole numbers only when `integer`). */
function ticks(lo, hi, count = 4, integer = false) {
  const raw = (hi - lo || 1) / count, magnitude = 10 ** Math.floor(Math.log10(raw));
  const error = raw / magnitude;
  let step = magnitude * (error >= 7.07 ? 10 : error >= 3.16 ? 5 : error >= 1.41 ? 2 : 1);
  if (integer) step = Math.max(1, Math.round(step));
  const values = [];
  for (let k = Math.ceil(lo / step); k * step <= hi + step * 1e-9; k++) {
    values.push(+(k * step).toPrecision(12) || 0);  // no 0.30000000000000004, no −0
  }
  return values;
}

/**
 * An x–y chart in root, an <svg> whose viewBox sets its size: axes with round ticks, then
 * the layers in order, each {kind, points, cls}:
 *   "step": a line through [x, y] points that holds each y until the next x;
 *   "band": an area between [x, lower, upper] points;
 *   "dots": circles at [x, y, title] points (the title shows on hover);
 *   "hline": a rule across the chart at {y}.
 * The ranges cover every layer and opts.x / opts.y (values to include, such as [0, 100]);
 * opts.xLabel / opts.yLabel write tick labels; opts.xInteger keeps x ticks whole.
 */
function chart(root, layers, opts = {}) {
  const { width, height } = root.viewBox.baseVal;
  const m = { left: 50, right: 14, top: 10, bottom: 24 };
  root.replaceChildren();
  const xs = [...(opts.x || [])], ys = [...(opts.y || [])];
  for (const layer of layers) {
    if (layer.kind === "hline") ys.push(layer.y);
    for (const [x, ...rest] of layer.points || []) {
      xs.push(x);
      ys.push(...rest.filter(Number.isFinite));
    }
  }
  if (!xs.length) {
    svg("text", { x: width / 2, y: height / 2, class: "chart-empty", text: opts.empty || "no data yet" }, root);
    return;
  }
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) [x0, x1] = [x0 - 1, x1 + 1];
  const pad = (y1 - y0) * 0.06 || 1;
  [y0, y1] = [y0 - pad, y1 + pad];
  const X = (x) => m.left + ((x - x0) / (x1 - x0)) * (width - m.left - m.right);
  const Y = (y) => height - m.bottom - ((y - y0) / (y1 - y0)) * (height - m.top - m.bottom);
  const xLabel = opts.xLabel || String, yLabel = opts.yLabel || String;
  const axes = svg("g", { class: "chart-axes" }, root);
  for (const v of ticks(y0, y1)) {
    svg("line", { x1: m.left, x2: width - m.right, y1: Y(v), y2: Y(v), class: "chart-grid" }, axes);
    svg("text", { x: m.left - 5, y: Y(v) + 4, class: "chart-tick y", text: yLabel(v) }, axes);
  }
  for (const v of ticks(x0, x1, 5, opts.xInteger)) {
    svg("text", { x: X(v), y: height - m.bottom + 15, class: "chart-tick x", text: xLabel(v) }, axes);
  }
  svg("rect", {
    x: m.left, y: m.top, width: width - m.left - m.right, height: height - m.top - m.bottom,
    class: "chart-frame",
  }, axes);
  for (const layer of layers) {
    const cls = `chart-${layer.kind} ${layer.cls || ""}`;
    const pts = layer.points || [];
    if (layer.kind === "hline") {
      svg("line", { x1: m.left, x2: width - m.right, y1: Y(layer.y), y2: Y(layer.y), class: cls }, root);
    } else if (layer.kind === "step" && pts.length) {
      const d = pts.map(([x, y], i) => (i ? `H${X(x).toFixed(1)}V${Y(y).toFixed(1)}` : `M${X(x).toFixed(1)},${Y(y).toFixed(1)}`));
      svg("path", { d: d.join(""), class: cls }, root);
    } else if (layer.kind === "band" && pts.length) {
      const upper = pts.map(([x, , hi]) => `${X(x).toFixed(1)},${Y(hi).toFixed(1)}`);
      const lower = pts.map(([x, lo]) => `${X(x).toFixed(1)},${Y(lo).toFixed(1)}`).reverse();
      svg("polygon", { points: upper.concat(lower).join(" "), class: cls }, root);
    } else if (layer.kind === "dots") {
      for (const [x, y, title] of pts) {
        const dot = svg("circle", { cx: X(x).toFixed(1), cy: Y(y).toFixed(1), r: 3.5, class: cls }, root);
        if (title) svg("title", { text: title }, dot);
      }
    }
  }
}

window.plot = { clusterColor, make, drawMap, sparkline, bar, chart };
})();
