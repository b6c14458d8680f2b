// The Rollout section of the ttmm page (issue 19), shown only when the server runs a staged
// rollout (GET /v1/ttmm/rollout answers; without one the page stays as it was): the arms, the
// steps, the candidate's share over time, the quality difference at each decision, counts per
// arm and the decision log, refreshed every few seconds. Operators promote, pause, resume or
// roll back with the admin key, which lives in its password field only (never stored).
// Exported as window.rollout; app.js starts it, with its API helpers, once the bank has loaded.
(() => {
"use strict";

const { make, chart, bar } = window.plot;
const REFRESH_MS = 5000;
const DECISIONS = 100;  // how many of the latest decisions to fetch (each carries its evidence)
const CANDIDATE = "#2ca02c", CONTROL = "#7f7f7f";  // TTMM's green, as in the scores
const STATUS = {
  running: "running",
  paused: "paused",
  held: "held: waiting for an operator",
  complete: "complete",
  rolled_back: "rolled back",
};

let page = null;      // app.js's helpers: { $, api, getJSON, report, clearError }
let timer = null;
let seq = 0;          // the newest refresh; older answers are dropped
let inFlight = 0;
let failure = null;   // the message of a failed refresh while it is on show

// -- formatting -----------------------------------------------------------------------------

const pct = (v) => `${+v.toFixed(1)}%`;
const signed = (v, digits = 4) => `${v >= 0 ? "+" : ""}${v.toFixed(digits)}`;
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
const orDash = (v, format) => (v === null || v === undefined ? "–" : format(v));

function when(t) {
  const day = new Date(t * 1000).toLocaleDateString();
  return day === new Date().toLocaleDateString() ? clock(t) : `${day} ${clock(t)}`;
}

function seconds(s) {
  return s < 1 ? `${(1000 * s).toFixed(0)} ms` : `${s.toFixed(2)} s`;
}

function interval(q) {
  if (!q.n) return "no scored requests yet";
  const band = q.lower === null || q.upper === null
    ? "interval not yet defined"
    : `[${signed(q.lower)}, ${signed(q.upper)}]`;
  return `${signed(q.estimate)} nats/token ${band} over ${q.n} ${q.paired ? "paired " : ""}requests`;
}

function routing(r) {
  return `${r.rule}, β=${r.beta}, τ=${r.tau}, at most ${r.max_active} experts`;
}

function describeControl(control) {
  const kind = control.kind;
  if (kind === "base") return "base model (no adapter)";
  if (kind === "finetune") return `fine-tuning adapter of ${control.bank || "the candidate bank"}`;
  if (kind === "adapter") return `adapter ${control.path}`;
  const how = control.routing ? ` (routing ${Object.entries(control.routing).map(([k, v]) => `${k}=${v}`).join(", ")})` : "";
  return `bank ${control.bank}${how}`;
}

function kvRows(table, rows) {
  table.replaceChildren();
  for (const [key, value] of rows) {
    const row = make("tr", {}, table);
    make("th", { text: key }, row);
    make("td", { text: value }, row);
  }
}

// -- drawing --------------------------------------------------------------------------------

function render(status) {
  const $ = page.$;
  const n = status.steps.length, share = status.share.candidate;
  const label = STATUS[status.status] || status.status;
  $("rollout-section").hidden = false;
  $("rollout-link").hidden = false;
  $("rollout-link").firstElementChild.textContent =
    `Rollout ${label}: step ${status.step + 1} of ${n}, candidate at ${pct(share)} ↓`;
  $("rollout-status").textContent = label;
  $("rollout-status").className = `badge ${status.status}`;
  $("rollout-updated").textContent = `updated ${clock(Date.now() / 1000)}`;

  const { control, candidate } = status.arms;
  $("rollout-mode").textContent = status.mode === "shadow"
    ? "shadow mode: every request is scored by both arms"
    : "canary mode: each arm is scored on its own traffic";
  kvRows($("rollout-arms"), [
    ["control", `${control.kind}: ${describeControl(control)}`],
    ["candidate", `bank ${candidate.bank} (${candidate.experts} experts; routing ${routing(candidate.routing)})`],
    ["mode", status.mode],
    ["rollout", `${status.rollout_id}, started ${when(status.started_at)}`],
  ]);
  kvRows($("rollout-guardrails"), [["min_requests", String(status.min_requests)]].concat(
    Object.entries(status.guardrails).map(([k, v]) => [k, String(v)])));

  $("rollout-step").textContent = `step ${status.step + 1} of ${n}`;
  const steps = $("rollout-steps");
  steps.replaceChildren();
  steps.className = `steps ${status.status}`;
  status.steps.forEach((s, i) => {
    const done = i < status.step || (status.status === "complete" && i === status.step);
    const cls = done ? "done" : i === status.step ? "current" : "";
    make("li", { class: cls, text: pct(s) }, steps);
  });
  const bars = $("rollout-share");
  bars.replaceChildren(bar(share / 100, CANDIDATE, "share-bar"));
  make("span", {
    class: "share-text",
    text: `candidate ${pct(share)} · control ${pct(status.share.control)}`,
  }, bars);
  $("rollout-reason").textContent = status.reason ? `why: ${status.reason}` : "";

  // this rollout's decisions, from its start (the log may hold earlier rollouts too)
  const mine = status.decisions.filter((d) => d.rollout_id === status.rollout_id);
  const first = mine.findIndex((d) => d.action === "start");
  const run = first >= 0 ? mine.slice(first) : mine;
  drawShare(run, share);
  drawQuality(run, status);
  drawCounts(status.evidence);
  drawLog(status.decisions, status.rollout_id);
}

function drawShare(run, share) {
  const now = Math.max(Date.now() / 1000, ...run.map((d) => d.time));
  const points = run.map((d) => [d.time, d.to_share]).concat([[now, share]]);
  chart(page.$("rollout-share-plot"), [
    { kind: "step", points, cls: "candidate" },
    {
      kind: "dots", cls: "candidate",
      points: run.map((d) => [d.time, d.to_share,
        `${d.action} by ${d.by}, ${when(d.time)}: ${pct(d.from_share)} → ${pct(d.to_share)}`]),
    },
  ], { y: [0, 100], yLabel: (v) => `${v}%`, xLabel: clock });
}

function drawQuality(run, status) {
  const points = run.map((d) => [d.evidence.quality, d.action, d.time])
    .concat([[status.evidence.quality, "now", Date.now() / 1000]]);
  const last = points.length - 1;
  const scored = points.map(([q], i) => [i, q]).filter(([, q]) => q.n > 0);
  const title = ([q, action, t]) => `${action}, ${when(t)}: ${interval(q)}`;
  const g = status.guardrails;
  chart(page.$("rollout-quality-plot"), [
    {
      kind: "band", cls: "quality",
      points: scored.filter(([, q]) => q.lower !== null && q.upper !== null).map(([i, q]) => [i, q.lower, q.upper]),
    },
    { kind: "hline", y: 0, cls: "zero" },
    { kind: "dots", cls: "quality", points: scored.filter(([i]) => i < last).map(([i, q]) => [i, q.estimate, title(points[i])]) },
    { kind: "dots", cls: "quality now", points: scored.filter(([i]) => i === last).map(([i, q]) => [i, q.estimate, title(points[i])]) },
  ], {
    x: [0, last],
    xInteger: true,
    xLabel: (v) => (points[v] ? points[v][1] : ""),
    yLabel: (v) => signed(v, 2),
  });
  const e = status.evidence;
  const level = `${+(100 * (1 - g.alpha)).toFixed(1)}%`;
  page.$("rollout-quality").textContent =
    `Now: ${interval(e.quality)} (${level} anytime-valid interval; below zero: the candidate ` +
    `is better). It rolls back when the interval lies above max_loss=${g.max_loss} and ` +
    `promotes when it lies below −min_gain=${-g.min_gain} with ${status.min_requests} scored ` +
    `requests in the step (${e.step_scored} so far). p95 latency, candidate over control: ` +
    `${orDash(e.latency_p95_ratio, (r) => `${r.toFixed(2)}×`)}.`;
}

function drawCounts(evidence) {
  const tbody = page.$("rollout-counts").querySelector("tbody");
  tbody.replaceChildren();
  for (const [scope, name] of [["step", "this step"], ["total", "in total"]]) {
    for (const arm of ["control", "candidate"]) {
      const c = evidence[scope][arm];
      const row = make("tr", { "data-scope": scope, "data-arm": arm, class: arm === "control" ? "first" : "" }, tbody);
      make("th", { text: arm === "control" ? name : "" }, row);
      const cell = make("td", {}, row);
      make("span", { class: "swatch", style: `background:${arm === "candidate" ? CANDIDATE : CONTROL}` }, cell);
      cell.append(` ${arm}`);
      const errors = c.requests ? `${c.errors} (${pct(100 * c.error_rate)})` : "–";
      const feedback = c.feedback.count ? `${c.feedback.mean.toFixed(2)} (${c.feedback.count})` : "–";
      for (const text of [c.requests, errors, c.scored, orDash(c.mean_nll_per_token, (v) => v.toFixed(4)),
        orDash(c.p95_latency_s, seconds), feedback]) {
        make("td", { class: "num", text: String(text) }, row);
      }
    }
  }
}

function drawLog(decisions, rolloutId) {
  const tbody = page.$("rollout-log").querySelector("tbody");
  tbody.replaceChildren();
  for (const d of [...decisions].reverse()) {
    const old = d.rollout_id !== rolloutId;
    const row = make("tr", { "data-action": d.action, "data-by": d.by, class: old ? "old" : "" }, tbody);
    make("td", { class: "num", text: when(d.time) }, row);
    make("td", { class: `action ${d.action}`, text: d.action }, row);
    make("td", { text: d.by }, row);
    const moved = d.from_share === d.to_share ? pct(d.to_share) : `${pct(d.from_share)} → ${pct(d.to_share)}`;
    make("td", { class: "num", text: moved }, row);
    make("td", { class: "reason", text: old ? `${d.reason} (rollout ${d.rollout_id})` : d.reason }, row);
  }
}

// -- talking to the server ------------------------------------------------------------------

function hide() {
  page.$("rollout-section").hidden = true;
  page.$("rollout-link").hidden = true;
  clearInterval(timer);
  timer = null;
}

async function refresh() {
  const mine = ++seq;
  inFlight++;
  try {
    const status = await page.getJSON(`/v1/ttmm/rollout?decisions=${DECISIONS}`);
    if (mine !== seq) return;
    render(status);
    if (!timer) timer = setInterval(() => { if (!document.hidden && !inFlight) refresh(); }, REFRESH_MS);
    if (failure !== null && page.$("error").textContent === failure) page.clearError();
    failure = null;
  } catch (err) {
    if (err.status === 404) { hide(); return; }  // this server runs no rollout
    page.report(err);
    failure = page.$("error").textContent;
  } finally {
    inFlight--;
  }
}

function answer(text, isError) {
  page.$("rollout-answer").replaceChildren(make("div", { class: isError ? "error" : "answer", text }));
}

async function act(action) {
  const $ = page.$;
  const key = $("admin-key").value;
  if (!key) {
    answer("enter the admin key first", true);
    $("admin-key").focus();
    return;
  }
  const reason = $("rollout-why").value.trim();
  const buttons = $("rollout-actions").querySelectorAll("button");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const { decision: d } = await page.getJSON(`/v1/ttmm/rollout/${action}`, reason ? { reason } : {}, key);
    answer(`${d.action} by ${d.by}: candidate ${pct(d.from_share)} → ${pct(d.to_share)}, ` +
      `step ${d.step + 1} (${d.reason})`, false);
    $("rollout-why").value = "";
    await refresh();
  } catch (err) {
    answer(`${action} refused: ${err.message}`, true);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

/** Show the section if the server runs a rollout (``bank.rollout``, from /v1/ttmm/bank:
 * asking /v1/ttmm/rollout would cost a server without one a 404, which chromium logs as a
 * console error); called again after each bank load. */
async function start(helpers, runsRollout) {
  if (!page) {
    page = helpers;
    page.$("rollout-refresh").addEventListener("click", refresh);
    for (const button of page.$("rollout-actions").querySelectorAll("button")) {
      button.addEventListener("click", () => act(button.dataset.action));
    }
  }
  try {
    if (timer || runsRollout) await refresh();
  } catch (err) {
    page.report(err);
  }
}

window.rollout = { start };
})();
