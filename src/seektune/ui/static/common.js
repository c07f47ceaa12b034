// Helpers shared by the dashboard's pages (no framework: a few fetches and DOM updates).
"use strict";

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = (body && body.error && body.error.message) || `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(value) {
  if (typeof value !== "number") return value == null ? "" : String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e6)) return value.toExponential(3);
  return String(Number(value.toPrecision(4)));
}

// The run list refreshes itself while some run is running.
function pollRunList() {
  const table = document.getElementById("runs");
  if (!table) return;
  const tick = async () => {
    let runs;
    try { runs = await getJSON("/api/runs"); } catch (e) { return; }
    const ids = Array.from(table.querySelectorAll("tbody tr[data-run]")).map((r) => r.dataset.run);
    const fresh = runs.map((r) => r.id);
    if (JSON.stringify(ids) !== JSON.stringify(fresh)) { location.reload(); return; }
    for (const run of runs) {
      const row = table.querySelector(`tr[data-run="${CSS.escape(run.id)}"]`);
      const state = row && row.querySelector(".state");
      if (state && state.textContent !== run.state) { location.reload(); return; }
    }
  };
  setInterval(tick, 3000);
}

// A job page follows its job: state, exit code, run link and the output's tail.
function watchJob(jobId, runListed) {
  const log = document.getElementById("job-log");
  const tick = async () => {
    let job;
    try { job = await getJSON(`/api/jobs/${encodeURIComponent(jobId)}`); } catch (e) { return true; }
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.textContent = job.log;
    if (atBottom) log.scrollTop = log.scrollHeight;
    const state = document.getElementById("job-state");
    state.textContent = job.state;
    state.className = `state ${job.state}`;
    if (job.exit_code !== null) document.getElementById("job-exit").textContent = `exit code ${job.exit_code}`;
    if (job.run_id && !document.getElementById("job-run").textContent.trim()) {
      const place = document.getElementById("job-run");
      place.append(" · run ");
      place.append(job.run_listed ? el("a", { href: `/runs/${job.run_id}`, id: "job-run-link", text: job.run_id })
                                  : el("code", { text: job.run_dir }));
    }
    document.getElementById("stop-form").hidden = job.state !== "running";
    return job.state === "running";
  };
  const loop = async () => { if (await tick()) setTimeout(loop, 1000); };
  setTimeout(loop, 1000);
}
