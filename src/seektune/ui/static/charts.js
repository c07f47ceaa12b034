// Line charts of a run's curves, drawn as SVG, and the loop that keeps them current while the run trains.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const LABELS = { loss: "loss", eval_loss: "validation loss", learning_rate: "learning rate",
  tokens_per_s: "tokens/s", grad_norm: "gradient norm" };

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function ticks(lo, hi, count) {
  if (hi === lo) return [lo];
  const out = [];
  for (let i = 0; i <= count; i++) out.push(lo + ((hi - lo) * i) / count);
  return out;
}

// Draw `series` ({name: [[step, value], ...]}) into the figure `figure`.
function drawChart(figure, series) {
  const names = figure.dataset.series.split(",");
  const present = names.filter((n) => (series[n] || []).length > 0);
  figure.replaceChildren(el("figcaption", { text: figure.dataset.title }));
  if (present.length === 0) {
    figure.append(el("div", { class: "none", text: "no points yet" }));
    return;
  }
  const W = 420, H = 190, L = 54, R = 10, T = 8, B = 22;
  const points = present.flatMap((n) => series[n]);
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": figure.dataset.title });
  for (const y of ticks(y0, y1, 4)) {
    chart.append(svg("line", { x1: L, x2: W - R, y1: Y(y), y2: Y(y), class: "grid" }));
    const label = svg("text", { x: L - 4, y: Y(y) + 3, "text-anchor": "end" });
    label.textContent = fmt(y);
    chart.append(label);
  }
  for (const x of ticks(x0, x1, 4)) {
    const label = svg("text", { x: X(x), y: H - 6, "text-anchor": "middle" });
    label.textContent = fmt(Math.round(x));
    chart.append(label);
  }
  chart.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  chart.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  present.forEach((name, i) => {
    const cls = `line s${names.indexOf(name)}`;
    const coords = series[name].map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    const line = svg("polyline", { points: coords, class: cls, "data-series": name,
      "data-points": series[name].length, "vector-effect": "non-scaling-stroke" });
    chart.append(line);
    if (series[name].length === 1) {
      chart.append(svg("circle", { cx: X(series[name][0][0]), cy: Y(series[name][0][1]), r: 3, class: cls }));
    }
  });
  figure.append(chart);
  const legend = el("div", { class: "legend" });
  present.forEach((name) => {
    const last = series[name][series[name].length - 1];
    const swatch = el("i", { class: `sw s${names.indexOf(name)}` });
    swatch.style.background = names.indexOf(name) === 0 ? "var(--accent)" : "#e2711d";
    legend.append(el("span", {}, swatch, `${LABELS[name] || name}: ${fmt(last[1])} at step ${last[0]}`));
  });
  figure.append(legend);
}

// Fetch the curves every second while the run is running; once more after it ends.
function watchRun(runId) {
  const figures = Array.from(document.querySelectorAll("figure.chart"));
  const stateBadge = document.getElementById("state");
  const stage = document.getElementById("stage");
  const error = document.getElementById("run-error");
  let wasRunning = stateBadge.textContent === "running";
  const tick = async () => {
    let data;
    try {
      data = await getJSON(`/api/runs/${encodeURIComponent(runId)}/curves`);
    } catch (e) {
      document.getElementById("curves-note").textContent = e.message;
      document.getElementById("curves-note").className = "message error";
      return false;
    }
    for (const figure of figures) drawChart(figure, data.curves);
    stateBadge.textContent = data.state;
    stateBadge.className = `state ${data.state}`;
    stage.textContent = data.state === "running" ? data.stage || "" : "";
    if (data.error) { error.textContent = data.error; error.hidden = false; }
    const running = data.state === "running";
    if (wasRunning && !running) { location.reload(); return false; }  // for the reports the run wrote last
    if (!running) document.getElementById("run-state").dataset.watch = "done";
    wasRunning = running;
    return running;
  };
  const loop = async () => { if (await tick()) setTimeout(loop, 1000); };
  loop();
}
