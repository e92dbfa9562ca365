// faas console: plain JavaScript, no build step, talks only to the server that served it.
// Everything that comes from users or functions is set with textContent, never as HTML.
"use strict";

const TOKEN_KEY = "faas-token";
const LANG_INDENT = { python: "    ", javascript: "  ", typescript: "  " };
const STATUSES = ["ok", "error", "timeout", "oom", "output_limit", "killed", "internal"];

const $ = (id) => document.getElementById(id);
const state = { functions: [], current: null, errorLine: null, callsRoute: false, timer: null, history: {},
  call: null, callStream: null };

/** An element with properties and children; strings become text nodes, never markup. */
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().slice(0, 19).replace("T", " ") : "";
}

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function show(text) { return typeof text === "string" ? text : JSON.stringify(text); }

// ---------------------------------------------------------------------------- API

function headers(extra) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return Object.assign(token ? { Authorization: `Bearer ${token}` } : {}, extra || {});
}

/** One JSON request: {status, body}. A 401 sends the user back to sign in. */
async function api(method, url, body) {
  const options = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}), cache: "no-store" };
  if (body) options.body = JSON.stringify(body);
  const response = await fetch(url, options);
  const text = await response.text();
  let parsed;
  try { parsed = JSON.parse(text); } catch (e) { parsed = text; }
  if (response.status === 401) signIn(sessionStorage.getItem(TOKEN_KEY) ? "That token was refused." : "");
  return { status: response.status, body: parsed };
}

function fnUrl(path) { return "/functions/" + path.split("/").map(encodeURIComponent).join("/"); }

// ---------------------------------------------------------------------------- sign-in

function signIn(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopHealth();
  stopCall();
  for (const id of ["nav", "sign-out", "view-functions", "view-health", "view-calls"]) $(id).hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("token").focus();
}

async function start() {
  const answer = await api("GET", "/functions");
  if (answer.status === 401) return;
  if (answer.status === 403) return signIn(`${show(answer.body.error)}: the console needs the admin token.`);
  if (answer.status !== 200) {
    $("signin").hidden = false;
    $("signin-error").textContent = `The server answered ${answer.status}: ${show(answer.body.error || answer.body)}`;
    return;
  }
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("sign-out").hidden = !sessionStorage.getItem(TOKEN_KEY);
  renderFunctions(answer.body.functions);
  const calls = await api("GET", "/calls");
  state.callsRoute = calls.status !== 404 && calls.status !== 405;
  document.querySelector('[data-view="calls"]').hidden = !state.callsRoute;
  showView("functions");
  if (!state.current) newFunction();
  renderHealth((await api("GET", "/healthz")).body);
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  start();
});

$("sign-out").addEventListener("click", () => signIn("Signed out."));

// ---------------------------------------------------------------------------- views

function showView(name) {
  for (const view of ["functions", "health", "calls"]) {
    $(`view-${view}`).hidden = view !== name;
    document.querySelector(`[data-view="${view}"]`).classList.toggle("active", view === name);
  }
  stopHealth();
  stopCall();
  if (name === "health") startHealth();
  if (name === "calls") loadCalls();
}

for (const button of document.querySelectorAll("#nav button")) {
  button.addEventListener("click", () => showView(button.dataset.view));
}

// ---------------------------------------------------------------------------- functions list

async function loadFunctions() {
  const answer = await api("GET", "/functions");
  if (answer.status === 200) renderFunctions(answer.body.functions);
}

function renderFunctions(functions) {
  state.functions = functions;
  const filter = $("filter").value.trim().toLowerCase();
  const rows = functions.filter((f) => f.path.toLowerCase().includes(filter)).map((f) => el("tr",
    { class: state.current && state.current.path === f.path ? "selected" : "", onclick: () => openFunction(f.path) },
    el("td", { class: "path", text: f.path }), el("td", { text: f.language }),
    el("td", { text: String(f.latest), title: when(f.latest) }), el("td", { text: String(f.versions) }),
    el("td", { text: ago(f.updated), title: when(f.updated) })));
  $("functions").tBodies[0].replaceChildren(...rows);
  $("functions-empty").hidden = functions.length > 0;
}

$("filter").addEventListener("input", () => renderFunctions(state.functions));
$("new-function").addEventListener("click", newFunction);

function newFunction() {
  state.current = null;
  $("path").value = "";
  $("path").readOnly = false;
  setCode(state.functions.length ? "" : 'print("hello")\nreturn {"sum": event.get("a", 0) + event.get("b", 0)}\n');
  $("delete-function").hidden = true;
  $("versions-box").hidden = true;
  $("upload-message").textContent = "";
  $("function-settings").textContent = "";
  renderTargets();
  renderFunctions(state.functions);
  $("path").focus();
}

// ---------------------------------------------------------------------------- one function

async function openFunction(path, version) {
  const query = version ? `?version=${version}` : "";
  const described = await api("GET", fnUrl(path) + query);
  if (described.status !== 200) return message("upload-message", show(described.body.error || described.body), true);
  const f = described.body;
  if (!version) {
    const latest = await api("GET", `${fnUrl(path)}?version=${f.latest}`);
    f.code = latest.body.code;
    f.version = f.latest;
  }
  state.current = f;
  $("path").value = f.path;
  $("language").value = f.versions.find((v) => v.version === f.version).language;
  setCode(f.code);
  $("delete-function").hidden = false;
  message("upload-message", `Showing version ${f.version}${f.version === f.latest ? " (latest)" : ""}.`);
  $("function-settings").textContent = settings(f, FUNCTION_FIELDS);
  renderVersions(f);
  renderTargets();
  renderFunctions(state.functions);
}

const FUNCTION_FIELDS = ["path", "language", "latest", "versions", "updated", "version", "code", "sha256"];
const VERSION_FIELDS = ["version", "language", "size", "sha256", "created"];

/** The fields beyond the known ones (limits, libraries, network, secret names...) as text. */
function settings(version, known = VERSION_FIELDS) {
  known = new Set(known);
  const parts = [];
  for (const [key, value] of Object.entries(version)) {
    if (known.has(key) || value === null || value === undefined || value === false) continue;
    if (Array.isArray(value) && !value.length) continue;
    if (typeof value === "object" && !Array.isArray(value)) {
      const inner = Object.entries(value).map(([k, v]) => `${k}=${show(v)}`).join(", ");
      if (inner) parts.push(`${key}: ${inner}`);
    } else parts.push(`${key}: ${Array.isArray(value) ? value.map(show).join(", ") : show(value)}`);
  }
  return parts.join("; ");
}

function renderVersions(f) {
  const rows = [...f.versions].reverse().map((v) => el("tr", { class: v.version === f.latest ? "latest" : "" },
    el("td", { text: `${v.version}${v.version === f.latest ? " latest" : ""}` }),
    el("td", { text: when(v.created) }), el("td", { text: bytes(v.size) }),
    el("td", { class: "hash", text: v.sha256.slice(0, 12), title: v.sha256 }),
    el("td", { text: settings(v) }),
    el("td", { class: "actions" },
      el("button", { type: "button", text: "Code", onclick: () => openFunction(f.path, v.version) }),
      v.version === f.latest ? null : el("button", { type: "button", text: "Set latest", onclick: () => setLatest(f.path, v.version) }),
      el("button", { type: "button", class: "danger", text: "Delete", onclick: () => deleteVersion(f.path, v.version) }))));
  $("versions").tBodies[0].replaceChildren(...rows);
  $("versions-box").hidden = false;
}

function renderTargets() {
  const options = [];
  if (state.current) {
    options.push(el("option", { value: "latest", text: `latest (${state.current.latest})` }));
    for (const v of [...state.current.versions].reverse()) options.push(el("option", { value: String(v.version), text: `version ${v.version}` }));
  }
  options.push(el("option", { value: "unsaved", text: "the code in the editor (not stored)" }));
  $("target").replaceChildren(...options);
}

async function setLatest(path, version) {
  const answer = await api("PATCH", fnUrl(path), { latest: version });
  if (answer.status !== 200) return message("upload-message", show(answer.body.error), true);
  await loadFunctions();
  await openFunction(path);
  message("upload-message", `Version ${version} is now the latest.`);
}

async function deleteVersion(path, version) {
  if (!confirm(`Delete version ${version} of ${path}?`)) return;
  const answer = await api("DELETE", `${fnUrl(path)}?version=${version}`);
  if (answer.status !== 200) return message("upload-message", show(answer.body.error), true);
  await loadFunctions();
  if (answer.body.latest) await openFunction(path);
  else newFunction();
  message("upload-message", `Deleted version ${version} of ${path}.`);
}

$("delete-function").addEventListener("click", async () => {
  const path = state.current && state.current.path;
  if (!path || !confirm(`Delete ${path} and all its versions?`)) return;
  const answer = await api("DELETE", fnUrl(path));
  if (answer.status !== 200) return message("upload-message", show(answer.body.error), true);
  await loadFunctions();
  newFunction();
  message("upload-message", `Deleted ${path} (${answer.body.deleted} versions).`);
});

function message(id, text, isError) {
  $(id).textContent = text;
  $(id).classList.toggle("error", !!isError);
}

// ---------------------------------------------------------------------------- editor

const code = $("code");

function setCode(text) {
  code.value = text || "";
  state.errorLine = null;
  renderGutter();
}

function renderGutter() {
  const count = code.value.split("\n").length;
  const gutter = $("gutter");
  if (gutter.childElementCount !== count || gutter.dataset.error !== String(state.errorLine)) {
    const lines = [];
    for (let n = 1; n <= count; n++) lines.push(el("div", { class: n === state.errorLine ? "error" : "", text: String(n) }));
    gutter.replaceChildren(...lines);
    gutter.dataset.error = String(state.errorLine);
  }
  gutter.scrollTop = code.scrollTop;
}

function markLine(line) {
  state.errorLine = Number.isInteger(line) ? line : null;
  renderGutter();
}

function replaceSelection(text, start, end) {
  code.setRangeText(text, start, end, "end");
  renderGutter();
}

code.addEventListener("keydown", (event) => {
  const indent = LANG_INDENT[$("language").value] || "    ";
  const { selectionStart: start, selectionEnd: end, value } = code;
  const lineStart = value.lastIndexOf("\n", start - 1) + 1;
  if (event.key === "Tab" && !event.ctrlKey && !event.metaKey && !event.altKey) {
    event.preventDefault();
    if (start === end && !event.shiftKey) return replaceSelection(indent, start, end);
    const block = value.slice(lineStart, end);
    const changed = event.shiftKey
      ? block.split("\n").map((l) => l.replace(new RegExp(`^ {1,${indent.length}}|^\\t`), "")).join("\n")
      : block.split("\n").map((l) => indent + l).join("\n");
    code.setRangeText(changed, lineStart, end, "select");
    renderGutter();
  } else if (event.key === "Enter" && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    const line = value.slice(lineStart, start);
    let lead = line.match(/^[ \t]*/)[0];
    if (/[:{[(]\s*$/.test(line)) lead += indent;
    replaceSelection("\n" + lead, start, end);
  }
});
code.addEventListener("input", () => {
  state.errorLine = null;
  renderGutter();
  if (state.current && code.value !== state.current.code) $("target").value = "unsaved";   // run what is on screen
});
code.addEventListener("scroll", () => { $("gutter").scrollTop = code.scrollTop; });

document.addEventListener("keydown", (event) => {
  if (!(event.ctrlKey || event.metaKey) || $("view-functions").hidden) return;
  if (event.key === "Enter") { event.preventDefault(); run(); }
  else if (event.key === "s" || event.key === "S") { event.preventDefault(); upload(); }
});

// ---------------------------------------------------------------------------- upload

async function upload() {
  const path = $("path").value.trim();
  const body = { path, language: $("language").value, code: code.value };
  message("upload-message", "Uploading…");
  const answer = await api("POST", "/upload", body);
  if (answer.status !== 200) {
    const line = answer.body.line;
    markLine(line);
    return message("upload-message", `${show(answer.body.error || answer.body)}${line ? ` (line ${line})` : ""}`, true);
  }
  await loadFunctions();
  await openFunction(answer.body.path);
  message("upload-message", `Uploaded ${answer.body.path} as version ${answer.body.version}.`);
}
$("upload").addEventListener("click", upload);

// ---------------------------------------------------------------------------- run

function runRequest() {
  const target = $("target").value;
  const request = { stream: true };
  const text = $("input").value.trim();
  if (text) request.input = JSON.parse(text);   // throws on bad JSON: reported by run()
  if (target === "unsaved" || !state.current) {
    return ["/run-now", Object.assign(request, { language: $("language").value, code: code.value })];
  }
  const query = target === "latest" ? "" : `?version=${target}`;
  return ["/run/" + state.current.path.split("/").map(encodeURIComponent).join("/") + query, request];
}

function logLine(log, event) {
  const text = event.type === "string" || event.type === "text" ? String(event.data) : JSON.stringify(event.data);
  log.append(el("span", { class: event.stream === "stderr" ? "stderr" : "" }, text + "\n"));
}

/** A result or error event (or a finished call's record) as facts and a value, all text. */
function resultView(event, httpStatus) {
  const ok = event.event === "result";
  const facts = [`status ${event.status || httpStatus}`];
  if (event.duration_ms !== undefined && event.duration_ms !== null) facts.push(`${event.duration_ms} ms`);
  if (event.memory_peak_bytes) facts.push(`memory ${bytes(event.memory_peak_bytes)}`);
  if (event.cpu_ms !== undefined && event.cpu_ms !== null) facts.push(`CPU ${event.cpu_ms} ms`);
  if (event.version) facts.push(`version ${event.version}`);
  const body = ok ? (event.type === "string" || event.type === "text" ? String(event.data) : JSON.stringify(event.data, null, 2))
    : [event.data || event.error, event.line ? `at line ${event.line}` : "", event.stack || ""].filter(Boolean).join("\n");
  return [el("div", { class: "facts", text: facts.join(" · ") }), el("pre", { class: ok ? "value" : "value error", text: body })];
}

function showResult(event, httpStatus) {
  $("run-result").replaceChildren(...resultView(event, httpStatus));
  if (event.event !== "result" && $("target").value === "unsaved") markLine(event.line);
}

/** Reads an SSE answer to its end, handing each event's parsed data to onEvent. */
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const data = buffered.slice(0, end).split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      buffered = buffered.slice(end + 2);
      if (data) onEvent(JSON.parse(data));
    }
  }
}

async function run() {
  let url, request;
  $("run-log").replaceChildren();
  $("run-result").replaceChildren();
  try { [url, request] = runRequest(); } catch (error) {
    return $("run-result").replaceChildren(el("pre", { class: "value error", text: `The input is not JSON: ${error.message}` }));
  }
  $("run-result").replaceChildren(el("div", { class: "facts", text: "running…" }));
  const response = await fetch(url, { method: "POST", cache: "no-store", body: JSON.stringify(request),
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }) });
  if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
    let body;
    try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
    if (response.status === 401) return signIn("Your token was refused; sign in again.");
    if (body.line && (!state.current || $("target").value === "unsaved")) markLine(body.line);
    return showResult({ event: "error", data: body.error, line: body.line }, response.status);
  }
  await readEvents(response, (event) => {
    if (event.event === "log") logLine($("run-log"), event);
    else showResult(event, response.status);
  });
}
$("run").addEventListener("click", run);

// ---------------------------------------------------------------------------- health

function startHealth() { refreshHealth(); state.timer = setInterval(refreshHealth, 3000); }
function stopHealth() { clearInterval(state.timer); state.timer = null; }

/** Prometheus text → [{name, labels, value}]. */
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]] = l[2].replace(/\\n/g, "\n").replace(/\\(.)/g, "$1");
    }
    samples.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return samples;
}

/** histogram_quantile: linear inside the bucket the quantile falls into. */
function quantile(q, buckets) {
  const sorted = buckets.sort((a, b) => a[0] - b[0]);
  const total = sorted.length ? sorted[sorted.length - 1][1] : 0;
  if (!total) return null;
  let previousBound = 0, previousCount = 0;
  for (const [bound, count] of sorted) {
    if (count >= q * total) {
      if (bound === Infinity) return previousBound;
      return previousBound + (bound - previousBound) * ((q * total - previousCount) / Math.max(count - previousCount, 1));
    }
    previousBound = bound; previousCount = count;
  }
  return previousBound;
}

function ms(seconds) { return seconds === null ? "" : `${(seconds * 1000).toFixed(seconds < 0.1 ? 1 : 0)} ms`; }

function sparkline(values) {
  const canvas = el("canvas", { width: "120", height: "24", class: "spark" });
  const g = canvas.getContext("2d");
  const max = Math.max(1, ...values);
  g.strokeStyle = "#2b6cb0";
  g.lineWidth = 1.5;
  g.beginPath();
  const points = values.length > 1 ? values : [values[0] || 0, values[0] || 0];   // one sample: a level line
  points.forEach((v, i) => {
    const x = (i * 118) / (points.length - 1) + 1;
    const y = 22 - (v / max) * 20;
    if (i) g.lineTo(x, y); else g.moveTo(x, y);
  });
  g.stroke();
  return canvas;
}

async function refreshHealth() {
  const health = await api("GET", "/healthz");
  renderHealth(health.body);
  const response = await fetch("/metrics", { headers: headers(), cache: "no-store" });
  if (!response.ok) return;
  const perFunction = {};
  for (const s of parseMetrics(await response.text())) {
    const f = s.labels.function;
    if (f === undefined) continue;
    const entry = perFunction[f] || (perFunction[f] = { statuses: {}, buckets: [] });
    if (s.name === "faas_calls_total") entry.statuses[s.labels.status] = (entry.statuses[s.labels.status] || 0) + s.value;
    if (s.name === "faas_function_duration_seconds_bucket") entry.buckets.push([s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), s.value]);
  }
  const rows = Object.keys(perFunction).sort().map((name) => {
    const entry = perFunction[name];
    const total = Object.values(entry.statuses).reduce((a, b) => a + b, 0);
    const history = state.history[name] || (state.history[name] = { last: total, points: [] });
    history.points = [...history.points, total - history.last].slice(-30);
    history.last = total;
    const statuses = [...STATUSES, ...Object.keys(entry.statuses).filter((s) => !STATUSES.includes(s))]
      .filter((s) => entry.statuses[s]).map((s) => `${s} ${entry.statuses[s]}`).join(" · ");
    return el("tr", {}, el("td", { class: "path", text: name }), el("td", { text: statuses }),
      el("td", { text: ms(quantile(0.5, [...entry.buckets])) }), el("td", { text: ms(quantile(0.99, [...entry.buckets])) }),
      el("td", {}, sparkline(history.points)));
  });
  $("per-function").tBodies[0].replaceChildren(...rows);
}

function renderHealth(h) {
  if (!h || typeof h !== "object") return;
  const badge = $("health-badge");
  badge.textContent = h.status || "?";
  badge.className = `badge ${h.status === "ok" ? "ok" : "bad"}`;
  const cards = [["status", h.status], ["store", `${h.store} ${h.store_ok ? "ok" : "DOWN"}`], ["limits", h.limits],
    ["runs in flight", `${h.runs_active} of ${h.max_runs}`], ["waiting", h.runs_waiting], ["uptime", `${Math.round(h.uptime_s)} s`]];
  for (const [name, pool] of Object.entries(h.pool || {})) {
    cards.push([`pool ${name}`, typeof pool === "object" ? Object.entries(pool).map(([k, v]) => `${k} ${show(v)}`).join(", ") : show(pool)]);
  }
  $("health").replaceChildren(...cards.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: show(v) }))));
}

// ---------------------------------------------------------------------------- calls (when the server has them)

const CALL_STATUSES = ["queued", "running", ...STATUSES, "cancelled", "expired", "lost"];
$("calls-status").replaceChildren(el("option", { value: "", text: "any status" }),
  ...CALL_STATUSES.map((s) => el("option", { value: s, text: s })));
$("calls-status").addEventListener("change", loadCalls);
$("calls-refresh").addEventListener("click", loadCalls);

/** Recent calls, newest first (GET /calls, admin). */
async function loadCalls() {
  const status = $("calls-status").value;
  const answer = await api("GET", `/calls?limit=100${status ? `&status=${encodeURIComponent(status)}` : ""}`);
  if (answer.status !== 200) return message("calls-message", show(answer.body.error || answer.body), true);
  const calls = answer.body.calls || [];
  message("calls-message", calls.length ? "" : "No calls yet: submit one with POST /run/<path>?async=1.");
  $("calls").tBodies[0].replaceChildren(...calls.map((c) => el("tr",
    { class: c.id === state.call ? "selected" : "", "data-id": c.id, onclick: () => openCall(c.id) },
    el("td", { class: "hash", text: c.id.slice(0, 12), title: c.id }), el("td", { class: "path", text: c.path }),
    el("td", { class: c.status === "ok" || c.status === "queued" || c.status === "running" ? "" : "error", text: c.status }),
    el("td", { text: when(c.created), title: ago(c.created) }))));
}

function stopCall() {
  if (state.callStream) state.callStream.abort();
  state.callStream = null;
}

/** One call: its record's facts, then its printed lines and result from GET /calls/<id>/events
 *  (replayed, then followed while it runs). */
async function openCall(id) {
  stopCall();
  state.call = id;
  for (const row of $("calls").tBodies[0].rows) row.classList.toggle("selected", row.dataset.id === id);
  const url = `/calls/${encodeURIComponent(id)}`;
  $("call-log").replaceChildren();
  $("call-result").replaceChildren();
  const answer = await api("GET", url);
  if (answer.status !== 200) return message("call-head", show(answer.body.error || answer.body), true);
  const r = answer.body;
  const facts = [r.path, `version ${r.version}`, `created ${when(r.created)}`];
  if (r.started) facts.push(`queued ${r.queue_ms} ms`);
  if (r.node) facts.push(`node ${r.node}`, `attempt ${r.attempt}`);
  message("call-head", `${r.id}: ${facts.join(" · ")}`);
  const controller = new AbortController();
  state.callStream = controller;
  try {
    const response = await fetch(url + "/events", { headers: headers({ Accept: "text/event-stream" }), cache: "no-store",
      signal: controller.signal });
    if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      let body;
      try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
      return $("call-result").replaceChildren(...resultView({ event: "error", data: body.error }, response.status));
    }
    await readEvents(response, (event) => {
      if (event.event === "log") logLine($("call-log"), event);
      else if (event.event === "status") $("call-result").replaceChildren(el("div", { class: "facts", text: `status ${event.status}…` }));
      else $("call-result").replaceChildren(...resultView(event, response.status));
    });
  } catch (error) {
    if (error.name === "AbortError") return;
    throw error;
  }
  if (state.callStream === controller) {
    state.callStream = null;
    loadCalls();   // the list shows the status the call ended with
  }
}

start();
