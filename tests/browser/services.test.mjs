// Services list, service page, and live health updates.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { seededSuite, openPage, entity } from './lib/harness.mjs';

const env = seededSuite('services');

test('lists services with health and tags, filters, and opens one', { timeout: 45_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/`);
    await page.waitForURL(/\/ui\/#\/services$/);

    const web = page.locator('li[data-service="web"]');
    await web.getByText('2 instances').waitFor();
    await web.getByText('1 warning').waitFor();
    await web.getByText('1 passing').waitFor();
    await web.locator('.tag', { hasText: 'http' }).waitFor();
    const pg = page.locator('li[data-service="postgres"]');
    await pg.getByText('1 instance', { exact: true }).waitFor();
    // The node-level "Disk space" check on db-1 counts towards postgres.
    await pg.getByText('2 passing').waitFor();

    // Filter by tag, then by a name that matches nothing.
    const filter = page.getByLabel('Filter services');
    await filter.fill('primary');
    await web.waitFor({ state: 'detached' });
    await pg.waitFor();
    await filter.fill('no-such-service');
    await page.getByText('No services match').waitFor();
    await filter.fill('');
    await web.waitFor();

    // Keyboard: the service name is a real link.
    await web.getByRole('link', { name: 'web', exact: true }).click();
    await page.waitForURL(/#\/services\/web$/);
    await page.getByRole('heading', { level: 1, name: 'web' }).waitFor();
    const inst1 = page.locator('li[data-instance="web-1"]');
    const inst2 = page.locator('li[data-instance="web-2"]');
    await inst1.getByRole('link', { name: 'web-1' }).waitFor();
    await inst1.getByText('192.0.2.11:8080').waitFor(); // falls back to the node address
    await inst2.getByText('198.51.100.7:8081').waitFor(); // service address wins
    await inst1.locator('[data-check="web-1-http"]').getByText('HTTP GET /health: 200 OK').waitFor();
    await inst2.locator('[data-check="web-2-http"] .status-text').getByText('warning').waitFor();
    await inst2.getByText('HTTP GET /health: 429 Too Many Requests').waitFor();

    // Instance node links lead to the node page.
    await inst1.getByRole('link', { name: 'web-1' }).click();
    await page.waitForURL(/#\/nodes\/web-1$/);
    await page.getByRole('heading', { level: 1, name: 'web-1' }).waitFor();

    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});

test('a check turning critical shows up live, without a reload', { timeout: 45_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/#/services/web`);
    const check = page.locator('li[data-instance="web-1"] [data-check="web-1-http"]');
    await check.locator('.status-text', { hasText: 'passing' }).waitFor();
    // Mark this document: a full reload would lose the marker.
    await page.evaluate(() => { window.__noReload = true; });

    await env.agent.register(entity({
      node: 'web-1', address: '192.0.2.11', nodeMeta: { rack: 'r1' },
      service: { ID: 'web-1', Service: 'web', Tags: ['http', 'v1'], Address: '', Port: 8080 },
      check: { CheckID: 'web-1-http', Name: 'HTTP on 8080', Status: 'critical', ServiceID: 'web-1', Output: 'HTTP GET /health: 503 Service Unavailable' },
    }));
    await check.locator('.status-text', { hasText: 'critical' }).waitFor();
    await check.getByText('503 Service Unavailable').waitFor();
    await page.locator('.summary').getByText('1 critical').waitFor();
    assert.equal(await page.evaluate(() => window.__noReload), true);

    // The services list follows too: navigate in-app and flip it back.
    await page.getByRole('navigation', { name: 'Breadcrumb' }).getByRole('link', { name: 'Services' }).click();
    const web = page.locator('li[data-service="web"]');
    await web.getByText('1 critical').waitFor();
    // Keyboard focus survives live re-renders.
    await web.getByRole('link', { name: 'web', exact: true }).focus();
    await env.agent.register(entity({
      node: 'web-1', address: '192.0.2.11', nodeMeta: { rack: 'r1' },
      service: { ID: 'web-1', Service: 'web', Tags: ['http', 'v1'], Address: '', Port: 8080 },
      check: { CheckID: 'web-1-http', Name: 'HTTP on 8080', Status: 'passing', ServiceID: 'web-1', Output: 'HTTP GET /health: 200 OK' },
    }));
    await web.getByText('1 passing').waitFor();
    await web.getByText('1 critical').waitFor({ state: 'detached' });
    assert.equal(await page.evaluate(() => document.activeElement?.getAttribute('href')), '#/services/web');
    // A brand-new service appears as well.
    await env.agent.register(entity({
      node: 'web-2', address: '192.0.2.12',
      service: { ID: 'cache', Service: 'cache', Tags: ['redis'], Port: 6379 },
      check: { CheckID: 'cache-tcp', Name: 'TCP 6379', Status: 'critical', ServiceID: 'cache', Output: 'connection refused' },
    }));
    await page.locator('li[data-service="cache"]').getByText('1 critical').waitFor();
    assert.equal(await page.evaluate(() => window.__noReload), true);
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});
