// The dashboard in headless Chromium against a real daemon, through tilewise-ui-bridge (the app's
// own dispatch code). Every check compares what the page shows with what the daemon returns to an
// independent client on its socket.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { startDaemon, stopDaemon, startBridge, launchBrowser, RawClient, until, BIN } from "./harness.mjs";
import fmt from "../src/format.js";

let daemon, bridge, browser, page;
const consoleErrors = [];

before(async () => {
  daemon = await startDaemon();
  bridge = await startBridge(daemon.env);
  browser = await launchBrowser();
  page = await browser.newPage({ viewport: { width: 1120, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(bridge.url);
  await page.waitForSelector("body[data-loaded]", { timeout: 20000 });
});

after(async () => {
  await browser?.close();
  bridge?.proc.kill();
  if (daemon?.client) await stopDaemon(daemon);
  // The temp home (database, daemon log) goes with the run, unless asked to keep it for a look.
  if (daemon?.home && !process.env.TILEWISE_UI_KEEP_HOME) {
    try { fs.rmSync(daemon.home, { recursive: true, force: true, maxRetries: 5 }); }
    catch (e) { console.log(`could not remove ${daemon.home}: ${e.message}`); }
  } else if (daemon?.home) console.log(`kept the daemon's home: ${daemon.home}`);
});

const text = (sel) => page.locator(sel).first().innerText();

test("the connection pill names the daemon that answers on the socket", async () => {
  const status = await daemon.client.call("status");
  const pill = await text("[data-testid=link-state]");
  assert.match(pill, new RegExp(`pid ${status.pid}\\b`));
  assert.ok(pill.includes(status.version), `${pill} should include ${status.version}`);
});

test("the device card shows the daemon's probe", async () => {
  const { device, device_fingerprint } = await daemon.client.call("status");
  assert.equal(await text("#device [data-key=fingerprint]"), device_fingerprint);
  assert.equal(await text("#device [data-key=backend]"), device.backend);
  if (device.chip) assert.ok((await text("#device [data-key=chip]")).startsWith(device.chip));
  assert.ok((await text("#device [data-key=cores]")).startsWith(String(device.p_cores)));
  if (typeof device.memory_bytes === "number") assert.equal(await text("#device [data-key=memory]"), fmt.bytes(device.memory_bytes));
});

test("the tuning pill follows status.tuning.state", async () => {
  const { tuning } = await daemon.client.call("status");
  const label = { idle: "Idle", tuning: "Tuning", paused: "Paused" }[tuning.state];
  assert.ok((await text("[data-testid=tuning-state]")).startsWith(label));
  // The title carries the same state (the app's window title; the smoke test waits on it).
  assert.equal(await page.title(), `tilewise — ${await text("[data-testid=tuning-state]")}`);
});

test("the speedup chart has one point per promotion in history", async () => {
  const { promotions } = await daemon.client.call("history", { limit: 200 });
  const points = await page.locator("#speedup-chart g.point").count();
  if (promotions.length) assert.equal(points, promotions.length);
  else assert.match(await text("#speedup-chart"), /No promoted policy yet|candidate/);
});

test("a live event from another client appears without reloading", async () => {
  const other = await RawClient.connect(daemon.socket, "ui-live-probe/7");
  try {
    const item = page.locator("#events li[data-kind='client.hello']", { hasText: "ui-live-probe/7" });
    await item.waitFor({ timeout: 10000 });
  } finally { other.close(); }
});

test("events from before the page opened are listed, newest first", async () => {
  // daemon.started happened before the browser existed: only events.list can have brought it.
  const { events } = await daemon.client.call("events.list", { limit: 100, kinds: ["daemon.started"] });
  assert.equal(events.length, 1);
  await page.locator(`#events li[data-kind='daemon.started'][data-id='${events[0].id}']`).waitFor({ timeout: 10000 });
  const ids = await page.locator("#events li").evaluateAll((lis) => lis.map((li) => Number(li.dataset.id)));
  assert.deepEqual(ids, [...ids].sort((a, b) => b - a), "newest first, no duplicates");
  assert.equal(new Set(ids).size, ids.length);
});

test("the page may not call methods outside the dashboard's list", async () => {
  const err = await page.evaluate(() => window.__TAURI__.core.invoke("daemon_call", { method: "daemon.shutdown" }).then(() => null, (e) => e));
  assert.equal(err.code, -32602);
  assert.match(err.message, /may not call/);
  const status = await daemon.client.call("status");  // still alive
  assert.ok(status.pid > 0);
});

test("a process using the plugin shows in the usage card: its model, weights, use, what it is served", async () => {
  const plugin = await RawClient.connect(daemon.socket, "tilewise-py/ui-test");
  try {
    const fp = "mdl-00112233445566778899aabbccddeeff";
    await plugin.call("policy.get", { model: fp, mlx: "0.32.4", backend: "cpu", model_name: "/models/Llama-3.2-1B-q4", dtype: "q4" });
    await plugin.call("usage.report", { model: fp, period_s: 30, generations: [{ batch: 8, prompt_tokens: 256, generated_tokens: 64, count: 5 }] });
    // Another client's hello is an event: the page refreshes on it.
    (await RawClient.connect(daemon.socket, "ui-usage-nudge/1")).close();
    const row = page.locator(`#models tr[data-model='${fp}']`);
    await row.waitFor({ timeout: 10000 });
    const cells = await row.locator("td").allInnerTexts();
    assert.deepEqual(cells.slice(0, 4), ["Llama-3.2-1B-q4", "q4", "5 generations, mostly batch 8", "native, not tuned yet"]);
    assert.equal(cells[4], `pid ${process.pid}`, "the process, by the pid the kernel gave the daemon");
    const { processes } = await daemon.client.call("status");
    assert.deepEqual(processes.map((p) => p.client), ["tilewise-py/ui-test"], "the app's own policy.get calls are not processes");
    assert.equal(await text("[data-testid=usage-summary]"), "1 process, 1 model running now.");
  } finally { plugin.close(); }
});

test("the policy card says where the served policy came from: proven here, or imported and verified here", async () => {
  const { device_fingerprint } = await daemon.client.call("status");
  const target = { device: device_fingerprint, model: "mdl-99887766554433221100ffeeddccbbaa", mlx: "0.32.4", backend: "cpu" };
  const file = path.join(daemon.home, "provenance-policy.json");
  fs.writeFileSync(file, JSON.stringify({ schema: "tilewise.policy/1", name: "ui provenance", target,
    matmul: { rules: [], default: { kind: "native" } }, fusion: { groups: [{ scope: "model.layers.*.mlp", members: ["gate_proj", "up_proj"] }] } }));
  // Stored through the real store code, as a promotion (and a verification) records it.
  const seed = (...extra) => execFileSync(path.join(BIN, "examples", "seed_best"), [file, "--db", path.join(daemon.home, "tilewise.db"), ...extra]);
  const nudge = async () => (await RawClient.connect(daemon.socket, "ui-provenance-nudge/1")).close();
  const shown = async (want) => until(`the origin tag to read "${want}"`, async () => (await text("[data-testid=policy-origin]")) === want, 15000);

  seed();
  await nudge();
  await shown("proven here");
  assert.equal(await page.locator("[data-testid=policy-origin-text]").count(), 0);

  const origin = "imported from Apple M3 Max (dev-0123456789abcdef), verified here in session 7";
  seed("--origin", origin);
  await nudge();
  await shown("imported · verified here");
  const served = await daemon.client.call("policy.get", target);
  assert.equal(served.evidence.origin, origin);
  assert.equal(await text("[data-testid=policy-origin-text]"), served.evidence.origin);
});

test("'Start tuning now' and 'Pause' drive the daemon, and the session card shows its session", async (t) => {
  await page.locator("#start-tuning").click();
  // Either a session starts, or the daemon refuses; both must be what the daemon itself says.
  const started = await until("a session or a refusal", async () => {
    const list = await daemon.client.call("session.list").catch((e) => ({ error: e }));
    if (list.sessions && list.sessions.length) return { list };
    const notice = await page.locator("[data-testid=alert]").count();
    if (notice && list.error) return { refused: list.error };
    return null;
  }, 30000);
  if (started.refused) {
    // This build of tilewised has no tuning service: the page shows the daemon's own error.
    t.diagnostic(`tuning refused by the daemon: ${started.refused.message}`);
    const direct = await daemon.client.call("tuning.start", {}).then(() => null, (e) => e);
    assert.ok(direct, "tuning.start failed from the page but works directly");
    assert.match(await text("[data-testid=alert]"), /could not start tuning/);
    assert.ok((await text("[data-testid=alert]")).includes(direct.message.replace(/^tuning.start: /, "")));
    return;
  }
  const session = started.list.sessions.reduce((a, b) => (b.id > a.id ? b : a));
  t.diagnostic(`session ${session.id} started from the page`);
  await until("the card to show the session", async () => (await text("#session [data-key=session_id]")) === String(session.id), 20000);
  const show = await daemon.client.call("session.show", { session_id: session.id });
  assert.ok((await text("#session [data-key=model]")).startsWith(show.session.model.slice(0, 19)));
  await until("Pause to be enabled", async () => !(await page.locator("#stop-tuning").isDisabled()), 20000);
  await page.locator("#stop-tuning").click();
  await until("the daemon to stop tuning", async () => (await daemon.client.call("status")).tuning.state !== "tuning", 30000);
  const after = await daemon.client.call("session.show", { session_id: session.id });
  await until("the card to show the new state", async () => (await text("#session [data-key=state]")).startsWith(after.session.state), 20000);
  t.diagnostic(`paused from the page: session ${session.id} is ${after.session.state}`);
});

test("when the daemon stops the page says so, and 'Start it' brings it back", async () => {
  const before = await daemon.client.call("status");
  await stopDaemon(daemon);
  await until("the page to notice", async () => (await text("[data-testid=link-state]")) === "daemon not running", 20000);
  const button = page.locator("#notices button", { hasText: "Start it" });
  await button.click();
  // The bridge spawned a new tilewised (TILEWISE_DAEMON), detached: find it on the socket.
  const fresh = await until("a new daemon", () => RawClient.connect(daemon.socket).catch(() => null), 30000);
  Object.assign(daemon, { client: fresh, proc: null });
  const after = await fresh.call("status");
  assert.notEqual(after.pid, before.pid);
  await until("the page to show the new pid", async () => (await text("[data-testid=link-state]")).includes(`pid ${after.pid}`), 20000);
});

test("no script errors on the page", () => {
  assert.deepEqual(consoleErrors.filter((e) => !/Failed to load resource/.test(e)), []);
});
