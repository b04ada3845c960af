// End-to-end tests of the relq web console: a real `relq serve` on a loopback port over a data
// directory the demo filled, driven in Debian's headless Chromium by playwright-core.
//
//   npm ci --prefix e2e && node --test e2e/console.test.mjs
//
// RELQ_BIN: the relq binary (default target/debug/relq). RELQ_SCREENSHOTS: a directory to
// save the main pages' screenshots in (the README's come from `RELQ_SCREENSHOTS=docs/console`).
// Without Chromium the tests fail when RELQ_REQUIRE_CHROMIUM=1 (CI), and say so loudly otherwise.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, existsSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const relq = process.env.RELQ_BIN || join(root, "target/debug/relq");
const CHROMIUM = "/usr/bin/chromium";
const ADMIN = "console-admin-token-0123456789";
const READER = "console-reader-token-0123456789";
const shots = process.env.RELQ_SCREENSHOTS ? resolve(root, process.env.RELQ_SCREENSHOTS) : null;

const PROMETHEUS = "/usr/bin/prometheus";

let server, base, browser, data, topic, big, consumer, prometheus;

function missing(what, env = "RELQ_REQUIRE_CHROMIUM") {
  const text = `MISSING: ${what}; the console end-to-end tests cannot run`;
  if (process.env[env] === "1") throw new Error(text);
  console.error(`\n*** ${text} ***\n`);
  return true;
}

const skip = !existsSync(CHROMIUM) && missing(`${CHROMIUM} (apt-get install chromium)`);
const noPrometheus = !skip && !existsSync(PROMETHEUS) && missing(`${PROMETHEUS} (apt-get install prometheus): the latency chart test`, "RELQ_REQUIRE_PROMETHEUS");

// A free loopback port (for Prometheus, which cannot report the one it picked).
async function freePort() {
  const { createServer } = await import("node:net");
  const srv = createServer();
  await new Promise((ok) => srv.listen(0, "127.0.0.1", ok));
  const { port } = srv.address();
  await new Promise((ok) => srv.close(ok));
  return port;
}

// The first line of `stream` that `pick` maps to a value.
function firstLine(stream, pick, what) {
  const lines = createInterface({ input: stream });
  return new Promise((ok, fail) => {
    const t = setTimeout(() => fail(new Error(`${what} did not start`)), 20000);
    lines.on("line", (l) => {
      const v = pick(l);
      if (v) { clearTimeout(t); ok(v); }
    });
  });
}

before(async () => {
  if (skip) return;
  assert.ok(existsSync(relq), `no relq binary at ${relq}: cargo build --bin relq (or set RELQ_BIN)`);
  data = mkdtempSync(join(tmpdir(), "relq-console-"));
  const url = `file://${join(data, "relq-data")}`;
  const demo = (...args) => JSON.parse(execFileSync(relq, ["--url", url, "demo", "--json", ...args], { stdio: ["ignore", "pipe", "ignore"] }).toString()).topic;
  topic = demo("--messages", "1500");
  // A topic with 100,000 dead letters: every attempt fails.
  big = demo("--messages", "100000", "--fail-rate", "1", "--concurrency", "256");
  assert.ok(topic && big, "the demos made their topics");
  const promPort = noPrometheus ? null : await freePort();
  const config = join(data, "relq.toml");
  writeFileSync(config, [
    "[backend]", `url = "${url}"`, "",
    "[server]", 'bind = "127.0.0.1:0"', promPort ? `prometheus_url = "http://127.0.0.1:${promPort}"` : "", "",
    "[[server.tokens]]", 'name = "ops"', `token = "${ADMIN}"`, 'role = "admin"', "",
    "[[server.tokens]]", 'name = "viewer"', `token = "${READER}"`, 'role = "read"', "",
  ].join("\n"));
  server = spawn(relq, ["--config", config, "--json", "serve"], { stdio: ["ignore", "pipe", "inherit"] });
  base = (await firstLine(server.stdout, (l) => {
    try { return JSON.parse(l).listening; } catch { return null; /* a log line */ }
  }, "relq serve")).replace(/\/$/, "");
  if (promPort) {
    // A consumer exporting its latency histogram, scraped every second by a real Prometheus
    // that `relq serve` asks for the latency chart.
    consumer = spawn(relq, ["--url", url, "consume", topic, "--group", "live", "--idle", "1h", "--metrics", "127.0.0.1:0"],
      { stdio: ["ignore", "ignore", "pipe"] });
    const metrics = await firstLine(consumer.stderr, (l) => (l.match(/metrics at http:\/\/(\S+)\/metrics/) || [])[1], "relq consume --metrics");
    writeFileSync(join(data, "prometheus.yml"), [
      "global:", "  scrape_interval: 1s", "scrape_configs:", "  - job_name: consumers",
      "    static_configs:", `      - targets: ["${metrics}"]`, "",
    ].join("\n"));
    prometheus = spawn(PROMETHEUS, [`--config.file=${join(data, "prometheus.yml")}`, `--storage.tsdb.path=${join(data, "prom")}`,
      `--web.listen-address=127.0.0.1:${promPort}`], { stdio: ["ignore", "ignore", "ignore"] });
  }
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    // playwright gives every launch a fresh temporary --user-data-dir of its own.
  });
});

// Stops a child process and waits for it to be gone (Prometheus writes its data on the way out).
async function stop(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((ok) => child.once("exit", ok));
  child.kill("SIGTERM");
  await gone;
}

after(async () => {
  await browser?.close();
  await stop(prometheus);
  await stop(consumer);
  await stop(server);
  if (data) rmSync(data, { recursive: true, force: true });
});

async function page(token, width = 1280, colorScheme = "light") {
  const context = await browser.newContext({ viewport: { width, height: 900 }, colorScheme });
  const p = await context.newPage();
  const errors = [];
  p.on("pageerror", (e) => errors.push(e.message));
  p.on("requestfailed", (r) => { if (!r.url().startsWith(base)) errors.push(`left the server: ${r.url()}`); });
  await p.goto(`${base}/`);
  await p.getByLabel("Access token").fill(token);
  await p.getByRole("button", { name: "Sign in" }).click();
  await p.getByRole("heading", { name: "Overview" }).waitFor();
  return { p, errors };
}

// Waits until the page has rendered the address it is at (after a navigation or a form).
async function ready(p) {
  await p.waitForFunction(() => {
    const m = document.getElementById("main");
    return m && m.dataset.ready === location.hash;
  });
}

async function shot(p, name) {
  if (!shots) return;
  mkdirSync(shots, { recursive: true });
  await p.screenshot({ path: join(shots, `${name}.png`), fullPage: false });
}

async function audit() {
  const res = await fetch(`${base}/api/audit?limit=200`, { headers: { Authorization: `Bearer ${READER}` } });
  return (await res.json()).items;
}

test("sign in, the overview lists the topics, a wrong token is refused", { skip }, async () => {
  const context = await browser.newContext();
  const p = await context.newPage();
  await p.goto(`${base}/`);
  await p.getByLabel("Access token").fill("not-a-token-at-all-000");
  await p.getByRole("button", { name: "Sign in" }).click();
  await p.getByText("That token is not valid.").waitFor();
  await context.close();
  const { p: q, errors } = await page(ADMIN);
  const link = q.getByRole("link", { name: topic });
  await link.waitFor();
  const cells = await q.locator("tbody tr").filter({ has: link }).locator("td").allTextContents();
  assert.equal(cells[0], topic);
  assert.ok(Number(cells[9]) > 0, `dead letters shown: ${cells}`);
  // Messages published while the page is open show as a publish rate.
  for (let i = 0; i < 20; i++) {
    const r = await fetch(`${base}/api/topics/${topic}/messages`, {
      method: "POST",
      headers: { Authorization: `Bearer ${ADMIN}`, "Content-Type": "application/json" },
      body: JSON.stringify({ type: "order", payload: JSON.stringify({ n: i }) }),
    });
    assert.equal(r.status, 200);
  }
  // The table is redrawn every 2 seconds: read the cell afresh each time.
  const rate = () => q.locator("tbody tr").filter({ has: link }).locator("td").nth(2).textContent();
  const until = Date.now() + 15000;
  while (!(Number(await rate()) > 0)) {
    assert.ok(Date.now() < until, `no publish rate shown: ${await rate()}`);
    await q.waitForTimeout(200);
  }
  assert.deepEqual(errors, []);
});

async function publish(t, n) {
  for (let i = 0; i < n; i++) {
    const r = await fetch(`${base}/api/topics/${t}/messages`, {
      method: "POST",
      headers: { Authorization: `Bearer ${ADMIN}`, "Content-Type": "application/json" },
      body: JSON.stringify({ type: "order", payload: JSON.stringify({ live: i }) }),
    });
    assert.equal(r.status, 200);
  }
}

test("the overview charts the p99 latency a real Prometheus reports", { skip: skip || noPrometheus }, async () => {
  const { p, errors } = await page(ADMIN);
  const legend = p.locator("#latency-legend");
  // Messages handled while Prometheus scrapes the consumer: its histogram grows and the rate
  // over the last minute has a p99. Scraped every second, asked every 6 s: allow a minute.
  const until = Date.now() + 60000;
  let text = "";
  for (;;) {
    await publish(topic, 10);
    text = await legend.textContent();
    if (new RegExp(`${topic} \\d+(\\.\\d+)? (ms|s)`).test(text)) break;
    assert.ok(Date.now() < until, `no latency charted: ${text}`);
    await p.waitForTimeout(500);
  }
  // The consumer's group handles what is published: the topic's handled rate shows it.
  const handled = () => p.locator("tbody tr").filter({ has: p.getByRole("link", { name: topic }) }).locator("td").nth(3).textContent();
  const by = Date.now() + 30000;
  while (!(Number(await handled()) > 0)) {
    assert.ok(Date.now() < by, `no handled rate shown: ${await handled()}`);
    await publish(topic, 10);
    await p.waitForTimeout(500);
  }
  const v = await (await fetch(`${base}/api/latency?minutes=5`, { headers: { Authorization: `Bearer ${READER}` } })).json();
  const s = v.series.find((x) => x.topic === topic);
  assert.ok(v.configured && s && s.points.some(([, y]) => y > 0), JSON.stringify(v));
  if (shots) await p.waitForTimeout(4500); // a few more samples on the charts
  await shot(p, "overview");
  assert.deepEqual(errors, []);
});

test("dead letters: filter by category, open one, replay a filtered set after a dry run", { skip }, async () => {
  const { p, errors } = await page(ADMIN);
  await p.goto(`${base}/#/topics/${topic}/dead-letters`);
  await p.getByRole("heading", { name: `Dead letters of ${topic}` }).waitFor();
  // A category the demo's random failures produced (not validation: other tests use those).
  const stats = await (await fetch(`${base}/api/topics/${topic}/dead-letters/stats`, { headers: { Authorization: `Bearer ${READER}` } })).json();
  const category = Object.keys(stats.by_category).find((c) => c !== "validation" && stats.by_category[c] > 0);
  assert.ok(category, `a retryable category among the demo's dead letters: ${JSON.stringify(stats.by_category)}`);
  await p.getByLabel("Category", { exact: true }).fill(category);
  await p.getByRole("button", { name: "Filter" }).click();
  await p.waitForURL(new RegExp(`category=${category}`));
  await ready(p);
  const rows = p.locator("tbody tr");
  await rows.first().waitFor();
  for (const cat of await rows.locator("td:nth-child(6)").allTextContents()) assert.equal(cat, category);
  const count = await rows.count();
  await shot(p, "dead-letters");

  // One dead letter in full.
  const first = (await rows.first().getByRole("link").textContent()).trim();
  await rows.first().getByRole("link").click();
  await p.getByRole("heading", { name: `Dead letter ${first}` }).waitFor();
  await p.getByRole("heading", { name: "Attempts" }).waitFor();
  assert.ok(await p.locator(".timeline li").count() >= 1);
  await shot(p, "dead-letter");
  await p.goBack();
  await ready(p);

  // Replay the filtered set: a dry run first, then for real.
  await p.getByRole("button", { name: /dry run first/ }).click();
  await p.getByText(`Dry run: ${count} dead letters match`).waitFor();
  await p.getByRole("button", { name: `Replay ${count}` }).click();
  await p.getByText(`Replayed ${count} dead letters.`).waitFor();
  const entries = await audit();
  assert.ok(entries.some((e) => e.action === "replay" && e.actor === "ops"), "the replay is audited");
  assert.deepEqual(errors, []);
});

test("edit a dead letter's payload and replay it", { skip }, async () => {
  const { p, errors } = await page(ADMIN);
  await p.goto(`${base}/#/topics/${topic}/dead-letters?category=validation`);
  await ready(p);
  const link = p.locator("tbody tr").first().getByRole("link");
  await link.waitFor();
  const id = (await link.textContent()).trim();
  await link.click();
  const editor = p.getByLabel("Payload to replay");
  const stored = await (await fetch(`${base}/api/topics/${topic}/dead-letters/${id}`, { headers: { Authorization: `Bearer ${READER}` } })).json();
  assert.equal(await editor.inputValue(), stored.message.payload, "the editor holds the stored payload byte for byte");
  await editor.fill('{"fixed": true}');
  await p.getByRole("button", { name: "Replay edited payload" }).click();
  const done = p.getByText(/Replayed with the edited payload as /);
  await done.waitFor();
  const newId = (await done.textContent()).match(/as (\S+)\.$/)[1];
  const res = await fetch(`${base}/api/topics/${topic}/messages/${newId}`, { headers: { Authorization: `Bearer ${READER}` } });
  const m = await res.json();
  assert.equal(m.payload, '{"fixed": true}');
  assert.equal(m.headers["relq-edited"], "true");
  assert.equal(m.headers["relq-replay-of"], id);
  const gone = await fetch(`${base}/api/topics/${topic}/dead-letters/${id}`, { headers: { Authorization: `Bearer ${READER}` } });
  assert.equal(gone.status, 404, "the edited dead letter is gone");
  assert.ok((await audit()).some((e) => e.action === "dead_letter.replay_edited" && e.params.id === id));
  assert.deepEqual(errors, []);
});

test("dead letters: a time range, and delete a selection", { skip }, async () => {
  const { p, errors } = await page(ADMIN);
  await p.goto(`${base}/#/topics/${topic}/dead-letters?since=2099-01-01T00:00:00Z`);
  await p.getByText("No dead letters match.").waitFor();
  assert.notEqual(await p.getByLabel("Failed since").inputValue(), "");
  await p.goto(`${base}/#/topics/${topic}/dead-letters?category=validation`);
  await ready(p);
  const boxes = p.locator("tbody tr input[type=checkbox]");
  await boxes.nth(1).waitFor();
  const ids = [];
  for (const i of [0, 1]) {
    ids.push((await p.locator("tbody tr").nth(i).getByRole("link").textContent()).trim());
    await boxes.nth(i).check();
  }
  await p.getByText("2 selected").waitFor();
  await p.getByRole("button", { name: "Delete selected" }).click();
  await p.getByText("Deleted 2 of 2 selected.").waitFor();
  for (const id of ids) {
    const r = await fetch(`${base}/api/topics/${topic}/dead-letters/${id}`, { headers: { Authorization: `Bearer ${READER}` } });
    assert.equal(r.status, 404, `${id} deleted`);
  }
  assert.deepEqual(errors, []);
});

test("stop and resume a message from the topic page", { skip }, async () => {
  const { p, errors } = await page(ADMIN);
  await p.goto(`${base}/#/topics/${topic}`);
  await p.getByRole("heading", { name: "Groups" }).waitFor();
  const link = p.locator("tbody tr a.mono").first();
  await link.waitFor();
  const id = (await link.textContent()).trim();
  await link.click();
  await p.getByRole("heading", { name: `Message ${id}` }).waitFor();
  await shot(p, "topic");
  await p.getByRole("button", { name: "Stop", exact: true }).click();
  await p.getByText(`Stopped ${id}.`).waitFor();
  let t = await (await fetch(`${base}/api/topics/${topic}`, { headers: { Authorization: `Bearer ${READER}` } })).json();
  assert.ok(t.stopped.includes(id));
  await p.getByRole("button", { name: "Resume", exact: true }).click();
  await p.getByText(`Resumed ${id}.`).waitFor();
  t = await (await fetch(`${base}/api/topics/${topic}`, { headers: { Authorization: `Bearer ${READER}` } })).json();
  assert.ok(!t.stopped.includes(id));
  assert.deepEqual(errors, []);
});

test("find messages by type on the topic page; export dead letters as JSON lines", { skip }, async () => {
  const { p, errors } = await page(ADMIN);
  await p.goto(`${base}/#/topics/${topic}`);
  await p.getByRole("heading", { name: "Groups" }).waitFor();
  await p.getByLabel("Message type").fill("email");
  await p.getByRole("button", { name: "Find" }).click();
  await p.waitForFunction(() => {
    const types = [...document.querySelectorAll("#messages tbody tr td:nth-child(2)")].map((td) => td.textContent);
    return types.length > 0 && types.every((t) => t === "email");
  });
  await p.goto(`${base}/#/topics/${topic}/dead-letters?category=validation`);
  await ready(p);
  const want = await (await fetch(`${base}/api/topics/${topic}/dead-letters/stats`, { headers: { Authorization: `Bearer ${READER}` } })).json();
  const [download] = await Promise.all([
    p.waitForEvent("download"),
    p.getByRole("button", { name: "Export matching (JSON lines)" }).click(),
  ]);
  const { readFileSync } = await import("node:fs");
  const lines = readFileSync(await download.path(), "utf8").trim().split("\n").map((l) => JSON.parse(l));
  assert.ok(lines.length > 0 && lines.every((d) => d.category === "validation"), `${lines.length} lines`);
  assert.equal(lines.length, want.by_category.validation, JSON.stringify(want));
  assert.deepEqual(errors, []);
});

test("create, move and delete a group from the topic page", { skip }, async () => {
  const { p, errors } = await page(ADMIN);
  await p.goto(`${base}/#/topics/${topic}`);
  await ready(p);
  const groups = async () => (await (await fetch(`${base}/api/topics/${topic}/groups`, { headers: { Authorization: `Bearer ${READER}` } })).json());
  await p.getByLabel("Group name", { exact: true }).fill("audit");
  await p.getByLabel("Position", { exact: true }).fill("earliest");
  await p.getByRole("button", { name: "Create", exact: true }).click();
  await p.getByText("Created group audit.").waitFor();
  let g = (await groups()).find((x) => x.name === "audit");
  assert.ok(g && g.lag > 0, JSON.stringify(g));
  await p.getByLabel("Position", { exact: true }).fill("latest");
  await p.getByRole("button", { name: "Move", exact: true }).click();
  await p.getByText(/Moved group audit: lag \d+ → 0\./).waitFor();
  g = (await groups()).find((x) => x.name === "audit");
  assert.equal(g.lag, 0);
  await p.getByLabel("Type the group name to delete").fill("audi");
  await p.getByRole("button", { name: "Delete group" }).click();
  await p.getByText(/repeat its name/).waitFor();
  assert.ok((await groups()).some((x) => x.name === "audit"), "a wrong name deletes nothing");
  await p.getByLabel("Type the group name to delete").fill("audit");
  await p.getByRole("button", { name: "Delete group" }).click();
  await p.getByText("Deleted group audit.").waitFor();
  assert.ok(!(await groups()).some((x) => x.name === "audit"));
  assert.deepEqual(errors, []);
});

test("a read-only token sees no controls and the API refuses it anyway", { skip }, async () => {
  const { p, errors } = await page(READER);
  await p.goto(`${base}/#/topics/${topic}`);
  await p.getByRole("heading", { name: "Groups" }).waitFor();
  assert.equal(await p.getByRole("button", { name: "Terminate topic" }).isVisible(), false);
  assert.equal(await p.getByRole("button", { name: "Preview cleanup" }).isVisible(), false);
  const status = await p.evaluate(async (t) => {
    const r = await fetch(`/api/topics/${t}/cleanup`, { method: "POST", headers: { Authorization: `Bearer ${"console-reader-token-0123456789"}`, "Content-Type": "application/json" }, body: "{}" });
    return r.status;
  }, topic);
  assert.equal(status, 403);
  assert.deepEqual(errors, []);
});

test("terminate a topic after typing its name; the audit page lists the actions", { skip }, async () => {
  const other = `console-${Date.now()}`;
  await fetch(`${base}/api/topics/${other}/messages`, {
    method: "POST",
    headers: { Authorization: `Bearer ${ADMIN}`, "Content-Type": "application/json" },
    body: JSON.stringify({ type: "job", payload: "{}" }),
  });
  const { p, errors } = await page(ADMIN);
  await p.goto(`${base}/#/topics/${other}`);
  const term = p.getByRole("button", { name: "Terminate topic" });
  await term.waitFor();
  assert.equal(await term.isDisabled(), true);
  await p.getByLabel(`Type ${other} to confirm`).fill(other.slice(0, -1));
  assert.equal(await term.isDisabled(), true, "a wrong name does not enable it");
  await p.getByLabel(`Type ${other} to confirm`).fill(other);
  await term.click();
  await p.getByRole("heading", { name: "Overview" }).waitFor();
  const gone = await fetch(`${base}/api/topics/${other}`, { headers: { Authorization: `Bearer ${READER}` } });
  assert.equal(gone.status, 404);

  await p.goto(`${base}/#/audit`);
  await p.getByRole("heading", { name: "Audit log" }).waitFor();
  const actions = await p.locator("tbody tr td:nth-child(3)").allTextContents();
  for (const a of ["terminate", "replay", "dead_letter.replay_edited", "stop", "resume", "group.create", "group.move", "group.delete"]) {
    assert.ok(actions.includes(a), `${a} in the audit page: ${actions}`);
  }
  await shot(p, "audit");
  assert.deepEqual(errors, []);
});

test("100,000 dead letters: the list is paged, the groups arrive, filter by handler, purge after a dry run", { skip }, async () => {
  const { p, errors } = await page(ADMIN);
  await p.goto(`${base}/#/topics/${big}/dead-letters`);
  await ready(p);
  // The first page shows without waiting for the grouping of all 100,000.
  assert.equal(await p.locator("tbody tr").count(), 50);
  const first = await p.locator("tbody tr a.mono").first().textContent();
  // The groups come when the server has read them all, and count every dead letter.
  await p.locator(".cards .card").first().waitFor({ timeout: 120000 });
  const counts = await p.locator(".cards .card strong").allTextContents();
  assert.equal(counts.map((c) => parseInt(c, 10)).reduce((a, b) => a + b, 0), 100000, counts.join(" "));
  await p.getByRole("link", { name: "Next page" }).click();
  await ready(p);
  assert.equal(await p.locator("tbody tr").count(), 50);
  assert.notEqual(await p.locator("tbody tr a.mono").first().textContent(), first);
  // By handler: the demo's email handler.
  await p.getByLabel("Handler", { exact: true }).fill("email");
  await p.getByRole("button", { name: "Filter" }).click();
  await p.waitForURL(/handler=email/);
  await ready(p);
  const types = await p.locator("tbody tr td:nth-child(3)").allTextContents();
  assert.ok(types.length === 50 && types.every((t) => t === "email"), types.join(" "));
  // Purge: the dry run counts, nothing goes until the second click.
  await p.getByLabel("Purge older than").fill("0s");
  await p.getByRole("button", { name: "Preview purge" }).click();
  await p.getByText("Dry run: 100000 dead letters").waitFor();
  const info = async () => (await (await fetch(`${base}/api/topics/${big}`, { headers: { Authorization: `Bearer ${READER}` } })).json()).dead_letters;
  assert.equal(await info(), 100000);
  await p.getByRole("button", { name: "Purge 100000" }).click();
  await p.getByText("Purged 100000 dead letters.").waitFor({ timeout: 120000 });
  assert.equal(await info(), 0);
  assert.ok((await audit()).some((e) => e.action === "purge" && e.topic === big && e.actor === "ops"));
  assert.deepEqual(errors, []);
});

test("dark mode", { skip }, async () => {
  const { p, errors } = await page(ADMIN, 1280, "dark");
  await p.goto(`${base}/#/topics/${topic}/dead-letters`);
  await ready(p);
  const [r, g, b] = (await p.evaluate(() => getComputedStyle(document.body).backgroundColor)).match(/\d+/g).map(Number);
  assert.ok(0.2126 * r + 0.7152 * g + 0.0722 * b < 80, `a dark background: ${r},${g},${b}`);
  await p.locator(".cards .card").first().waitFor();
  await shot(p, "dark-dead-letters");
  assert.deepEqual(errors, []);
});

test("the pages work at phone width", { skip }, async () => {
  const { p, errors } = await page(ADMIN, 390);
  await p.getByRole("link", { name: topic }).waitFor();
  await p.goto(`${base}/#/topics/${topic}/dead-letters`);
  await p.getByRole("heading", { name: "By error" }).waitFor();
  await shot(p, "phone-dead-letters");
  assert.deepEqual(errors, []);
});

test("a server that went away shows a banner, not a blank page", { skip }, async () => {
  const { p } = await page(ADMIN);
  await p.getByRole("link", { name: topic }).waitFor();
  server.kill("SIGTERM");
  await new Promise((ok) => server.once("exit", ok));
  const banner = p.getByRole("alert");
  await banner.waitFor({ timeout: 10000 });
  assert.match(await banner.textContent(), /cannot be reached/);
  assert.ok(await p.getByRole("link", { name: topic }).isVisible(), "the last page stays");
});
