// Nodes list with server/leader markers, and the node page.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { seededSuite, openPage } from './lib/harness.mjs';

const env = seededSuite('nodes');

test('nodes page marks the server and the Raft leader', { timeout: 45_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/#/nodes`);
    // The dev agent registers itself; its address is the leader's host.
    const self = page.locator('li[data-node="ui-test"]');
    await self.locator('.badge-leader', { hasText: 'Leader' }).waitFor();
    await self.locator('.badge-server', { hasText: 'Server' }).waitFor();
    assert.equal(await self.getAttribute('data-role'), 'leader');

    const web1 = page.locator('li[data-node="web-1"]');
    await web1.getByText('192.0.2.11').waitFor();
    assert.equal(await web1.locator('.badge').count(), 0);
    const db = page.locator('li[data-node="db-1"]');
    await db.getByText('1 passing').first().waitFor();

    await page.getByLabel('Filter nodes').fill('192.0.2.3');
    await web1.waitFor({ state: 'detached' });
    await db.waitFor();

    await db.getByRole('link', { name: 'db-1' }).click();
    await page.waitForURL(/#\/nodes\/db-1$/);
    await page.getByRole('heading', { level: 1, name: 'db-1' }).waitFor();
    await page.locator('[data-check="disk"]').getByText('disk usage 41%').waitFor();
    await page.locator('[data-check="disk"]').getByText('node check').waitFor();
    await page.locator('[data-check="postgres-tcp"] .status-text', { hasText: 'passing' }).waitFor();
    const svc = page.locator('.rows li[data-service="postgres"]');
    await svc.getByText(':5432').waitFor();
    await svc.getByRole('link', { name: 'postgres' }).click();
    await page.waitForURL(/#\/services\/postgres$/);

    // The leader's own node page carries the markers too.
    await page.goto(`${env.agent.baseUrl}/ui/#/nodes/ui-test`);
    await page.locator('.node-info .badge-leader').waitFor();
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});

test('an unknown node says so', { timeout: 30_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/#/nodes/no-such-node`);
    await page.getByText('There is no node called “no-such-node”').waitFor();
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});
