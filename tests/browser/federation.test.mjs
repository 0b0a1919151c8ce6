// Datacenter picker against a real federation: `trellis dev --datacenters 2`.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ARTIFACTS, REPO_ROOT, trellisBin, launchBrowser, openPage, screenshotPath, entity } from './lib/harness.mjs';

// A /24 of loopback no other test uses.
const PREFIX = '127.0.241';
const DC1 = `http://${PREFIX}.21:8500`;
const DC2 = `http://${PREFIX}.41:8500`;
const env = { child: null, browser: null, exited: null };

before(async () => {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const logPath = path.join(ARTIFACTS, 'federation-dev.log');
  const args = ['dev', '--datacenters', '2', '--servers', '1', '--address-prefix', PREFIX];
  env.child = spawn(trellisBin(), args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const log = fs.createWriteStream(logPath);
  env.child.stderr.pipe(log);
  env.child.on('exit', (code, signal) => { env.exited = { code, signal }; });
  // Ready when the launcher prints its banner (it waits for both datacenters itself).
  await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`no ready banner within 60 s:\n${out}`)), 60_000);
    env.child.stdout.on('data', (chunk) => {
      out += chunk;
      log.write(chunk);
      if (out.includes('Press Ctrl-C')) { clearTimeout(timer); resolve(); }
    });
    env.child.on('exit', () => { clearTimeout(timer); reject(new Error(`trellis dev exited:\n${out}`)); });
  });
  const r = await fetch(`${DC2}/v1/catalog/register`, {
    method: 'PUT',
    body: JSON.stringify(entity({ node: 'only-in-dc2', address: '192.0.2.99', service: { Service: 'billing', Port: 9000 } })),
  });
  assert.equal(r.status, 200);
  env.browser = await launchBrowser();
}, { timeout: 90_000 });

after(async () => {
  await env.browser?.close();
  if (env.child && !env.exited) {
    const done = new Promise((resolve) => env.child.on('exit', resolve));
    env.child.kill('SIGINT');
    const force = setTimeout(() => env.child.kill('SIGKILL'), 25_000);
    await done;
    clearTimeout(force);
  }
}, { timeout: 30_000 });

test('with two datacenters the picker shows both and switching reads the other one', { timeout: 30_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${DC1}/ui/#/nodes`);
    await page.locator('#dc-picker').waitFor({ state: 'visible' });
    const options = await page.locator('#dc-select option').evaluateAll((os) => os.map((o) => o.value));
    assert.deepEqual(options.sort(), ['dc1', 'dc2']);
    assert.equal(await page.locator('#dc-select').inputValue(), 'dc1');
    await page.locator('li[data-node="dc1-server-1"]').waitFor();
    assert.equal(await page.locator('li[data-node="only-in-dc2"]').count(), 0);

    await page.getByLabel('Datacenter').selectOption('dc2');
    await page.waitForURL(/#\/nodes\?dc=dc2$/);
    await page.locator('li[data-node="only-in-dc2"]').waitFor();
    await page.locator('li[data-node="dc2-server-1"]').waitFor();
    assert.equal(await page.locator('li[data-node="dc1-server-1"]').count(), 0);
    await page.screenshot({ path: screenshotPath('federation-nodes-dc2'), fullPage: true });

    await page.goto(`${DC1}/ui/#/services?dc=dc2`);
    await page.locator('li[data-service="billing"]').waitFor();
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});
