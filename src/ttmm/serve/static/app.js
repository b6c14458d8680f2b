// The ttmm page: talks to the server's own API (with the user's API key) and draws the bank,
// the routing of a prompt, base/TTMM/fine-tuning continuations and perplexity scores
// (and, when the server runs a staged rollout, rollout.js's section).
"use strict";

const { clusterColor, make, drawMap, sparkline, bar } = window.plot;
const KEY_STORE = "ttmm-api-key";
const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  bank: null,
  view: null,       // the drawn map, with setQuery()
  prompt: null,     // the last prompt run, re-routed when a control changes
  point: null,      // where it landed on the map
  similarities: null,
  plan: null,
  routeSeq: 0,
};
const $ = (id) => document.getElementById(id);

class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// -- errors: always in the page, never a blank screen ------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function report(err) {
  showError(err && err.message ? err.message : String(err));
}

window.addEventListener("error", (event) => showError(`page error: ${event.message}`));
window.addEventListener("unhandledrejection", (event) => report(event.reason));

// -- the API ------------------------------------------------------------------------------

/** fetch() with the page's API key (or another key, such as the rollout's admin key); a
 * failure throws an APIError with the server's message. */
async function api(path, body, key) {
  const own = key === undefined;  // the page's key: a 401 asks the user for it again
  const token = own ? state.key : key;
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new APIError(0, `cannot reach the server (${err.message}); is \`ttmm serve\` running?`);
  }
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try {
    const payload = await response.json();
    if (payload.error && payload.error.message) message = payload.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401 && own) askForKey();
  throw new APIError(response.status, message);
}

const getJSON = async (path, body, key) => (await api(path, body, key)).json();

/** POST a streamed completion and append its text to out as it arrives. */
async function stream(path, body, out) {
  out.replaceChildren(make("span", { class: "prompt", text: body.prompt }));
  const gen = make("span", { class: "gen" }, out);
  out.className = "out streaming";
  const response = await api(path, { ...body, stream: true });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") {
          out.className = "out done";
          return;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new APIError(500, chunk.error.message);
        if (chunk.choices && chunk.choices.length) gen.textContent += chunk.choices[0].text || "";
      }
    }
  }
  out.className = "out done";
}

// -- the API key ----------------------------------------------------------------------------

function readKeyFromHash() {
  // `ttmm ui` opens http://host:port/#key=...: the fragment never reaches the server or its logs.
  const match = /(?:^#|&)key=([^&]*)/.exec(window.location.hash);
  if (!match) return;
  state.key = decodeURIComponent(match[1]);
  sessionStorage.setItem(KEY_STORE, state.key);
  history.replaceState(null, "", window.location.pathname + window.location.search);
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

// -- the bank -------------------------------------------------------------------------------

function formatBytes(n) {
  if (!n) return "–";
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(n < 10 && i ? 1 : 0)} ${units[i]}`;
}

function expertRow(tbody, info, color) {
  const row = make("tr", { "data-expert": info.id }, tbody);
  make("span", { class: "swatch", style: `background:${color}` }, make("td", {}, row));
  make("td", { text: info.id < 0 ? "ft" : String(info.id) }, row);
  make("td", { class: "label", text: info.label || "–" }, row);
  make("td", { class: "num", text: info.n_chunks || "–" }, row);
  make("td", { class: "num", text: info.n_tokens ? info.n_tokens.toLocaleString() : "–" }, row);
  make("td", { class: "num", text: info.rank }, row);
  make("td", { class: "num", text: formatBytes(info.size_bytes) }, row);
  make("td", {}, row).appendChild(sparkline(info.loss_curve));
}

function flatten(value, prefix = "", rows = []) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? `${prefix}.${key}` : key, rows);
  } else {
    rows.push([prefix, Array.isArray(value) ? value.join(", ") : String(value)]);
  }
  return rows;
}

function renderBank(bank) {
  state.bank = bank;
  const K = bank.experts.length;
  const r = bank.routing;
  $("summary").textContent =
    `${K} experts on ${bank.base_model.name} · encoder ${bank.encoder.name} · ` +
    `${bank.map.n_chunks.toLocaleString()} training chunks · default routing ${r.rule}, ` +
    `β=${r.beta}, τ=${r.tau}, at most ${r.max_active} experts`;
  const tbody = $("experts").querySelector("tbody");
  tbody.replaceChildren();
  bank.experts.forEach((info) => expertRow(tbody, info, clusterColor(info.id, K)));
  if (bank.finetune) expertRow(tbody, { ...bank.finetune, id: -1 }, "#444");

  const map = bank.map;
  const [v1, v2] = map.explained_variance.map((v) => (100 * v).toFixed(0));
  $("map-note").textContent = map.source === "chunks"
    ? `(${map.points.length.toLocaleString()} of ${map.n_chunks.toLocaleString()} chunks; axes explain ${v1}% and ${v2}%)`
    : "(this bank has no chunk index: centroids only)";
  state.view = drawMap($("map"), map, bank.experts, showTip);

  const table = $("config");
  table.replaceChildren();
  const config = (bank.build && bank.build.config) || {};
  for (const [key, value] of flatten(config)) {
    const row = make("tr", {}, table);
    make("th", { text: key }, row);
    make("td", { text: value }, row);
  }
  const { config: _, ...rest } = bank.build || {};
  $("build-json").textContent = JSON.stringify({ ...rest, data: bank.data }, null, 2);

  const rule = $("rule");
  rule.replaceChildren(...bank.rules.map((name) => make("option", { value: name, text: name })));
  rule.value = r.rule;
  $("beta").value = r.beta;
  $("tau").value = r.tau;
  $("max-active").value = r.max_active;
  document.querySelector('.column[data-method="finetune"]').hidden = !bank.finetune;
  $("main").hidden = false;
}

function showTip(target, text) {
  const tip = $("tip");
  if (!target) { tip.hidden = true; return; }
  const box = target.getBoundingClientRect(), wrap = tip.parentElement.getBoundingClientRect();
  tip.textContent = text;
  tip.style.left = `${box.left - wrap.left + 12}px`;
  tip.style.top = `${box.top - wrap.top + 12}px`;
  tip.hidden = false;
}

/** Link the `ttmm poc` report of the bank, when the server has one. With an API key the
 * browser cannot send it on a plain link: the page fetches the report and opens a copy. */
function showPocLink(path) {
  const link = $("poc-link");
  link.hidden = !path;
  if (!path) return;
  const anchor = link.firstElementChild;
  anchor.href = path;
  anchor.onclick = async (event) => {
    if (!state.key) return;
    event.preventDefault();
    try {
      const blob = await (await api(path)).blob();
      window.open(URL.createObjectURL(blob), "_blank", "noopener");
    } catch (err) {
      report(err);
    }
  };
}

async function loadBank() {
  try {
    const bank = await getJSON("/v1/ttmm/bank");
    clearError();
    $("key-form").hidden = true;
    renderBank(bank);
    showPocLink(bank.poc_report);
    window.rollout.start({ $, api, getJSON, report, clearError }, bank.rollout);
  } catch (err) {
    report(err);
    $("summary").textContent = "the bank could not be loaded";
  }
}

// -- routing --------------------------------------------------------------------------------

/** The routing controls as a ttmm routing override; throws a readable error if one is bad. */
function routingOverride() {
  const beta = Number($("beta").value), tau = Number($("tau").value);
  const maxActive = Number($("max-active").value);
  if (!(beta > 0)) throw new Error("β must be a positive number");
  if (!(tau >= 0 && tau < 1)) throw new Error("τ must lie in [0, 1)");
  if (!(Number.isInteger(maxActive) && maxActive >= 1)) throw new Error("max active must be a whole number ≥ 1");
  return { rule: $("rule").value, beta, tau, max_active: maxActive };
}

function renderRouting() {
  const K = state.bank.experts.length, plan = state.plan, z = state.similarities;
  const weights = new Map(plan.experts.map((e) => [e.id, e.weight]));
  const n = plan.experts.length;
  $("routing-rule").textContent = `${plan.rule}: ${n} of ${K} experts merged` +
    (plan.fallback === "base" ? " (no expert passed the rule: the base model runs)" : "") +
    (plan.fallback === "nearest" ? " (fallback: the nearest expert)" : "");
  const root = $("routing");
  root.replaceChildren();
  const head = make("div", { class: "route-row head" }, root);
  for (const text of ["", "expert", "similarity z", "", "weight w", ""]) make("span", { text }, head);
  const zmax = Math.max(...z.map(Math.abs), 1e-9);
  const order = [...z.keys()].sort((a, b) => z[b] - z[a]);
  for (const k of order) {
    const w = weights.get(k) || 0, color = clusterColor(k, K);
    const row = make("div", { class: `route-row${w > 0 ? " active" : ""}`, "data-expert": k }, root);
    make("span", { class: "swatch", style: `background:${color}` }, row);
    make("span", { class: "label", text: `${k} · ${state.bank.experts[k].label}` }, row);
    row.appendChild(bar(z[k] / zmax, "#8aa4c8", "sim"));
    make("span", { class: "num", text: z[k].toFixed(3) }, row);
    row.appendChild(bar(w, color, "weight"));
    make("span", { class: "num", text: w.toFixed(3) }, row);
  }
}

async function reroute() {
  if (state.prompt === null) return;
  const seq = ++state.routeSeq;
  const body = { input: state.prompt, ttmm: { routing: routingOverride() } };
  const plan = (await getJSON("/v1/route", body)).ttmm;
  if (seq !== state.routeSeq) return; // a newer request is on its way
  state.plan = plan;
  renderRouting();
  state.view.setQuery(state.point, plan);
}

let rerouteTimer = null;
function scheduleReroute() {
  clearTimeout(rerouteTimer);
  rerouteTimer = setTimeout(() => reroute().then(clearError, report), 200);
}

// -- the playground and scoring -------------------------------------------------------------

async function runPrompt() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) { showError("type a prompt first"); return; }
  const button = $("run");
  button.disabled = true;
  try {
    clearError();
    const routing = routingOverride();
    const maxTokens = Number($("max-tokens").value);
    if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) throw new Error("new tokens must be a whole number ≥ 1");
    const where = await getJSON("/v1/ttmm/locate", { input: prompt });
    state.prompt = prompt;
    state.point = where;
    state.similarities = where.similarities;
    await reroute();
    const common = { prompt, max_tokens: maxTokens, temperature: 0 };
    const jobs = [
      stream("/v1/completions", { ...common, ttmm: { base: true } }, $("out-base")),
      stream("/v1/completions", { ...common, ttmm: { routing } }, $("out-ttmm")),
    ];
    if (state.bank.finetune) jobs.push(stream("/v1/ttmm/finetune/completions", common, $("out-finetune")));
    const failed = (await Promise.allSettled(jobs)).find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
  } catch (err) {
    report(err);
  } finally {
    button.disabled = false;
  }
}

async function scoreText() {
  const text = $("score-text").value;
  if (!text.trim()) { showError("paste a text to score first"); return; }
  const button = $("score-run"), out = $("score-result");
  button.disabled = true;
  try {
    clearError();
    const body = { text, prefix_tokens: Number($("prefix-tokens").value), routing: routingOverride() };
    const result = await getJSON("/v1/ttmm/score", body);
    out.replaceChildren();
    if (!result.methods.length) { showError(result.message); return; }
    const base = result.methods.find((m) => m.method === "base").perplexity;
    const top = Math.max(...result.methods.map((m) => m.perplexity));
    const table = make("table", { class: "scores" }, out);
    const head = make("tr", {}, table);
    for (const text of ["method", "perplexity", "", "vs base"]) make("th", { text }, head);
    for (const m of result.methods) {
      const row = make("tr", { "data-method": m.method }, table);
      make("td", { text: { base: "base model", ttmm: "TTMM", finetune: "fine-tuning" }[m.method] || m.method }, row);
      make("td", { class: "num ppl", text: m.perplexity.toFixed(3) }, row);
      make("td", {}, row).appendChild(bar(m.perplexity / top, m.method === "ttmm" ? "#2ca02c" : "#999"));
      const change = (100 * (m.perplexity - base)) / base;
      make("td", { class: "num", text: m.method === "base" ? "" : `${change >= 0 ? "+" : ""}${change.toFixed(1)}%` }, row);
    }
    const ttmm = result.methods.find((m) => m.method === "ttmm").ttmm;
    const experts = ttmm.experts.map((e) => `${e.id} (${e.weight.toFixed(2)})`).join(", ") || "none: the base model";
    make("p", {
      class: "muted small",
      text: `${result.scored_tokens} tokens scored${result.truncated ? " (text truncated)" : ""}; ` +
        `routed on the first ${result.prefix_tokens} tokens to experts ${experts}: “${result.prefix}”`,
    }, out);
  } catch (err) {
    report(err);
  } finally {
    button.disabled = false;
  }
}

function start() {
  readKeyFromHash();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    loadBank();
  });
  $("run").addEventListener("click", runPrompt);
  $("score-run").addEventListener("click", scoreText);
  for (const id of ["rule", "beta", "tau", "max-active"]) $(id).addEventListener("input", scheduleReroute);
  loadBank();
}

start();
