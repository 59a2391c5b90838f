// The operator's view: GET /v1/ops/summary with an API key, drawn as tables and hand-made SVG charts.
// No library and nothing from a CDN (the page must work with no internet). The key stays in
// sessionStorage (this tab only); every string from the server goes through textContent.
"use strict";

const KEY_STORAGE = "musicrl-ops-key";
const REFRESH_MS = 30000;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const $ = (id) => document.getElementById(id);
let timer = null;

// ------------------------------------------------------------------ small DOM helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) el.setAttribute(name, String(value));
  }
  if (text !== undefined) el.textContent = String(text);
  return el;
}

const fmt = (value, digits = 3) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));
const pct = (value) => (value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)} %`);

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toISOString().replace("T", " ").slice(0, 16) + " UTC";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const abs = Math.abs(seconds);
  if (abs < 120) return `${Math.round(seconds)} s`;
  if (abs < 7200) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// One colour per policy version, the same in every chart.
function colour(version) {
  const n = Number.parseInt(version, 10);
  if (Number.isFinite(n)) return PALETTE[(n - 1 + PALETTE.length) % PALETTE.length];
  let hash = 0;
  for (const ch of String(version)) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[hash % PALETTE.length];
}

function facts(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

// ------------------------------------------------------------------ charts (SVG by hand)

function niceTicks(min, max, count = 4) {
  if (!(max > min)) max = min + 1;
  const raw = (max - min) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((m) => m >= raw);
  const ticks = [];
  for (let t = Math.floor(min / step) * step; t <= max + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  if (ticks[ticks.length - 1] < max) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

// The drawing is as wide as its container (so 10px text stays 10px), at least 320 units.
function frame(container, { height = 220, left = 48, bottom = 28 } = {}) {
  const width = Math.max(320, Math.round(container.clientWidth || 720));
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "plot" });
  container.replaceChildren(svg);
  return { svg, width, height, left, right: 12, top: 10, bottom };
}

// Enough decimals to tell the ticks apart (0.21, 0.215, 0.22 need three).
function tickFormat(ticks) {
  const step = ticks.length > 1 ? ticks[1] - ticks[0] : 1;
  const digits = Math.min(6, Math.max(0, Math.ceil(-Math.log10(step) - 1e-9) + (Number((step / 10 ** Math.floor(Math.log10(step))).toFixed(6)) % 1 ? 1 : 0)));
  return (t) => t.toFixed(digits);
}

function yAxis(f, ticks, format) {
  const [lo, hi] = [ticks[0], ticks[ticks.length - 1]];
  const y = (v) => f.height - f.bottom - ((v - lo) / (hi - lo || 1)) * (f.height - f.top - f.bottom);
  for (const t of ticks) {
    f.svg.append(s("line", { x1: f.left, x2: f.width - f.right, y1: y(t), y2: y(t), class: "gridline" }));
    f.svg.append(s("text", { x: f.left - 6, y: y(t) + 4, "text-anchor": "end", class: "tick" }, format(t)));
  }
  return y;
}

function legend(container, entries) {
  if (entries.length === 0) return;
  container.append(h("ul", { class: "legend" },
    entries.map(([name, col, dashed]) => h("li", {}, h("span", { class: `swatch${dashed ? " dashed" : ""}`, style: `--c:${col}` }), name))));
}

function empty(container, message) {
  container.replaceChildren(h("p", { class: "empty" }, message));
  container.dataset.rendered = "empty";
}

// Bars for categories; several series are stacked.
// minTop: the axis reaches at least this far (4 for counts, so that its ticks are whole numbers).
function barChart(container, { labels, series, format = (v) => String(v), labelEvery = 1, title = (i) => labels[i], minTop = 0 }) {
  const total = labels.map((_, i) => series.reduce((sum, ser) => sum + (ser.values[i] || 0), 0));
  if (labels.length === 0 || Math.max(0, ...total) === 0) return empty(container, "Nothing recorded yet.");
  const f = frame(container);
  const y = yAxis(f, niceTicks(0, Math.max(minTop, ...total)), format);
  const band = (f.width - f.left - f.right) / labels.length;
  const barWidth = Math.max(1, band * 0.8);
  let marks = 0;
  labels.forEach((label, i) => {
    const x = f.left + i * band + (band - barWidth) / 2;
    let base = 0;
    for (const ser of series) {
      const value = ser.values[i] || 0;
      if (value > 0) {
        const rect = s("rect", { x, y: y(base + value), width: barWidth, height: y(base) - y(base + value), fill: ser.colour, class: "bar" });
        rect.append(s("title", {}, `${title(i)}: ${ser.name} ${format(value)}`));
        f.svg.append(rect);
        marks++;
      }
      base += value;
    }
    if (i % labelEvery === 0) {
      f.svg.append(s("text", { x: x + barWidth / 2, y: f.height - f.bottom + 16, "text-anchor": "middle", class: "tick" }, label));
    }
  });
  container.dataset.rendered = "true";
  container.dataset.marks = String(marks);
  legend(container, series.length > 1 || series[0].name ? series.map((ser) => [ser.name, ser.colour]) : []);
}

// Lines over categories (versions); null values are gaps.
function lineChart(container, { labels, series, format = (v) => fmt(v, 2) }) {
  const values = series.flatMap((ser) => ser.values).filter((v) => v !== null && v !== undefined);
  if (values.length === 0) return empty(container, "Not recorded for any version.");
  const f = frame(container, { height: 180, left: 44 });
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.1 || 1;
  const ticks = niceTicks(lo >= 0 ? Math.max(0, lo - pad) : lo - pad, hi + pad); // no negative axis for a metric that never is
  const y = yAxis(f, ticks, tickFormat(ticks));
  const step = labels.length > 1 ? (f.width - f.left - f.right - 20) / (labels.length - 1) : 0;
  const x = (i) => f.left + 10 + i * step + (labels.length > 1 ? 0 : (f.width - f.left - f.right) / 2 - 10);
  labels.forEach((label, i) => f.svg.append(s("text", { x: x(i), y: f.height - f.bottom + 16, "text-anchor": "middle", class: "tick" }, `v${label}`)));
  let marks = 0;
  for (const ser of series) {
    let d = "";
    let pen = false; // a missing value lifts the pen: the line has a gap there
    ser.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    if (d) f.svg.append(s("path", { d, fill: "none", stroke: ser.colour, "stroke-width": 2, "stroke-dasharray": ser.dashed ? "5 4" : null, class: "line" }));
    ser.values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const dot = s("circle", { cx: x(i), cy: y(v), r: ser.dashed ? 3 : 4, fill: ser.dashed ? "#fff" : ser.colour, stroke: ser.colour, class: "point" });
      dot.append(s("title", {}, `v${labels[i]} ${ser.name}: ${format(v)}`));
      f.svg.append(dot);
      marks++;
    });
  }
  container.dataset.rendered = "true";
  container.dataset.marks = String(marks);
  legend(container, series.map((ser) => [ser.name, ser.colour, ser.dashed]));
}

// ------------------------------------------------------------------ sections

function renderServed(summary) {
  const served = summary.served;
  const details = served.details || {};
  $("served-version").textContent = served.version ? `version ${served.version}` : "nothing deployed";
  facts($("served-facts"), [
    ["Triton model", summary.model_name],
    ["deployed", when(served.updated_at)],
    ["previous version", served.previous || "–"],
    ["stage / trainer", details.stage ? `${details.stage} / ${details.trainer}` : "base (not from a cycle)"],
    ["run", details.run_id || "–"],
    ["code", details.code_commit ? String(details.code_commit).slice(0, 12) : "–"],
  ]);
  const training = details.training || {};
  const rewardModels = Object.entries(details.reward_model_versions || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  facts($("lineage-facts"), [
    ["parent", details.parent_version || "–"],
    ["reference (KL)", details.reference_version || "–"],
    ["votes", training.votes !== undefined ? `${training.votes} in ${training.segments} segments (policies ${(training.policy_versions || []).join(", ") || "–"})` : "–"],
    ["newest vote used", when(training.newest_vote_at)],
    ["reward models", rewardModels || "–"],
    ["vote → deployed", duration(details.latency && details.latency.newest_vote_to_deploy_s)],
  ]);
  const list = $("lineage-segments").querySelector("ul");
  list.replaceChildren(...(training.segment_keys || []).map((key) => h("li", {}, h("code", {}, key))));
  if (training.segments_truncated) list.append(h("li", {}, `… ${training.segments - training.segment_keys.length} more`));
}

function renderLoop(summary) {
  const buffer = summary.buffer;
  const rm = summary.reward_models;
  const currentRm = rm.versions.find((m) => m.version === rm.current);
  const rejected = summary.cycles.filter((c) => c.outcome === "rejected").length;
  const published = summary.cycles.filter((c) => c.outcome === "published").length;
  facts($("loop-facts"), [
    ["cycles", `${published} published, ${rejected} refused by the gate`],
    ["refused since the last accepted", String(summary.cycles_since_accepted)],
    ["votes / min (last 5 min)", buffer ? fmt(buffer.votes_per_minute.last_5_min_per_minute, 1) : "–"],
    ["votes / min (window)", buffer ? fmt(buffer.votes_per_minute.mean_per_minute, 2) : "–"],
    ["buffer", buffer ? `${buffer.total_votes} rows in ${buffer.segments} segments` : "–"],
    ["preference model", currentRm ? `version ${currentRm.version}${currentRm.trained_on_votes ? `, held-out ${pct(currentRm.heldout_accuracy)}` : " (bootstrap, not from votes)"}` : "–"],
  ]);
  $("loop").classList.toggle("warn", summary.cycles_since_accepted >= 3);
}

function renderVotes(summary) {
  const container = $("chart-votes");
  if (!summary.buffer) return empty(container, "The buffer could not be read.");
  const perMinute = summary.buffer.votes_per_minute;
  const start = new Date(perMinute.start).getTime();
  const labels = perMinute.total.map((_, i) => new Date(start + i * 60000).toISOString().slice(11, 16));
  const series = Object.entries(perMinute.by_policy).map(([version, values]) => ({ name: `policy ${version}`, values, colour: colour(version) }));
  if (series.length === 0) return empty(container, `No votes in the last ${perMinute.minutes} minutes.`);
  barChart(container, { labels, series, labelEvery: Math.max(1, Math.ceil(labels.length / 12)), title: (i) => `${labels[i]} UTC`, minTop: 4 });
}

function renderBuffer(summary) {
  const container = $("chart-buffer");
  if (!summary.buffer) return empty(container, "The buffer could not be read.");
  const rows = summary.buffer.by_policy;
  const labels = rows.map((r) => `v${r.policy_version}`);
  barChart(container, {
    labels,
    series: rows.length ? [
      { name: "decided", values: rows.map((r) => r.votes - r.ties), colour: "#4e79a7" },
      { name: "ties", values: rows.map((r) => r.ties), colour: "#bab0ac" },
    ] : [],
    minTop: 4,
  });
}

function renderLatency(summary) {
  const rows = summary.versions.filter((v) => v.latency && v.latency.newest_vote_to_deploy_s !== null);
  barChart($("chart-latency"), {
    labels: rows.map((v) => `v${v.version}`),
    series: rows.length ? [
      { name: "newest vote", values: rows.map((v) => v.latency.newest_vote_to_deploy_s / 60), colour: "#59a14f" },
      { name: "median vote (stacked)", values: rows.map((v) => Math.max(0, (v.latency.median_vote_to_deploy_s - v.latency.newest_vote_to_deploy_s) / 60)), colour: "#a0cbe8" },
    ] : [],
    format: (m) => `${Number(m).toFixed(m < 10 ? 1 : 0)} min`,
  });
}

function renderGateCharts(summary) {
  const versions = summary.versions;
  const labels = versions.map((v) => v.version);
  const charts = [["chart-reward", "reward"], ["chart-kl", "kl"], ["chart-text", "text_adherence"], ["chart-quality", "quality"]];
  for (const [id, metric] of charts) {
    lineChart($(id), {
      labels,
      series: [
        { name: "version", values: versions.map((v) => v.metrics[metric]), colour: "#4e79a7" },
        { name: "its parent", values: versions.map((v) => v.baseline[metric]), colour: "#f28e2b", dashed: true },
      ],
    });
  }
}

function checkChips(cycle) {
  if (cycle.checks && cycle.checks.length) {
    return h("span", { class: "checks" }, cycle.checks.map((c) => h("span", { class: `chip ${c.passed ? "pass" : "fail"}`, title: c.detail }, `${c.passed ? "✓" : "✗"} ${c.name}`)));
  }
  if (cycle.outcome === "published") return h("span", { class: "chip pass" }, "✓ all checks passed");
  return h("span", {}, "–");
}

const CANARY_CLASS = { promoted: "pass", rolled_back: "fail", deploy_failed: "fail", inconclusive: "", running: "" };

function canaryChip(canary) {
  if (!canary) return h("span", {}, "–");
  const bounds = canary.lower === null || canary.lower === undefined ? "" : ` [${pct(canary.lower)}, ${pct(canary.upper)}]`;
  return h("span", { class: `chip ${CANARY_CLASS[canary.state] ?? ""}` }, `${canary.state.replaceAll("_", " ")} ${pct(canary.win_rate)}${bounds}`);
}

function renderCanaries(summary) {
  const body = $("canaries").querySelector("tbody");
  const canaries = summary.canaries || [];
  if (canaries.length === 0) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "empty" },
      "No canary yet (MUSICRL_FINETUNE_PROMOTION=canary or both serves a candidate to a share of pairs first).")));
    return;
  }
  body.replaceChildren(...canaries.map((c) => {
    const v = c.votes || {};
    return h("tr", {}, h("td", {}, when(c.started_at)), h("td", {}, c.version), h("td", {}, c.baseline_version),
      h("td", {}, h("span", { class: `chip ${CANARY_CLASS[c.state] ?? ""}` }, c.state.replaceAll("_", " "))),
      h("td", {}, v.decided === undefined ? "–" : `${v.wins} / ${v.losses} / ${v.ties}`),
      h("td", {}, c.win_rate === null || c.win_rate === undefined ? "–" : `${pct(c.win_rate)} [${pct(c.lower)}, ${pct(c.upper)}]`),
      h("td", {}, c.decision_reason || ""));
  }));
}

function renderCycles(summary) {
  const body = $("cycles").querySelector("tbody");
  if (summary.cycles.length === 0) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No cycle has been recorded in the registry yet.")));
    return;
  }
  body.replaceChildren(...summary.cycles.map((c) => {
    const row = h("tr", { class: `outcome-${c.outcome}` },
      h("td", {}, when(c.at)),
      h("td", {}, h("code", {}, c.run_id || "–")),
      h("td", {}, h("span", { class: `badge ${c.outcome}` }, c.outcome.replaceAll("_", " "))),
      h("td", {}, c.version || "–"),
      h("td", {}, c.parent_version || "–"),
      h("td", {}, c.reward === null ? "–" : `${fmt(c.baseline_reward)} → ${fmt(c.reward)}`),
      h("td", {}, fmt(c.kl, 2)),
      h("td", {}, checkChips(c)),
      h("td", {}, canaryChip(c.canary)));
    const notes = [];
    if (c.reason) notes.push(h("div", { class: "reason" }, c.reason));
    if (c.checkpoints && c.checkpoints.length) {
      notes.push(h("div", { class: "snapshots" }, "snapshots: ", c.checkpoints.map((p) =>
        h("span", { class: `chip ${p.passed ? "pass" : "fail"}`, title: p.reason || "" }, `step ${p.step}: ${fmt(p.reward)} / KL ${fmt(p.kl, 1)}`))));
    }
    if (notes.length) row.children[7].append(...notes);
    return row;
  }));
}

function renderVersions(summary) {
  const body = $("versions").querySelector("tbody");
  body.replaceChildren(...[...summary.versions].reverse().map((v) => {
    const rm = v.reward_model;
    const rmText = rm ? (rm.published ? `new ${rm.published} (${pct(rm.heldout_accuracy)})` : rm.kept ? `kept ${rm.kept}` : rm.skipped ? "skipped" : "–")
      : Object.entries(v.reward_model_versions).map(([k, x]) => `${k} ${x}`).join(", ") || "–";
    const win = v.win_rate ? `${pct(v.win_rate.value)}${v.win_rate.opponent ? ` vs v${v.win_rate.opponent}` : ""}` : "–";
    const latency = v.latency.newest_vote_to_deploy_s === null ? "–"
      : `${duration(v.latency.newest_vote_to_deploy_s)}${v.latency.deployed_at_basis === "published" ? " (at publish)" : ""}`;
    return h("tr", { class: v.is_current ? "current" : null },
      h("td", {}, v.version),
      h("td", {}, h("span", { class: `badge ${v.status}` }, v.status.replaceAll("_", " "))),
      h("td", {}, when(v.created_at)),
      h("td", {}, v.parent_version || "–"),
      h("td", {}, v.stage || "base"),
      h("td", {}, v.run_id ? `${v.training.votes} (${v.training.policy_versions.join(", ") || "–"})` : "–"),
      h("td", {}, rmText),
      h("td", {}, fmt(v.metrics.reward)),
      h("td", {}, fmt(v.metrics.kl, 2)),
      h("td", {}, fmt(v.metrics.text_adherence)),
      h("td", {}, fmt(v.metrics.quality)),
      h("td", {}, win),
      h("td", {}, latency));
  }));
}

function renderRewardModels(summary) {
  const rm = summary.reward_models;
  const rows = [...rm.versions].reverse().map((m) => h("tr", { class: m.is_current ? "current" : null },
    h("td", {}, m.version), h("td", {}, when(m.at)), h("td", {}, m.trained_on_votes ? `yes (generator ${m.generator_version})` : "no (bootstrap)"),
    h("td", {}, pct(m.heldout_accuracy)), h("td", {}, m.n_train_pairs === null ? "–" : String(m.n_train_pairs)), h("td", {}, m.is_current ? "current" : "")));
  const refused = rm.rejected.map((m) => h("tr", { class: "refused" },
    h("td", {}, "refused"), h("td", {}, when(m.at)), h("td", {}, m.generator_version ? `generator ${m.generator_version}` : "–"),
    h("td", {}, pct(m.heldout_accuracy)), h("td", {}, m.n_train_pairs === null ? "–" : String(m.n_train_pairs)), h("td", {}, m.reason || "")));
  $("reward-models").querySelector("tbody").replaceChildren(...rows, ...refused);
}

function renderHeadToHead(summary) {
  const body = $("head-to-head").querySelector("tbody");
  const rows = summary.buffer ? summary.buffer.head_to_head : [];
  if (rows.length === 0) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "empty" },
      "No pair has clips of two versions yet (a challenger experiment or a hot swap makes some).")));
    return;
  }
  body.replaceChildren(...rows.map((r) => h("tr", {}, h("td", {}, r.version), h("td", {}, r.opponent), h("td", {}, r.wins),
    h("td", {}, r.losses), h("td", {}, r.ties), h("td", {}, pct(r.win_rate)))));
}

function renderErrors(summary) {
  const box = $("errors");
  box.hidden = summary.errors.length === 0;
  box.replaceChildren(...summary.errors.map((e) => h("p", {}, `${e.section} could not be read: ${e.error}`)));
}

function render(summary) {
  $("content").hidden = false; // first: the charts size themselves to their containers
  renderErrors(summary);
  renderServed(summary);
  renderLoop(summary);
  renderVotes(summary);
  renderBuffer(summary);
  renderLatency(summary);
  renderGateCharts(summary);
  renderCycles(summary);
  renderCanaries(summary);
  renderVersions(summary);
  renderRewardModels(summary);
  renderHeadToHead(summary);
  $("generated").textContent = `Generated ${when(summary.generated_at)}; the registry and the buffer are re-read at most every few seconds.`;
  document.body.dataset.loaded = "true";
}

// ------------------------------------------------------------------ loading

async function load() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (!key) return;
  $("status").textContent = "Loading…";
  try {
    const response = await fetch(`/v1/ops/summary?window_minutes=${encodeURIComponent($("window").value)}`, {
      headers: { "X-API-Key": key }, cache: "no-store",
    });
    const body = await response.json().catch(() => null);
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(KEY_STORAGE);
      stopRefresh();
      $("status").textContent = `Refused: ${(body && body.detail) || response.status}. Enter an API key.`;
      return;
    }
    if (!response.ok) throw new Error((body && body.detail) || `HTTP ${response.status}`);
    render(body);
    $("status").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  } catch (err) {
    $("status").textContent = `Could not load the summary: ${err.message}`;
  }
}

function stopRefresh() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

function startRefresh() {
  stopRefresh();
  if ($("auto-refresh").checked && sessionStorage.getItem(KEY_STORAGE)) timer = setInterval(load, REFRESH_MS);
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  load();
  startRefresh();
});
$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  stopRefresh();
  $("api-key").setAttribute("required", "");
  $("content").hidden = true;
  $("status").textContent = "Key forgotten.";
});
$("window").addEventListener("change", load);
$("auto-refresh").addEventListener("change", startRefresh);
if (sessionStorage.getItem(KEY_STORAGE)) {
  $("api-key").removeAttribute("required");
  load();
  startRefresh();
}
