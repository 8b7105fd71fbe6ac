// Test harness: a real tilewised in a temp TILEWISE_HOME, the real tilewise-ui-bridge in front of it,
// headless Debian Chromium through playwright-core, and an independent JSON-RPC client that asks the
// daemon directly (the ground truth the page is compared with).
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../..");
export const BIN = process.env.TILEWISE_BIN_DIR || path.join(ROOT, "target/debug");
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function until(what, fn, timeoutMs = 15000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    try { const v = await fn(); if (v) return v; } catch (e) { last = e; }
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ""}`);
}

/** A minimal JSON-RPC client over the daemon's socket (docs/protocol.md), independent of the app. */
export class RawClient {
  static async connect(socketPath, name = "ui-test/1") {
    const c = new RawClient();
    c.sock = net.createConnection(socketPath);
    await new Promise((ok, fail) => { c.sock.once("connect", ok); c.sock.once("error", fail); });
    c.buf = ""; c.nextId = 1; c.waiting = new Map(); c.events = [];
    c.sock.setEncoding("utf8");
    c.sock.on("data", (d) => {
      c.buf += d;
      let i;
      while ((i = c.buf.indexOf("\n")) >= 0) {
        const line = c.buf.slice(0, i); c.buf = c.buf.slice(i + 1);
        if (!line.trim()) continue;
        const msg = JSON.parse(line);
        if (msg.method === "event") c.events.push(msg.params);
        else if (c.waiting.has(msg.id)) { c.waiting.get(msg.id)(msg); c.waiting.delete(msg.id); }
      }
    });
    c.sock.on("error", () => {});
    await c.call("hello", { client: name, protocol: 1 });
    return c;
  }
  call(method, params) {
    const id = this.nextId++;
    const msg = { jsonrpc: "2.0", id, method };
    if (params !== undefined && params !== null) msg.params = params;
    this.sock.write(JSON.stringify(msg) + "\n");
    return new Promise((ok, fail) => {
      const timer = setTimeout(() => fail(new Error(`${method}: no reply in 20 s`)), 20000);
      this.waiting.set(id, (m) => {
        clearTimeout(timer);
        if (m.error) { const e = new Error(`${method}: ${m.error.message}`); e.code = m.error.code; fail(e); } else ok(m.result);
      });
    });
  }
  close() { this.sock.destroy(); }
}

/** Starts tilewised in a fresh TILEWISE_HOME and waits until it answers. */
export async function startDaemon(home) {
  home = home || fs.mkdtempSync(path.join(os.tmpdir(), "tilewise-ui-"));
  const env = { ...process.env, TILEWISE_HOME: home };
  delete env.TILEWISE_SOCKET;
  const log = fs.openSync(path.join(home, "tilewised.out"), "a");
  const proc = spawn(path.join(BIN, "tilewised"), [], { env, stdio: ["ignore", log, log] });
  const socket = path.join(home, "run", "tilewised.sock");
  const client = await until("tilewised to answer", async () => {
    if (proc.exitCode !== null) throw new Error(`tilewised exited ${proc.exitCode}: ${fs.readFileSync(path.join(home, "tilewised.out"), "utf8")}`);
    return await RawClient.connect(socket).catch(() => null);
  }, 30000);
  return { home, env, proc, socket, client };
}

/** Stops a daemon through the protocol and waits until its socket stops answering. `d.proc` may be
 *  absent (a daemon that the bridge started, detached): the socket is then the only handle. */
export async function stopDaemon(d) {
  try { await d.client.call("daemon.shutdown"); } catch { /* already gone */ }
  d.client.close();
  const gone = await until("tilewised to stop answering", async () => {
    const c = await RawClient.connect(d.socket).catch(() => null);
    if (c) { c.close(); return false; }
    return true;
  }, 15000).catch(() => false);
  if (d.proc && d.proc.exitCode === null) {
    if (!gone) d.proc.kill("SIGKILL");
    await until("tilewised to exit", () => d.proc.exitCode !== null || d.proc.signalCode !== null, 10000);
  }
  d.client = null;
}

/** Starts the bridge against the daemon of `env` and resolves its base URL. */
export async function startBridge(env) {
  const proc = spawn(path.join(BIN, "tilewise-ui-bridge"), ["--ui", path.join(ROOT, "ui/src")], {
    env: { ...env, TILEWISE_DAEMON: path.join(BIN, "tilewised") }, stdio: ["ignore", "pipe", "inherit"],
  });
  const url = await new Promise((ok, fail) => {
    let out = "";
    proc.stdout.on("data", (d) => { out += d; const m = /listening on (\S+)/.exec(out); if (m) ok(m[1]); });
    proc.once("exit", (c) => fail(new Error(`bridge exited ${c}`)));
  });
  return { proc, url };
}

export async function launchBrowser() {
  return chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
}
