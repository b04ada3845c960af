// The relq console: a client of the admin API (/api), nothing else. No dependencies, no build.
// Every value from the server reaches the page as text (never as HTML).

const TOKEN_KEY = "relq-token";
const main = document.getElementById("main");
const banner = document.getElementById("banner");
let timer = null;
let me = null;
// Bumped by every navigation: a page still loading when the viewer moved on starts no timer.
let generation = 0;

// ---- helpers ---------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// Aborted when the viewer leaves the page (long requests a page started stop with it).
let leaving = new AbortController();

// A GET belongs to the page that made it: leaving the page aborts it, so a slow answer never
// renders over the page the viewer went to.
async function api(method, path, body, signal = method === "GET" ? leaving.signal : undefined) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    if (signal && signal.aborted) throw new ApiError(0, "left the page");
    showBanner("The relq server cannot be reached. Retrying…");
    throw new ApiError(0, "the server cannot be reached");
  }
  hideBanner();
  let text;
  try {
    text = await res.text();
  } catch (e) {
    if (signal && signal.aborted) throw new ApiError(0, "left the page");
    throw new ApiError(0, "the answer was cut off");
  }
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (res.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    location.hash = "#/signin";
    throw new ApiError(401, (data && data.detail) || "sign in");
  }
  if (!res.ok) throw new ApiError(res.status, (data && data.detail) || `${res.status} ${res.statusText}`);
  return data;
}

function showBanner(text) { banner.textContent = text; banner.hidden = false; }
function hideBanner() { banner.hidden = true; }

const enc = encodeURIComponent;

// A time in the viewer's time zone, UTC on hover.
function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  return h("time", { datetime: iso, title: d.toISOString() }, d.toLocaleString());
}

function age(ms) {
  if (ms === null || ms === undefined) return "";
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function payloadText(m) {
  if (m.payload_encoding === "hex") return m.payload.replace(/(..)/g, "$1 ").trim();
  try { return JSON.stringify(JSON.parse(m.payload), null, 2); } catch { return m.payload; }
}

// A date-and-time picker for a UTC filter value kept in the URL.
function timeField(name, label, params) {
  let value = "";
  const v = params.get(name);
  if (v && !isNaN(new Date(v))) {
    const d = new Date(v);
    value = new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
  }
  return h("label", {}, label, h("input", { type: "datetime-local", step: 1, name, value, "aria-label": label }));
}

function notice(text, kind = "") { return h("div", { class: `notice ${kind}`, role: "status" }, text); }

function table(head, rows, numeric = []) {
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("thead", {}, h("tr", {}, head.map((c, i) => h("th", { class: numeric.includes(i) ? "num" : "", scope: "col" }, c)))),
      h("tbody", {}, rows)));
}

function row(cells, numeric = [], attrs = {}) {
  return h("tr", attrs, cells.map((c, i) => h("td", { class: numeric.includes(i) ? "num" : "" }, c)));
}

function setPage(title, ...content) {
  document.title = `${title} · relq`;
  main.replaceChildren(h("h1", {}, title), ...content);
}

async function guarded(button, out, f) {
  button.disabled = true;
  try {
    await f();
  } catch (e) {
    out.replaceChildren(notice(e.message, "error"));
  } finally {
    button.disabled = false;
  }
}

// ---- pages -----------------------------------------------------------------------------------

function signIn() {
  const input = h("input", { type: "password", name: "token", id: "token", autocomplete: "off", required: true, size: 40 });
  const out = h("div");
  const form = h("form", { class: "row", onsubmit: async (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await whoami();
      location.hash = "#/";
    } catch (err) {
      out.replaceChildren(notice(err.status === 401 ? "That token is not valid." : err.message, "error"));
    }
  } },
    h("label", { for: "token" }, "Access token", input),
    h("button", { class: "primary", type: "submit" }, "Sign in"));
  setPage("Sign in", h("p", { class: "muted" }, "The token is kept for this browser tab only."), form, out);
  input.focus();
}

async function whoami() {
  me = await api("GET", "/api/whoami");
  document.body.dataset.role = me.role;
  document.getElementById("who").textContent = `${me.name} (${me.role})`;
  document.getElementById("signout").hidden = !me.authenticated;
  return me;
}

// The overview: every topic, refreshed every 2 seconds, with charts of the rates (from the
// publish and dead-letter counters) and of the backlog while the page is open.
const history = [];
let last = null;

const RATES = [["published", "c-published", "published / s"], ["handled", "c-handled", "handled / s (all groups)"], ["failed", "c-dead", "dead-lettered / s"]];
const LEVELS = [["backlog", "c-backlog", "backlog (pending + unread)"], ["dead", "c-dead", "dead letters stored"]];

function chart(label, series) {
  const canvas = h("canvas", { class: "chart", width: 1200, height: 160, role: "img", "aria-label": label });
  const legend = h("div", { class: "legend muted" }, series.map(([, cls, text]) => h("span", {}, h("i", { class: cls }), text)));
  return { canvas, box: h("div", {}, h("h2", {}, label), canvas, legend), series };
}

// The p99 publish-to-handled latency per topic, from the Prometheus that scrapes the consumers
// (the server asks it; without server.prometheus_url there is nothing to chart).
const PALETTE = ["c-p0", "c-p1", "c-p2", "c-p3", "c-p4", "c-p5"];

function seconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

function latencyChart() {
  const canvas = h("canvas", { class: "chart", width: 1200, height: 160, role: "img", "aria-label": "p99 latency" });
  const legend = h("div", { class: "legend muted", id: "latency-legend" }, "Asking Prometheus…");
  const box = h("div", {}, h("h2", {}, "p99 latency, publish to handled"), canvas, legend);
  const update = async () => {
    let v;
    try {
      v = await api("GET", "/api/latency?minutes=15");
    } catch (e) {
      legend.replaceChildren(notice(e.message, "error"));
      return;
    }
    if (!v.configured) {
      legend.replaceChildren("Set server.prometheus_url to a Prometheus that scrapes your consumers' /metrics to chart it here.");
      return;
    }
    // Series are keyed by their index (topic names may be anything, "__proto__" included).
    const shown = v.series.slice(0, PALETTE.length);
    const series = shown.map((s, i) => [i, PALETTE[i], s.topic]);
    const times = [...new Set(shown.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const at = new Map(times.map((t) => [t, []]));
    shown.forEach((s, i) => { for (const [t, y] of s.points) at.get(t)[i] = y; });
    const points = times.map((t) => at.get(t));
    const more = v.series.length - shown.length;
    legend.replaceChildren(...(series.length
      ? [...series.map(([i, cls, topic]) => {
        const latest = [...points].reverse().find((p) => typeof p[i] === "number");
        return h("span", { title: v.query }, h("i", { class: cls }), `${topic} ${seconds(latest ? latest[i] : null)}`);
      }), more > 0 ? h("span", {}, `+${more} more topics (in Prometheus: ${v.query})`) : ""]
      : [`No consumer has handled a message in the last 15 minutes (asked ${v.source}).`]));
    draw(canvas, series, points, { format: seconds, floor: 0.001 });
  };
  return { box, update };
}

async function overview() {
  const mine = generation;
  const rates = chart("Throughput", RATES);
  const levels = chart("Backlog", LEVELS);
  const latency = latencyChart();
  const body = h("div", {}, h("p", { class: "muted" }, "Loading topics…"));
  setPage("Overview", body, h("div", { class: "cards" }, rates.box, levels.box, latency.box));
  let ticks = 0;
  const refresh = async () => {
    // The latency every 6 seconds (Prometheus scrapes every few seconds at best).
    if (ticks++ % 3 === 0) latency.update();
    const topics = await api("GET", "/api/topics");
    const now = Date.now();
    const user = topics.filter((t) => !t.name.startsWith("_relq"));
    let backlog = 0, dead = 0, published = 0, handledNow = 0;
    const secs = last ? Math.max(0.001, (now - last.at) / 1000) : null;
    const seen = new Map();
    const rows = user.map((t) => {
      const sum = (k) => t.groups.reduce((a, g) => a + g[k], 0);
      const oldest = Math.max(0, ...t.groups.map((g) => g.oldest_pending_age_ms || 0));
      backlog += sum("pending") + sum("lag");
      dead += t.dead_letters;
      published += t.published;
      // What a group still has to do: unread, pending, scheduled, stopped. What it handled in
      // an interval (acknowledged or dead-lettered) is what was published minus what it added.
      const open = Object.fromEntries(t.groups.map((g) => [g.name, g.pending + g.lag + g.scheduled + g.stopped]));
      seen.set(t.name, { published: t.published, open });
      const before = last && last.topics.get(t.name);
      let rate = null, handled = null;
      if (before) {
        rate = Math.max(0, (t.published - before.published) / secs);
        handled = t.groups.reduce((a, g) => g.name in before.open
          ? a + Math.max(0, (t.published - before.published) - (open[g.name] - before.open[g.name])) : a, 0) / secs;
        handledNow += handled;
      }
      return row([
        h("a", { href: `#/topics/${enc(t.name)}` }, t.name),
        t.length, rate === null ? "…" : rate.toFixed(1), handled === null ? "…" : handled.toFixed(1),
        t.groups.length, sum("pending"), sum("lag"), sum("scheduled"), sum("stopped"),
        t.dead_letters ? h("a", { href: `#/topics/${enc(t.name)}/dead-letters` }, String(t.dead_letters)) : "0",
        age(oldest || null),
      ], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], { class: t.dead_letters ? "warn" : "" });
    });
    const point = { at: now, backlog, dead, published: 0, handled: handledNow, failed: 0 };
    if (last) {
      point.published = Math.max(0, published - last.published) / secs;
      point.failed = Math.max(0, dead - last.dead) / secs;
    }
    last = { at: now, published, dead, topics: seen };
    history.push(point);
    if (history.length > 300) history.shift();
    body.replaceChildren(user.length
      ? table(["Topic", "Messages", "Published / s", "Handled / s", "Groups", "Pending", "Lag", "Scheduled", "Stopped", "Dead letters", "Oldest pending"], rows, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
      : h("p", { class: "muted" }, "No topics yet."));
    draw(rates.canvas, RATES, history.slice(1));
    draw(levels.canvas, LEVELS, history);
  };
  await refresh();
  if (mine === generation) timer = setInterval(() => refresh().catch(() => {}), 2000);
}

const COLORS = {
  "c-published": "#2ca02c", "c-dead": "#d62728", "c-backlog": "#1f77b4", "c-handled": "#ff7f0e",
  "c-p0": "#9467bd", "c-p1": "#ff7f0e", "c-p2": "#17becf", "c-p3": "#8c564b", "c-p4": "#e377c2", "c-p5": "#7f7f7f",
};

// Lines of `series` ([key, colour class, label]) through `points`; a missing value breaks a line.
function draw(canvas, series, points, { format = null, floor = 1 } = {}) {
  // Drawn at the size it is shown, in device pixels (sharp text at any width).
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(200, canvas.clientWidth), hgt = 160, pad = 24;
  canvas.width = w * dpr;
  canvas.height = hgt * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, w, hgt);
  if (points.length === 1) points = [points[0], points[0]];
  const known = (v) => typeof v === "number" && isFinite(v);
  const max = Math.max(floor, ...points.flatMap((p) => series.map(([k]) => p[k]).filter(known)));
  ctx.fillStyle = getComputedStyle(document.body).color;
  ctx.font = "12px system-ui";
  ctx.fillText(format ? format(max) : max >= 10 ? String(Math.round(max)) : max.toFixed(1), 4, 14);
  ctx.fillText("0", 4, hgt - 6);
  for (const [key, cls] of series) {
    ctx.strokeStyle = COLORS[cls];
    ctx.lineWidth = 2;
    ctx.beginPath();
    let drawing = false;
    points.forEach((p, i) => {
      if (!known(p[key])) { drawing = false; return; }
      const x = pad + (i / Math.max(1, points.length - 1)) * (w - 2 * pad);
      const y = hgt - pad / 2 - (p[key] / max) * (hgt - pad);
      if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
  }
}

// A topic: groups, consumers, a message browser, cleanup and terminate.
async function topicPage(name) {
  const t = await api("GET", `/api/topics/${enc(name)}`);
  const groups = table(["Group", "Position", "Pending", "Lag", "Scheduled", "Stopped", "Oldest pending", "Consumers"],
    t.groups.map((g) => row([g.name, h("span", { class: "mono" }, g.cursor), g.pending, g.lag, g.scheduled, g.stopped,
      age(g.oldest_pending_age_ms),
      g.consumers.map((c) => h("div", {}, `${c.name}: ${c.pending} pending, idle ${age(c.idle_ms)}`))], [2, 3, 4, 5])), [2, 3, 4, 5]);
  const browser = h("div", { id: "messages" });
  // Groups: create one at a start position, move one, delete one (its name typed again).
  const groupOut = h("div");
  const reload = () => route();
  const groupForm = h("form", { class: "row admin", onsubmit: (e) => {
    e.preventDefault();
    const f = e.target.elements;
    const button = e.submitter || f.act;
    guarded(button, groupOut, async () => {
      const group = f.group.value.trim();
      const position = f.position.value.trim() || "latest";
      const act = button.value;
      if (act === "create") {
        const r = await api("POST", `/api/topics/${enc(name)}/groups`, { name: group, start: position });
        groupOut.replaceChildren(notice(r.created ? `Created group ${group}.` : `Group ${group} exists; unchanged.`, "ok"));
      } else if (act === "move") {
        const r = await api("POST", `/api/topics/${enc(name)}/groups/${enc(group)}/move`, { to: position });
        groupOut.replaceChildren(notice(`Moved group ${group}: lag ${r.before.lag} → ${r.after.lag}.`, "ok"));
      } else {
        await api("DELETE", `/api/topics/${enc(name)}/groups/${enc(group)}?confirm=${enc(f.confirm.value)}`);
        groupOut.replaceChildren(notice(`Deleted group ${group}.`, "ok"));
      }
      setTimeout(reload, 800);
    });
  } },
    h("label", {}, "Group", h("input", { name: "group", size: 14, required: true, "aria-label": "Group name" })),
    h("label", {}, "Position", h("input", { name: "position", size: 16, placeholder: "latest / earliest / id", "aria-label": "Position" })),
    h("button", { type: "submit", name: "act", value: "create" }, "Create"),
    h("button", { type: "submit", name: "act", value: "move" }, "Move"),
    h("label", {}, "Type the group name to delete", h("input", { name: "confirm", size: 14, "aria-label": "Type the group name to delete" })),
    h("button", { type: "submit", name: "act", value: "delete", class: "danger" }, "Delete group"));
  const cleanupOut = h("div");
  const minAge = h("input", { name: "min_age", value: "1h", size: 6, "aria-label": "Minimum age" });
  const preview = h("button", { type: "button", onclick: () => guarded(preview, cleanupOut, async () => {
    const r = await api("POST", `/api/topics/${enc(name)}/cleanup`, { min_age: minAge.value, dry_run: true });
    const run = h("button", { class: "primary", type: "button", onclick: () => guarded(run, cleanupOut, async () => {
      const done = await api("POST", `/api/topics/${enc(name)}/cleanup`, { min_age: minAge.value });
      cleanupOut.replaceChildren(notice(`Removed ${done.removed} messages.`, "ok"));
    }) }, `Remove ${r.removed}`);
    cleanupOut.replaceChildren(notice(`Dry run: ${r.removed} acknowledged messages older than ${minAge.value} would be removed.`), r.removed ? run : "");
  }) }, "Preview cleanup");
  const typed = h("input", { name: "confirm", "aria-label": `Type ${name} to confirm`, placeholder: name });
  const termOut = h("div");
  const term = h("button", { class: "danger", type: "button", disabled: true, onclick: () => guarded(term, termOut, async () => {
    await api("DELETE", `/api/topics/${enc(name)}?confirm=${enc(typed.value)}`);
    location.hash = "#/";
  }) }, "Terminate topic");
  typed.addEventListener("input", () => { term.disabled = typed.value !== name; });
  setPage(`Topic ${name}`,
    h("p", {}, `${t.length} messages · `, h("a", { href: `#/topics/${enc(name)}/dead-letters` }, `${t.dead_letters} dead letters`), ` · ${t.stopped.length} stopped`),
    h("h2", {}, "Groups"), groups, groupForm, groupOut,
    h("h2", {}, "Messages"),
    h("form", { class: "row", onsubmit: async (e) => {
      e.preventDefault();
      const id = e.target.elements.id.value.trim();
      const detail = browser.firstChild;
      try {
        const m = await api("GET", `/api/topics/${enc(name)}/messages/${enc(id)}`);
        await showMessage(name, m, detail, t.stopped);
      } catch (err) {
        detail.replaceChildren(notice(err.message, "error"));
      }
    } }, h("label", {}, "Message id", h("input", { name: "id", size: 24, placeholder: "1700000000000-0", "aria-label": "Message id" })), h("button", { type: "submit" }, "Show")),
    h("form", { class: "row", onsubmit: async (e) => {
      e.preventDefault();
      const filters = {};
      for (const el of e.target.elements) {
        if (!el.name || !el.value) continue;
        filters[el.name] = el.type === "datetime-local" ? new Date(el.value).toISOString().replace(/\.\d+Z$/, "Z") : el.value;
      }
      await messages(name, browser, null, t.stopped, filters).catch((err) => browser.replaceChildren(h("div"), notice(err.message, "error")));
    } },
      h("label", {}, "Type", h("input", { name: "type", size: 12, "aria-label": "Message type" })),
      h("label", {}, "Header", h("input", { name: "header", size: 16, placeholder: "name=value", "aria-label": "Header" })),
      timeField("since", "Published since", new URLSearchParams()), timeField("until", "Published before", new URLSearchParams()),
      h("button", { type: "submit" }, "Find")),
    browser,
    h("section", { class: "admin" },
      h("h2", {}, "Cleanup"), h("div", { class: "row" }, h("label", {}, "Older than", minAge), preview), cleanupOut,
      h("h2", {}, "Terminate"),
      h("p", { class: "muted" }, "Deletes every message, group and dead letter of the topic; its consumers stop."),
      h("div", { class: "row" }, h("label", {}, `Type ${name} to confirm`, typed), term), termOut));
  await messages(name, browser, null, t.stopped);
}

async function messages(topic, box, before, stopped, filters = {}) {
  const q = new URLSearchParams({ order: "newest", limit: "20", ...filters });
  if (before) q.set("before", before);
  const page = await api("GET", `/api/topics/${enc(topic)}/messages?${q}`);
  const detail = h("div");
  const rows = page.items.map((m) => row([
    h("a", { href: "#", class: "mono", onclick: (e) => { e.preventDefault(); showMessage(topic, m, detail, stopped); } }, m.id),
    m.type, when(m.published_at), h("span", { class: "mono" }, payloadText(m).slice(0, 80)),
  ]));
  const older = page.next
    ? h("button", { type: "button", onclick: () => messages(topic, box, page.next, stopped, filters) }, "Older")
    : "";
  const filtering = Object.keys(filters).length > 0;
  box.replaceChildren(detail,
    page.items.length ? table(["Id", "Type", "Published", "Payload"], rows)
      : h("p", { class: "muted" }, filtering && page.next ? "None in this stretch; look further with Older." : filtering ? "No message matches." : "No messages stored."),
    older);
}

async function showMessage(topic, m, box, stopped) {
  const placed = await api("GET", `/api/topics/${enc(topic)}/messages/${enc(m.id)}/groups`);
  const out = h("div");
  const isStopped = stopped.includes(m.id);
  const act = (what) => h("button", { type: "button", class: "admin", onclick: async (e) => guarded(e.target, out, async () => {
    await api("POST", `/api/topics/${enc(topic)}/messages/${enc(m.id)}/${what}`);
    out.replaceChildren(notice(what === "stop" ? `Stopped ${m.id}.` : `Resumed ${m.id}.`, "ok"));
    const at = stopped.indexOf(m.id);
    if (what === "stop" && at < 0) stopped.push(m.id);
    if (what === "resume" && at >= 0) stopped.splice(at, 1);
  }) }, what === "stop" ? "Stop" : "Resume");
  box.replaceChildren(h("div", { class: "card" },
    h("h2", {}, `Message ${m.id}`),
    h("p", {}, `${m.type} · published `, when(m.published_at), isStopped ? " · stopped" : ""),
    h("pre", {}, payloadText(m)),
    Object.keys(m.headers).length ? h("pre", {}, JSON.stringify(m.headers, null, 2)) : "",
    table(["Group", "State"], placed.map((p) => row([p.group, [p.state, p.consumer ? ` by ${p.consumer}` : "", p.deliveries ? ` (${p.deliveries} deliveries)` : "", p.due ? ` due ${new Date(p.due).toLocaleString()}` : ""].join("")]))),
    h("div", { class: "row" }, act("stop"), act("resume")), out));
}

// Dead letters: filter, fingerprint groups with suggestions, a page, replay with a dry run.
async function deadLettersPage(topic) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const field = (name, label, options) => {
    const input = options
      ? h("select", { name, "aria-label": label }, h("option", { value: "" }, "any"), options.map((o) => h("option", { value: o, selected: params.get(name) === o }, o)))
      : h("input", { name, value: params.get(name) || "", size: 12, "aria-label": label });
    return h("label", {}, label, input);
  };
  const form = h("form", { class: "row", onsubmit: (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    for (const el of form.elements) {
      if (!el.name || !el.value) continue;
      // A local date and time from the picker, sent as UTC.
      q.set(el.name, el.type === "datetime-local" ? new Date(el.value).toISOString().replace(/\.\d+Z$/, "Z") : el.value);
    }
    location.hash = `#/topics/${enc(topic)}/dead-letters?${q}`;
  } },
    field("reason", "Reason", ["retryable", "permanent", "panic", "timeout", "no_handler", "delivery_limit", "expired"]),
    field("category", "Category"), field("type", "Type"), field("handler", "Handler"), field("group", "Group"),
    timeField("since", "Failed since", params), timeField("until", "Failed before", params),
    h("button", { type: "submit" }, "Filter"));
  const filter = {};
  for (const k of ["reason", "category", "type", "handler", "group", "since", "until"]) if (params.get(k)) filter[k] = params.get(k);
  const q = new URLSearchParams(filter);
  const page = await api("GET", `/api/topics/${enc(topic)}/dead-letters?${q}&limit=50${params.get("after") ? `&after=${enc(params.get("after"))}` : ""}`);
  // Grouping reads every matching dead letter: the page shows first, the groups when ready.
  const byError = h("div", { "aria-busy": "true" }, h("p", { class: "muted" }, "Grouping the matching dead letters by error…"));
  api("GET", `/api/topics/${enc(topic)}/dead-letters/groups?${q}`, undefined, leaving.signal).then((groups) => {
    byError.replaceChildren(groups.length ? h("div", { class: "cards" }, groups.map((g) => h("div", { class: "card" },
      h("strong", {}, `${g.count} × `), h("span", { class: "mono" }, g.fingerprint),
      h("div", { class: "muted" }, "last ", when(g.last_seen), " · ", Object.keys(g.categories).join(", ") || "no category"),
      g.suggestion ? h("p", {}, g.suggestion.check, h("br"), h("em", {}, `replay: ${g.suggestion.replay.replace("_", " ")}`)) : "")))
      : h("p", { class: "muted" }, "No dead letters match."));
  }, (e) => byError.replaceChildren(notice(e.message, "error"))).finally(() => byError.removeAttribute("aria-busy"));
  const out = h("div");
  const rate = h("input", { name: "rate", type: "number", min: 1, size: 6, placeholder: "all at once", "aria-label": "Rate per second" });
  const dry = h("button", { type: "button", class: "admin", onclick: () => guarded(dry, out, async () => {
    const body = Object.keys(filter).length ? { filter, dry_run: true } : { all: true, dry_run: true };
    const r = await api("POST", `/api/topics/${enc(topic)}/dead-letters/replay`, body);
    const go = h("button", { type: "button", class: "primary", onclick: () => guarded(go, out, async () => {
      const real = Object.keys(filter).length ? { filter } : { all: true };
      if (rate.value) { real.rate = Number(rate.value); real.background = true; }
      const res = await api("POST", `/api/topics/${enc(topic)}/dead-letters/replay`, real);
      if (res.state) await follow(res, out);
      else out.replaceChildren(notice(`Replayed ${res.replayed.length} dead letters.`, "ok"));
    }) }, `Replay ${r.matched}`);
    out.replaceChildren(notice(`Dry run: ${r.matched} dead letters match and would be replayed.`), r.matched ? go : "");
  }) }, "Replay matching… (dry run first)");
  const selected = new Set();
  const selOut = h("div");
  const selCount = h("span", { class: "muted" }, "0 selected");
  const onSelect = (id, on) => {
    if (on) selected.add(id); else selected.delete(id);
    selCount.textContent = `${selected.size} selected`;
    replaySel.disabled = deleteSel.disabled = selected.size === 0;
  };
  const replaySel = h("button", { type: "button", disabled: true, onclick: () => guarded(replaySel, selOut, async () => {
    const r = await api("POST", `/api/topics/${enc(topic)}/dead-letters/replay`, { ids: [...selected] });
    selOut.replaceChildren(notice(`Replayed ${r.replayed.length} of ${selected.size} selected.`, "ok"));
  }) }, "Replay selected");
  const deleteSel = h("button", { type: "button", class: "danger", disabled: true, onclick: () => guarded(deleteSel, selOut, async () => {
    const r = await api("POST", `/api/topics/${enc(topic)}/dead-letters/delete`, { ids: [...selected] });
    selOut.replaceChildren(notice(`Deleted ${r.removed} of ${selected.size} selected.`, "ok"));
  }) }, "Delete selected");
  // Purge by age: a dry run counts first; the real purge is a second click.
  const purgeOut = h("div");
  const olderThan = h("input", { name: "older_than", value: "7d", size: 6, "aria-label": "Purge older than" });
  const purgePreview = h("button", { type: "button", onclick: () => guarded(purgePreview, purgeOut, async () => {
    const age = olderThan.value.trim();
    const r = await api("POST", `/api/topics/${enc(topic)}/dead-letters/purge`, { older_than: age, dry_run: true });
    // The dry run's cutoff: the purge removes what it counted, however long the click takes.
    const go = h("button", { type: "button", class: "danger", onclick: () => guarded(go, purgeOut, async () => {
      const done = await api("POST", `/api/topics/${enc(topic)}/dead-letters/purge`, { before: r.before });
      purgeOut.replaceChildren(notice(`Purged ${done.removed} dead letters.`, "ok"));
      setTimeout(() => route(), 1500);
    }) }, `Purge ${r.removed}`);
    purgeOut.replaceChildren(notice(`Dry run: ${r.removed} dead letters last failed more than ${age} ago and would be deleted (the whole topic, whatever the filter above).`), r.removed ? go : "");
  }) }, "Preview purge");
  const rows = page.items.map((d) => row([
    h("input", { type: "checkbox", class: "admin", "aria-label": `Select ${d.id}`, onchange: (e) => onSelect(d.id, e.target.checked) }),
    h("a", { href: `#/topics/${enc(topic)}/dead-letters/${enc(d.id)}`, class: "mono" }, d.id),
    d.handler === d.message.type ? d.message.type : `${d.message.type} (${d.handler})`, d.group, d.reason, d.category || "", h("span", {}, d.error_chain[0] || ""), d.attempts, when(d.last_failed_at),
  ], [7]));
  const next = page.next
    ? h("a", { href: `#/topics/${enc(topic)}/dead-letters?${new URLSearchParams({ ...filter, after: page.next })}` }, "Next page")
    : "";
  setPage(`Dead letters of ${topic}`,
    h("p", {}, h("a", { href: `#/topics/${enc(topic)}` }, `← topic ${topic}`)), form,
    h("h2", {}, "By error"), byError,
    h("div", { class: "row admin" }, h("label", {}, "Rate per second", rate), dry), out,
    h("div", { class: "row" }, h("button", { type: "button", onclick: (e) => guarded(e.target, out, () => exportDeadLetters(topic, filter, out)) }, "Export matching (JSON lines)")),
    h("h2", {}, "Dead letters"),
    h("div", { class: "row admin" }, selCount, replaySel, deleteSel), selOut,
    page.items.length ? table(["", "Id", "Type", "Group", "Reason", "Category", "Error", "Attempts", "Last failed"], rows, [7]) : h("p", { class: "muted" }, "None."),
    next,
    h("section", { class: "admin" }, h("h2", {}, "Purge"),
      h("div", { class: "row" }, h("label", {}, "Last failed more than", olderThan, "ago"), purgePreview), purgeOut));
}

// Every matching dead letter, page by page, saved as a JSON-lines file.
async function exportDeadLetters(topic, filter, out) {
  const lines = [];
  let after = null;
  const bar = h("progress");
  out.replaceChildren(h("div", { class: "row" }, bar, " exporting…"));
  for (;;) {
    const q = new URLSearchParams({ ...filter, limit: "1000" });
    if (after) q.set("after", after);
    const page = await api("GET", `/api/topics/${enc(topic)}/dead-letters?${q}`);
    for (const d of page.items) lines.push(JSON.stringify(d));
    if (!page.next) break;
    after = page.next;
  }
  const url = URL.createObjectURL(new Blob([lines.join("\n") + (lines.length ? "\n" : "")], { type: "application/x-ndjson" }));
  const link = h("a", { href: url, download: `${topic}-dead-letters.jsonl` }, `Download ${lines.length} dead letters`);
  out.replaceChildren(notice(`Exported ${lines.length} dead letters. `), link);
  link.click();
}

// Follows a background replay job until it ends, with a progress bar.
async function follow(job, out) {
  const bar = h("progress", { max: Math.max(1, job.total), value: job.done });
  const text = h("span");
  out.replaceChildren(h("div", { class: "row" }, bar, text));
  for (;;) {
    bar.max = Math.max(1, job.total);
    bar.value = job.done;
    text.textContent = ` ${job.done} / ${job.total} (${job.state})`;
    if (job.state !== "running") break;
    await new Promise((r) => setTimeout(r, 500));
    job = await api("GET", `/api/jobs/${enc(job.id)}`);
  }
  out.append(notice(job.state === "done" ? `Replayed ${job.done} dead letters.` : `Job ${job.state}: ${job.error || ""}`, job.state === "done" ? "ok" : "error"));
}

async function deadLetterPage(topic, id) {
  const d = await api("GET", `/api/topics/${enc(topic)}/dead-letters/${enc(id)}`);
  const out = h("div");
  // The stored payload exactly (text, or hex digits): replaying it unedited changes no byte.
  const editor = h("textarea", { name: "payload", "aria-label": "Payload to replay" }, d.message.payload);
  const encoding = d.message.payload_encoding;
  const replay = h("button", { type: "button", class: "primary", onclick: () => guarded(replay, out, async () => {
    const r = await api("POST", `/api/topics/${enc(topic)}/dead-letters/replay`, { ids: [id] });
    out.replaceChildren(notice(r.replayed.length ? `Replayed as ${r.replayed[0].message}.` : "It was replayed or deleted meanwhile.", "ok"));
  }) }, "Replay");
  const edited = h("button", { type: "button", onclick: () => guarded(edited, out, async () => {
    const r = await api("POST", `/api/topics/${enc(topic)}/dead-letters/${enc(id)}/replay`, { payload: editor.value, payload_encoding: encoding });
    out.replaceChildren(notice(`Replayed with the edited payload as ${r.id}.`, "ok"));
  }) }, "Replay edited payload");
  const del = h("button", { type: "button", class: "danger", onclick: () => guarded(del, out, async () => {
    const r = await api("POST", `/api/topics/${enc(topic)}/dead-letters/delete`, { ids: [id] });
    out.replaceChildren(notice(r.removed ? "Deleted." : "It was replayed or deleted meanwhile.", "ok"));
  }) }, "Delete");
  setPage(`Dead letter ${id}`,
    h("p", {}, h("a", { href: `#/topics/${enc(topic)}/dead-letters` }, `← dead letters of ${topic}`)),
    h("p", {}, `${d.message.type} · group ${d.group} · handler ${d.handler} · reason ${d.reason}${d.category ? ` · category ${d.category}` : ""} · ${d.attempts} attempts`),
    d.suggestion ? h("div", { class: "notice" }, h("strong", {}, "Suggestion: "), d.suggestion.check, ` (replay: ${d.suggestion.replay.replace("_", " ")})`) : "",
    h("h2", {}, "Error"), h("pre", {}, d.error_chain.join("\ncaused by: ")),
    d.backtrace ? [h("h2", {}, "Backtrace"), h("pre", {}, d.backtrace)] : "",
    h("h2", {}, "Attempts"),
    h("ol", { class: "timeline" }, d.failures.map((f) => h("li", {}, h("strong", {}, `#${f.attempt} ${f.kind}`), " ", when(f.at), ` on ${f.consumer}: `, f.error))),
    h("h2", {}, "Message"), h("p", { class: "muted mono" }, `${d.message.id} · published `, when(d.message.published_at)),
    h("pre", {}, payloadText(d.message)),
    h("div", { class: "admin" }, h("label", {}, `Payload (${encoding}; edit it to replay a corrected message)`, editor),
      h("div", { class: "row" }, replay, edited, del), out));
}

async function auditPage() {
  const before = new URLSearchParams(location.hash.split("?")[1] || "").get("before");
  const page = await api("GET", `/api/audit?limit=50${before ? `&before=${enc(before)}` : ""}`);
  const rows = page.items.map((e) => row([when(e.at), e.actor, e.action, e.topic, h("span", { class: "mono" }, JSON.stringify(e.params)), e.status, e.outcome], [5], { class: e.status >= 400 ? "warn" : "" }));
  setPage("Audit log",
    page.items.length ? table(["When", "Who", "Action", "Topic", "Parameters", "Status", "Result"], rows, [5]) : h("p", { class: "muted" }, "No operator actions yet."),
    page.next ? h("a", { href: `#/audit?before=${enc(page.next)}` }, "Older") : "");
}

// ---- routing ---------------------------------------------------------------------------------

async function route() {
  clearInterval(timer);
  timer = null;
  leaving.abort();
  leaving = new AbortController();
  const mine = ++generation;
  const at = location.hash;
  delete main.dataset.ready;
  const hash = location.hash.replace(/^#/, "") || "/";
  const path = hash.split("?")[0];
  try {
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    if (parts[0] === "signin") return signIn();
    if (!me) await whoami();
    if (parts.length === 0) await overview();
    else if (parts[0] === "audit") await auditPage();
    else if (parts[0] === "topics" && parts.length === 2) await topicPage(parts[1]);
    else if (parts[0] === "topics" && parts[2] === "dead-letters" && parts.length === 3) await deadLettersPage(parts[1]);
    else if (parts[0] === "topics" && parts[2] === "dead-letters" && parts.length === 4) await deadLetterPage(parts[1], parts[3]);
    else setPage("Not found", h("p", {}, "No such page. ", h("a", { href: "#/" }, "Overview")));
  } catch (e) {
    if (e.status === 401 || mine !== generation) return;
    setPage("Error", notice(e.message, "error"), h("p", {}, h("a", { href: "#/" }, "Overview")));
  }
  // The viewer went elsewhere while this page loaded: that page's route owns the screen.
  if (mine !== generation) return;
  main.focus({ preventScroll: true });
  // Which address the page shows is rendered for (tests wait for it after navigating).
  main.dataset.ready = at;
}

document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  document.body.dataset.role = "";
  location.hash = "#/signin";
});
window.addEventListener("hashchange", route);
route();
