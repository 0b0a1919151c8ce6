// Shared fixtures for the browser tests: a real `trellis agent --dev`
// on free loopback ports, a headless Chromium, and small API helpers.
import { spawn } from 'node:child_process';
import { before, after } from 'node:test';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(here, '../../..');
export const ARTIFACTS = path.resolve(here, '../artifacts');

export const LAPTOP = { width: 1280, height: 800 };
export const PHONE = { width: 390, height: 844 };

const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

export function trellisBin() {
  const env = process.env.TRELLIS_BIN;
  const bin = env ? path.resolve(env) : path.join(REPO_ROOT, 'target/debug/trellis');
  if (!fs.existsSync(bin)) {
    throw new Error(`Trellis binary not found at ${bin}: run \`cargo build\` in ${REPO_ROOT} or set TRELLIS_BIN`);
  }
  return bin;
}

/** A TCP port that was free a moment ago on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const delay = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Start `trellis agent --dev` and wait (polling, with a deadline) until
 * /v1/status/leader names a leader. Returns an agent handle; call
 * stop() to kill it and remove its data directory.
 */
export async function startAgent(label = 'agent', { deadlineMs = 30_000 } = {}) {
  const bin = trellisBin();
  const [httpPort, serverPort] = [await freePort(), await freePort()];
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'trellis-ui-test-'));
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const logPath = path.join(ARTIFACTS, `${label}-agent.log`);
  const log = fs.openSync(logPath, 'w');
  const args = [
    'agent', '--dev', '--node', 'ui-test',
    '--bind', '127.0.0.1', '--client', '127.0.0.1',
    '--http-port', String(httpPort), '--dns-port', '0', '--server-port', String(serverPort), '--serf-lan-port', '0', '--serf-wan-port', '0',
    '--data-dir', dataDir,
  ];
  const child = spawn(bin, args, { cwd: REPO_ROOT, stdio: ['ignore', log, log] });
  fs.closeSync(log);
  let exited = null;
  const exitPromise = new Promise((resolve) => child.on('exit', (code, signal) => { exited = { code, signal }; resolve(); }));
  const killOnExit = () => { try { child.kill('SIGKILL'); } catch { /* already gone */ } };
  process.on('exit', killOnExit);

  const agent = {
    baseUrl: `http://127.0.0.1:${httpPort}`,
    httpPort,
    serverPort,
    dataDir,
    logPath,
    async stop() {
      process.off('exit', killOnExit);
      if (!exited) {
        child.kill('SIGTERM');
        const force = setTimeout(() => child.kill('SIGKILL'), 5000);
        await exitPromise;
        clearTimeout(force);
      }
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
    /** Raw HTTP call against the agent; returns {status, headers, text, json}. */
    async call(method, urlPath, body) {
      const res = await fetch(agent.baseUrl + urlPath, {
        method,
        body: body === undefined ? undefined : (typeof body === 'string' ? body : JSON.stringify(body)),
        signal: AbortSignal.timeout(10_000),
      });
      const text = await res.text();
      let json;
      try { json = text ? JSON.parse(text) : null; } catch { json = undefined; }
      return { status: res.status, headers: res.headers, text, json };
    },
    /** PUT /v1/catalog/register, failing loudly on anything but 200 true. */
    async register(entity) {
      const r = await agent.call('PUT', '/v1/catalog/register', entity);
      if (r.status !== 200 || r.json !== true) throw new Error(`catalog/register failed: ${r.status} ${r.text}`);
    },
    async kvPut(key, value) {
      const r = await agent.call('PUT', `/v1/kv/${key}`, value);
      if (r.status !== 200 || r.json !== true) throw new Error(`kv put ${key} failed: ${r.status} ${r.text}`);
    },
    /** Decoded value of a key, or null when it does not exist. */
    async kvGet(key) {
      const r = await agent.call('GET', `/v1/kv/${key}`);
      if (r.status === 404) return null;
      if (r.status !== 200) throw new Error(`kv get ${key} failed: ${r.status} ${r.text}`);
      const v = r.json?.[0]?.Value;
      return v ? Buffer.from(v, 'base64').toString('utf8') : '';
    },
  };

  const deadline = Date.now() + deadlineMs;
  let last = 'no answer yet';
  try {
    for (;;) {
      if (exited) throw new Error(`trellis exited early (${JSON.stringify(exited)})`);
      try {
        const r = await agent.call('GET', '/v1/status/leader');
        if (r.status === 200 && typeof r.json === 'string' && r.json !== '') return agent;
        last = `HTTP ${r.status}: ${r.text.slice(0, 200)}`;
      } catch (err) {
        last = err.message;
      }
      if (Date.now() > deadline) throw new Error(`no leader within ${deadlineMs} ms (last: ${last})`);
      await delay(100); // poll interval, bounded by the deadline above
    }
  } catch (err) {
    await agent.stop();
    const tail = fs.existsSync(logPath) ? fs.readFileSync(logPath, 'utf8').slice(-4000) : '';
    throw new Error(`${err.message}\n${bin} ${args.join(' ')}\n--- agent log tail ---\n${tail}`);
  }
}

export async function launchBrowser() {
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 30_000 });
}

/**
 * New page in its own context. `problems` collects page errors and
 * console errors (as strings) so tests can assert there were none.
 */
export async function openPage(browser, viewport = LAPTOP) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.setDefaultNavigationTimeout(15_000);
  const problems = { pageErrors: [], consoleErrors: [] };
  page.on('pageerror', (err) => problems.pageErrors.push(String(err?.stack || err)));
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.consoleErrors.push(`${msg.text()} @ ${JSON.stringify(msg.location())}`);
  });
  return { context, page, problems };
}

export function screenshotPath(name) {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  return path.join(ARTIFACTS, `${name}.png`);
}

/** Catalog entity as in Consul's /v1/catalog/register docs. */
export function entity({ node, address, service, check, nodeMeta }) {
  const e = { Node: node, Address: address };
  if (nodeMeta) e.NodeMeta = nodeMeta;
  if (service) e.Service = service;
  if (check) e.Check = { Node: node, ...check };
  return e;
}

/**
 * The standard data set: two "web" instances, a database with a node
 * check, and a few keys. Addresses come from the documentation range
 * 192.0.2.0/24: they are only data, nothing ever connects to them.
 */
export async function seed(agent) {
  await agent.register(entity({
    node: 'web-1', address: '192.0.2.11', nodeMeta: { rack: 'r1' },
    service: { ID: 'web-1', Service: 'web', Tags: ['http', 'v1'], Address: '', Port: 8080 },
    check: { CheckID: 'web-1-http', Name: 'HTTP on 8080', Status: 'passing', ServiceID: 'web-1', Output: 'HTTP GET /health: 200 OK' },
  }));
  await agent.register(entity({
    node: 'web-2', address: '192.0.2.12',
    service: { ID: 'web-2', Service: 'web', Tags: ['http', 'v1'], Address: '198.51.100.7', Port: 8081 },
    check: { CheckID: 'web-2-http', Name: 'HTTP on 8081', Status: 'warning', ServiceID: 'web-2', Output: 'HTTP GET /health: 429 Too Many Requests' },
  }));
  await agent.register(entity({
    node: 'db-1', address: '192.0.2.30',
    service: { ID: 'postgres', Service: 'postgres', Tags: ['primary'], Port: 5432 },
    check: { CheckID: 'postgres-tcp', Name: 'TCP 5432', Status: 'passing', ServiceID: 'postgres', Output: 'TCP connect 192.0.2.30:5432: Success' },
  }));
  await agent.register(entity({
    node: 'db-1', address: '192.0.2.30',
    check: { CheckID: 'disk', Name: 'Disk space', Status: 'passing', Output: 'disk usage 41%' },
  }));
  await agent.kvPut('config/app/name', 'trellis <b>demo</b>');
  await agent.kvPut('config/app/settings', '{"replicas":3,"regions":["eu","us"],"debug":false}');
  await agent.kvPut('readme', 'Plain text value\nsecond line');
}

/**
 * The set-up every UI test file shares: before its tests, a seeded agent and a browser; after
 * them, both stopped. Returns an object whose `agent` and `browser` are filled in by then.
 */
export function seededSuite(label) {
  const env = { agent: null, browser: null };
  before(async () => {
    env.agent = await startAgent(label);
    await seed(env.agent);
    env.browser = await launchBrowser();
  }, { timeout: 60_000 });
  after(async () => {
    await env.browser?.close();
    await env.agent?.stop();
  }, { timeout: 20_000 });
  return env;
}
