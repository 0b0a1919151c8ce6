// Every main page renders without console or page errors; screenshots
// at laptop and phone width go to tests/browser/artifacts/.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { seededSuite, openPage, screenshotPath, LAPTOP, PHONE } from './lib/harness.mjs';

const env = seededSuite('pages');

// Mesh data for the intentions page, a service page with a sidecar and a routed service,
// added once, by the first test that needs it (after the suite's seeding).
let meshData = null;
const addMeshData = () => (meshData ??= (async () => {
  const calls = [
    ['PUT', '/v1/agent/service/register', { Name: 'billing', Port: 9000, Connect: { SidecarService: { Proxy: { Upstreams: [{ DestinationName: 'postgres', LocalBindPort: 9192 }] } } } }],
    ['PUT', '/v1/connect/intentions/exact?source=web&destination=billing', { Action: 'allow', Description: 'checkout calls billing' }],
    ['PUT', '/v1/connect/intentions/exact?source=*&destination=billing', { Action: 'deny' }],
    ['PUT', '/v1/connect/intentions/exact?source=billing&destination=postgres', { Action: 'allow' }],
    // A routed service for the Routing diagram: a router, a 90/10 split, subsets, failover.
    ['PUT', '/v1/config', { Kind: 'service-defaults', Name: 'web', Protocol: 'http' }],
    ['PUT', '/v1/config', { Kind: 'service-defaults', Name: 'admin', Protocol: 'http' }],
    ['PUT', '/v1/config', { Kind: 'service-resolver', Name: 'web', DefaultSubset: 'v1', Subsets: { v1: { Filter: 'Service.Meta.version == v1' }, v2: { Filter: 'Service.Meta.version == v2' } }, Failover: { '*': { Datacenters: ['dc2'] } } }],
    ['PUT', '/v1/config', { Kind: 'service-splitter', Name: 'web', Splits: [{ Weight: 90, ServiceSubset: 'v1' }, { Weight: 10, ServiceSubset: 'v2' }] }],
    ['PUT', '/v1/config', { Kind: 'service-router', Name: 'web', Routes: [{ Match: { HTTP: { PathPrefix: '/admin' } }, Destination: { Service: 'admin' } }, { Match: { HTTP: { Header: [{ Name: 'x-canary', Exact: '1' }] } }, Destination: { ServiceSubset: 'v2' } }] }],
  ];
  for (const [method, path, body] of calls) {
    const r = await env.agent.call(method, path, body);
    if (r.status !== 200) throw new Error(`${method} ${path}: ${r.status} ${r.text}`);
  }
})());

// [name, route, a locator that shows the page has its data]
const PAGES = [
  ['services', '#/services', 'li[data-service="web"] .status'],
  ['service', '#/services/web', 'li[data-instance="web-2"] [data-check="web-2-http"]'],
  ['nodes', '#/nodes', 'li[data-node="ui-test"] .badge-leader'],
  ['node', '#/nodes/db-1', '.rows li[data-service="postgres"]'],
  ['kv', '#/kv/', 'li[data-key="config/"]'],
  ['kv-key', '#/kv/config/app/settings', '.kv-value.json'],
  ['intentions', '#/intentions', 'li[data-source="web"][data-destination="billing"] .action-allow'],
  ['mesh-service', '#/services/billing', '.mesh:has(tr[data-upstream="postgres"]):has(li[data-source="web"]):has(.policy-note)'],
  ['routing', '#/services/web', '.routing:has(path.edge[data-kind="failover"]) li[data-target-id][data-role="failover"]'],
];

async function visitAll(page, onPage) {
  await addMeshData();
  await page.goto(`${env.agent.baseUrl}/ui/`);
  for (const [name, route, ready] of PAGES) {
    // In-app navigation (hash change), as a user clicking links would.
    await page.evaluate((r) => { location.hash = r; }, route);
    await page.locator(ready).first().waitFor();
    await onPage(name);
  }
}

test('no console errors or page errors on any main page', { timeout: 60_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser, LAPTOP);
  try {
    await visitAll(page, async () => {});
    // Fresh loads of deep links too.
    for (const [, route, ready] of PAGES) {
      await page.goto(`${env.agent.baseUrl}/ui/${route}`);
      await page.locator(ready).first().waitFor();
    }
    // Keyboard: skip link, then the page heading, then the filter box.
    await page.goto(`${env.agent.baseUrl}/ui/#/services`);
    await page.reload();
    await page.locator(PAGES[0][2]).first().waitFor();
    const focused = () => page.evaluate(() => {
      const el = document.activeElement;
      return el ? `${el.tagName.toLowerCase()}${el.id ? `#${el.id}` : ''}:${(el.textContent || '').trim().slice(0, 20)}` : '';
    });
    await page.keyboard.press('Tab');
    assert.equal(await focused(), 'a#skip-link:Skip to content');
    await page.keyboard.press('Enter');
    assert.match(await focused(), /^h1:Services/);
    await page.keyboard.press('Tab');
    assert.equal(await focused(), 'input#service-filter:');
    await page.keyboard.type('postgres');
    await page.locator('li[data-service="web"]').waitFor({ state: 'detached' });
    await page.keyboard.press('Tab');
    assert.equal(await focused(), 'a:postgres');
    await page.keyboard.press('Enter');
    await page.waitForURL(/#\/services\/postgres$/);
    await page.getByRole('heading', { level: 1, name: 'postgres' }).waitFor();
    assert.deepEqual(problems.pageErrors, [], 'page errors');
    assert.deepEqual(problems.consoleErrors, [], 'console errors');
  } finally {
    await context.close();
  }
});

for (const [label, viewport] of [['laptop', LAPTOP], ['phone', PHONE]]) {
  test(`screenshots at ${label} width (${viewport.width}x${viewport.height})`, { timeout: 60_000 }, async () => {
    const { context, page, problems } = await openPage(env.browser, viewport);
    try {
      await visitAll(page, async (name) => {
        // Nothing may stick out sideways at phone width.
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
        assert.ok(overflow <= 0, `${name}: page is ${overflow}px wider than the ${label} viewport`);
        await page.screenshot({ path: screenshotPath(`${name}-${label}`), fullPage: true });
      });
      assert.deepEqual(problems.pageErrors, [], 'page errors');
      assert.deepEqual(problems.consoleErrors, [], 'console errors');
    } finally {
      await context.close();
    }
  });
}
