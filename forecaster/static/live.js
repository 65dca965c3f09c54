// forecaster live page: polls the daemon's JSON and draws the chosen stream on a canvas.
// Plain JavaScript, no build step and no library: it ships inside the Python package.
"use strict";

const TABLE_EVERY_MS = 1000; // the streams table
const CHART_EVERY_MS = 500; // the chosen stream: at least one update a second with room to spare
const SHOWN_ROWS = 200; // rows drawn until "show all": a 1,000-row table's layout took ~0.3 s

// What the page did, for people and for the browser test (tests/test_live_page.py).
const live = (window.forecasterLive = {
  tableRenders: 0,
  chartDraws: 0,
  chartUpdates: 0, // draws that brought new samples
  drawnPoints: 0,
  lastSeq: null,
  firstRenderMs: null, // page start -> table and chart both drawn once
  errors: 0,
});

const state = {
  streams: null,
  chosen: decodeURIComponent((location.hash.match(/stream=([^&]*)/) || [])[1] || ""),
  sortKey: "name",
  sortUp: true,
  filter: "",
  showAll: false,
  stream: null,
  tableStale: true,
};

const $ = (selector) => document.querySelector(selector);
const byName = new Intl.Collator("en", { numeric: true }); // room-2 before room-10

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return x.toExponential(digits - 1);
  return a >= 10 ** digits ? x.toFixed(0) : x.toPrecision(digits);
}

function tick(x) {
  // an axis label: a round number as it is written (no trailing zeros)
  return Math.abs(x) >= 1e6 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(1) : String(Number(x.toPrecision(6)));
}

function pct(x) {
  return x === null || !Number.isFinite(x) ? "–" : `${(100 * x).toFixed(1)} %`;
}

async function getJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function setStatus(text, down = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("down", down);
}

// -- the streams table ---------------------------------------------------------------------------
function rowsOf(data) {
  const rows = data.names.map((name, i) => ({
    name,
    samples: data.samples[i],
    anomalies: data.anomalies[i],
    mae: data.mae[i],
    naive_mae: data.naive_mae[i],
    skill: data.skill[i],
    coverage: data.coverage[i],
  }));
  const key = state.sortKey;
  const sign = state.sortUp ? 1 : -1;
  rows.sort((a, b) => {
    if (key === "name") return byName.compare(a.name, b.name) * sign;
    const x = a[key];
    const y = b[key];
    if (x === y) return byName.compare(a.name, b.name);
    if (x === null) return 1; // no number yet: always last
    if (y === null) return -1;
    return (x < y ? -1 : 1) * sign;
  });
  return rows;
}

function renderTable() {
  const data = state.streams;
  if (!data) return;
  const filter = state.filter.toLowerCase();
  const matching = rowsOf(data).filter((r) => !filter || r.name.toLowerCase().includes(filter));
  if (!state.chosen && matching.length) choose(matching[0].name);
  const rows = state.showAll ? matching : matching.slice(0, SHOWN_ROWS);
  const target = data.coverage_target;
  const html = rows.map((r) => {
    const skill = r.skill === null ? "" : r.skill >= 0 ? "good" : "bad";
    const cover = r.coverage === null || r.coverage >= target - 0.1 ? "" : "bad";
    const chosen = r.name === state.chosen ? ' class="chosen"' : "";
    const name = escapeHtml(r.name);
    return (
      `<tr data-name="${name}"${chosen}><td title="${name}">${name}</td>` +
      `<td class="num">${r.samples}</td><td class="num">${fmt(r.mae)}</td>` +
      `<td class="num">${fmt(r.naive_mae)}</td>` +
      `<td class="num ${skill}">${r.skill === null ? "–" : (r.skill >= 0 ? "+" : "") + fmt(r.skill, 2)}</td>` +
      `<td class="num ${cover}">${pct(r.coverage)}</td>` +
      `<td class="num${r.anomalies ? " bad" : ""}">${r.anomalies}</td></tr>`
    );
  });
  $("#streams tbody").innerHTML = html.join("");
  const total = data.names.length;
  const capped = total >= data.max_streams ? ` (the first ${data.max_streams} kept)` : "";
  const shown = rows.length < matching.length ? `${rows.length} shown, ` : "";
  $("#count").textContent = `${shown}${matching.length} of ${total} streams${capped}`;
  $("#more").hidden = rows.length >= matching.length;
  $("#more").textContent = `show all ${matching.length}`;
  $("#target").textContent = pct(target);
  $("#window").textContent = String(data.history);
  for (const th of document.querySelectorAll("#streams th")) {
    th.classList.toggle("sorted", th.dataset.key === state.sortKey);
    th.classList.toggle("up", th.dataset.key === state.sortKey && state.sortUp);
  }
  state.tableStale = false;
  live.tableRenders += 1;
  firstRender();
}

async function pollStreams() {
  const started = performance.now();
  try {
    const data = await getJson("streams.json");
    const changed = !state.streams || data.ticks !== state.streams.ticks;
    state.streams = data;
    if (changed || state.tableStale) renderTable();
    setStatus(`${data.names.length} streams · ${data.ticks} ticks · updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    live.errors += 1;
    live.lastError = String(error);
    setStatus("daemon unreachable, retrying…", true);
  }
  setTimeout(pollStreams, Math.max(0, TABLE_EVERY_MS - (performance.now() - started)));
}

function choose(name, poll = true) {
  state.chosen = name;
  history.replaceState(null, "", `#stream=${encodeURIComponent(name)}`);
  for (const tr of document.querySelectorAll("#streams tbody tr")) {
    tr.classList.toggle("chosen", tr.dataset.name === name);
  }
  if (poll) {
    state.stream = null;
    pollStream();
  }
}

// -- the chart -----------------------------------------------------------------------------------
let chartTimer = null;
let chartToken = 0; // a poll started later (another stream chosen) supersedes this one

async function pollStream() {
  clearTimeout(chartTimer);
  const token = ++chartToken;
  const started = performance.now();
  const name = state.chosen;
  if (name || !state.streams) {
    try {
      // no stream chosen yet: the daemon sends the first by name, as the table will show it
      const data = await getJson(`stream.json?name=${encodeURIComponent(name)}`);
      if (token !== chartToken) return;
      if (!state.chosen && data.kept) choose(data.name, false);
      if (data.samples !== live.lastSeq) live.chartUpdates += 1;
      live.lastSeq = data.samples;
      state.stream = data;
      draw();
    } catch (error) {
      live.errors += 1;
      live.lastError = String(error);
    }
  }
  if (token !== chartToken) return;
  chartTimer = setTimeout(pollStream, Math.max(0, CHART_EVERY_MS - (performance.now() - started)));
}

function finite(x) {
  return x !== null && x !== undefined && Number.isFinite(x);
}

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
  return ticks;
}

function draw() {
  const data = state.stream;
  const canvas = $("#chart");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = color("--muted");
  if (state.chosen) $("#chart-title").textContent = state.chosen;
  if (!data || !data.points.value.length) {
    const what = state.chosen ? `waiting for samples of ${state.chosen}…` : "waiting for samples…";
    ctx.fillText(what, 12, 24);
    return;
  }
  const p = data.points;
  const n = p.value.length;
  $("#chart-title").textContent = data.name;
  const row = state.streams && state.streams.names.indexOf(data.name);
  if (row !== null && row >= 0) {
    const s = state.streams;
    $("#chart-numbers").textContent =
      `${data.samples} samples · MAE ${fmt(s.mae[row])} (naive ${fmt(s.naive_mae[row])}) · ` +
      `skill ${fmt(s.skill[row], 2)} · coverage ${pct(s.coverage[row])} · ${data.anomalies} anomalies`;
  }
  // Forecast i (drawn at sample i) is the prediction published with sample i - 1.
  const t = p.ts;
  const steps = [];
  for (let i = 1; i < n; i++) if (t[i] > t[i - 1]) steps.push(t[i] - t[i - 1]);
  steps.sort((a, b) => a - b);
  const dt = steps.length ? steps[Math.floor(steps.length / 2)] : 1;
  const tNext = t[n - 1] + dt;
  let lo = Infinity;
  let hi = -Infinity;
  const widen = (v) => {
    if (finite(v)) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
  };
  for (let i = 0; i < n; i++) {
    widen(p.value[i]);
    widen(p.prediction[i]);
    widen(p.lower[i]);
    widen(p.upper[i]);
  }
  if (!Number.isFinite(lo)) return;
  if (hi - lo < 1e-12) {
    lo -= 1;
    hi += 1;
  }
  const pad = 0.05 * (hi - lo);
  lo -= pad;
  hi += pad;
  const left = 64;
  const right = 16;
  const top = 10;
  const bottom = 26;
  const t0 = t[0];
  const X = (x) => left + ((x - t0) / Math.max(tNext - t0, 1e-9)) * (w - left - right);
  const Y = (v) => top + ((hi - v) / (hi - lo)) * (h - top - bottom);
  // grid and axes
  ctx.strokeStyle = "#eaecf0";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const v of niceTicks(lo, hi, 6)) {
    ctx.beginPath();
    ctx.moveTo(left, Y(v));
    ctx.lineTo(w - right, Y(v));
    ctx.stroke();
    ctx.fillText(tick(v), left - 6, Y(v));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const last = t[n - 1];
  for (const s of niceTicks(t0 - last, 0, 6)) {
    ctx.fillText(s === 0 ? "now" : `${tick(s)} s`, X(last + s), h - bottom + 6);
  }
  // interval band: forecast i's bounds, and the next one's
  const at = (i) => (i < n ? t[i] : tNext);
  ctx.fillStyle = color("--band");
  ctx.beginPath();
  let open = false;
  const upper = [];
  for (let i = 1; i <= n; i++) {
    const a = p.lower[i - 1];
    const b = p.upper[i - 1];
    if (finite(a) && finite(b)) upper.push([at(i), a, b]);
  }
  upper.forEach(([x, , b], k) => (k ? ctx.lineTo(X(x), Y(b)) : ctx.moveTo(X(x), Y(b))));
  for (let k = upper.length - 1; k >= 0; k--) ctx.lineTo(X(upper[k][0]), Y(upper[k][1]));
  ctx.closePath();
  ctx.fill();
  // forecast line (dashed), then the values
  const line = (xs, ys, stroke, dash) => {
    ctx.strokeStyle = stroke;
    ctx.lineWidth = 1.6;
    ctx.setLineDash(dash);
    ctx.beginPath();
    open = false;
    for (let k = 0; k < xs.length; k++) {
      if (!finite(ys[k])) {
        open = false;
        continue;
      }
      if (open) ctx.lineTo(X(xs[k]), Y(ys[k]));
      else ctx.moveTo(X(xs[k]), Y(ys[k]));
      open = true;
    }
    ctx.stroke();
    ctx.setLineDash([]);
  };
  const fx = [];
  const fy = [];
  for (let i = 1; i <= n; i++) {
    fx.push(at(i));
    fy.push(p.prediction[i - 1]);
  }
  line(fx, fy, color("--forecast"), [5, 4]);
  line(t, p.value, color("--value"), []);
  // anomalies and the next forecast
  ctx.strokeStyle = color("--anomaly");
  ctx.lineWidth = 2;
  for (let i = 0; i < n; i++) {
    if (p.anomaly[i] > data.threshold && finite(p.value[i])) {
      ctx.beginPath();
      ctx.arc(X(t[i]), Y(p.value[i]), 5, 0, 2 * Math.PI);
      ctx.stroke();
    }
  }
  if (finite(p.prediction[n - 1])) {
    ctx.fillStyle = color("--forecast");
    ctx.beginPath();
    ctx.arc(X(tNext), Y(p.prediction[n - 1]), 4, 0, 2 * Math.PI);
    ctx.fill();
  }
  canvas.dataset.points = String(n);
  live.drawnPoints = n;
  live.chartDraws += 1;
  firstRender();
}

function firstRender() {
  if (live.firstRenderMs === null && live.tableRenders && live.chartDraws) {
    live.firstRenderMs = performance.now();
    document.body.dataset.ready = "1";
  }
}

// -- wiring --------------------------------------------------------------------------------------
$("#streams tbody").addEventListener("click", (event) => {
  const tr = event.target.closest("tr");
  if (tr) choose(tr.dataset.name);
});
$("#streams thead").addEventListener("click", (event) => {
  const th = event.target.closest("th");
  if (!th) return;
  if (state.sortKey === th.dataset.key) state.sortUp = !state.sortUp;
  else {
    state.sortKey = th.dataset.key;
    state.sortUp = th.dataset.key === "name";
  }
  renderTable();
});
$("#filter").addEventListener("input", (event) => {
  state.filter = event.target.value;
  renderTable();
});
$("#more").addEventListener("click", () => {
  state.showAll = true;
  renderTable();
});
window.addEventListener("resize", draw);
pollStreams();
pollStream();
