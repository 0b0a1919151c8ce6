// Datacenter picker: hidden with one DC; failures in a DC are shown clearly.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { seededSuite, openPage } from './lib/harness.mjs';

const env = seededSuite('datacenters');

test('single datacenter: the drop-down is hidden and no dc parameter is sent', { timeout: 30_000 }, async () => {
  const dcs = await env.agent.call('GET', '/v1/catalog/datacenters');
  assert.equal(dcs.json.length, 1, `expected one datacenter, got ${dcs.text}`);
  const { context, page, problems } = await openPage(env.browser);
  const apiCalls = [];
  page.on('request', (r) => { if (r.url().includes('/v1/')) apiCalls.push(r.url()); });
  try {
    await page.goto(`${env.agent.baseUrl}/ui/`);
    // Wait until the header knows the datacenters, then check it stays hidden.
    await page.waitForFunction(() => document.querySelectorAll('#dc-select option').length === 1);
    await page.locator('li[data-service="web"]').waitFor();
    assert.equal(await page.locator('#dc-picker').isHidden(), true);
    assert.equal(await page.locator('#dc-select').inputValue(), dcs.json[0]);
    assert.deepEqual(apiCalls.filter((u) => u.includes('dc=')), []);
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});

test('an unreachable datacenter shows an error and a way back', { timeout: 30_000 }, async () => {
  const local = (await env.agent.call('GET', '/v1/agent/self')).json.Config.Datacenter;
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/#/nodes?dc=nowhere`);
    const alert = page.getByRole('alert').filter({ hasText: 'Could not load this page from datacenter “nowhere”' });
    await alert.waitFor();
    // The chosen (unknown) DC is shown, so the picker is visible to switch back.
    await page.locator('#dc-picker').waitFor({ state: 'visible' });
    assert.equal(await page.locator('#dc-select').inputValue(), 'nowhere');

    await alert.getByRole('link', { name: `Switch to ${local} (local datacenter)` }).click();
    await page.waitForURL(/#\/nodes$/);
    await page.locator('li[data-node="web-1"]').waitFor();
    await page.getByRole('alert').waitFor({ state: 'detached' });

    // And via the drop-down.
    await page.goto(`${env.agent.baseUrl}/ui/#/services?dc=nowhere`);
    await page.getByRole('alert').waitFor();
    await page.getByLabel('Datacenter').selectOption(local);
    await page.waitForURL(/#\/services$/);
    await page.locator('li[data-service="web"]').waitFor();
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});

test('a shared /ui/?dc= link opens in that datacenter', { timeout: 30_000 }, async () => {
  // The server must serve the UI whatever the query string says: ?dc= is for the UI here.
  const res = await env.agent.call('GET', '/ui/?dc=nowhere');
  assert.equal(res.status, 200, `GET /ui/?dc=nowhere answered ${res.status} ${res.text.slice(0, 100)}`);
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/?dc=nowhere#/nodes`);
    // The ?dc= query is moved into the hash route, and used.
    await page.waitForURL(/\/ui\/#\/nodes\?dc=nowhere$/);
    await page.getByRole('alert').filter({ hasText: 'datacenter “nowhere”' }).waitFor();
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});
