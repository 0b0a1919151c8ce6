// L7 traffic management in the UI: the Routing section of a service page draws the service's
// compiled discovery chain (GET /v1/discovery-chain/<name>) as a diagram, left to right:
// service → routes → splits → resolvers → targets, failover targets joined by dashed,
// numbered "failover" edges. Config entries are written through PUT /v1/config.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { seededSuite, openPage } from './lib/harness.mjs';

const env = seededSuite('routing');

async function putConfig(entry) {
  const r = await env.agent.call('PUT', '/v1/config', entry);
  assert.equal(r.status, 200, `${entry.Kind} ${entry.Name}: ${r.text}`);
  assert.equal(r.json, true, `${entry.Kind} ${entry.Name}: ${r.text}`);
}

async function deleteConfig(kind, name) {
  const r = await env.agent.call('DELETE', `/v1/config/${kind}/${name}`);
  assert.equal(r.status, 200, `${kind} ${name}: ${r.text}`);
}

const routing = (page) => page.getByRole('region', { name: 'Routing' });

/** Every edge of the diagram as "kind from -> to #index", sorted. */
async function edges(section) {
  const list = await section.locator('svg.chain-edges path.edge').evaluateAll((ps) =>
    ps.map((p) => `${p.dataset.kind} ${p.dataset.from} -> ${p.dataset.to} #${p.dataset.index}`));
  return list.sort();
}

/** The diagram's columns, left to right. */
const columns = (section) => section.locator('.chain-col').evaluateAll((cs) => cs.map((c) => c.dataset.column));

/**
 * Where each edge is drawn, against the boxes it joins: it must leave its source box's right
 * edge and end at its destination box's left edge, and never cross a box it does not join.
 * Returns a list of problems (empty when every edge is where it belongs).
 */
function edgeGeometry(section) {
  return section.locator('svg.chain-edges').evaluate((svg) => {
    const grid = svg.parentElement;
    const o = svg.getBoundingClientRect();
    const boxOf = (key) => grid.querySelector(`[data-anchor="${CSS.escape(key)}"]`)?.closest('.chain-box');
    const rect = (el) => {
      const r = el.getBoundingClientRect();
      return { left: r.left - o.left, right: r.right - o.left, top: r.top - o.top, bottom: r.bottom - o.top };
    };
    const problems = [];
    const all = [...grid.querySelectorAll('.chain-nodes > .chain-box')];
    const paths = [...svg.querySelectorAll('path.edge')];
    if (!paths.length) problems.push('no edges drawn');
    for (const p of paths) {
      const name = `${p.dataset.kind} ${p.dataset.from} -> ${p.dataset.to}`;
      const fromBox = boxOf(p.dataset.from);
      const toBox = boxOf(p.dataset.to);
      if (!fromBox || !toBox) { problems.push(`${name}: no box for an end`); continue; }
      const nums = p.getAttribute('d').match(/-?\d+(?:\.\d+)?/g).map(Number);
      const [x1, y1] = nums;
      const [x2, y2] = nums.slice(-2);
      const f = rect(fromBox);
      const t = rect(toBox);
      if (Math.abs(x1 - f.right) > 1.5 || y1 < f.top || y1 > f.bottom) problems.push(`${name}: starts at ${x1},${y1}, not on the right edge of ${JSON.stringify(f)}`);
      if (Math.abs(x2 - t.left) > 2.5 || y2 < t.top || y2 > t.bottom) problems.push(`${name}: ends at ${x2},${y2}, not on the left edge of ${JSON.stringify(t)}`);
      const others = all.filter((b) => b !== fromBox && b !== toBox).map(rect);
      const length = p.getTotalLength();
      for (let at = 0; at <= length; at += 3) {
        const pt = p.getPointAtLength(at);
        const hit = others.find((b) => pt.x > b.left + 1 && pt.x < b.right - 1 && pt.y > b.top + 1 && pt.y < b.bottom - 1);
        if (hit) { problems.push(`${name}: runs behind a box at ${Math.round(pt.x)},${Math.round(pt.y)}`); break; }
      }
    }
    return problems;
  });
}

const WEB_ROUTER = 'router:web.default.default';
const WEB_SPLITTER = 'splitter:web.default.default';
const ADMIN = 'admin.default.default.dc1';
const V1 = 'v1.web.default.default.dc1';
const V2 = 'v2.web.default.default.dc1';
const V1_DC2 = 'v1.web.default.default.dc2';
const V2_DC2 = 'v2.web.default.default.dc2';

test('an http service’s routes, 90/10 split, resolver subsets and failover to dc2 are drawn with their edges', { timeout: 90_000 }, async () => {
  await putConfig({ Kind: 'service-defaults', Name: 'web', Protocol: 'http' });
  await putConfig({ Kind: 'service-defaults', Name: 'admin', Protocol: 'http' });
  await putConfig({
    Kind: 'service-resolver', Name: 'web', ConnectTimeout: '3s', DefaultSubset: 'v1',
    Subsets: {
      v1: { Filter: 'Service.Meta.version == v1' },
      v2: { Filter: 'Service.Meta.version == v2', OnlyPassing: true },
    },
    Failover: { '*': { Datacenters: ['dc2'] } },
  });
  await putConfig({ Kind: 'service-splitter', Name: 'web', Splits: [{ Weight: 90, ServiceSubset: 'v1' }, { Weight: 10, ServiceSubset: 'v2' }] });
  await putConfig({
    Kind: 'service-router', Name: 'web',
    Routes: [
      { Match: { HTTP: { PathPrefix: '/admin' } }, Destination: { Service: 'admin' } },
      { Match: { HTTP: { Header: [{ Name: 'x-canary', Exact: '1' }] } }, Destination: { ServiceSubset: 'v2' } },
      {
        Match: { HTTP: { PathRegex: '^/api/v[0-9]+/', Methods: ['GET', 'HEAD'], QueryParam: [{ Name: 'debug', Present: true }] } },
        Destination: { ServiceSubset: 'v1', RequestTimeout: '2s', NumRetries: 3, RetryOnStatusCodes: [503] },
      },
    ],
  });
  // The chain the UI will draw, as the API answers it.
  const api = await env.agent.call('GET', '/v1/discovery-chain/web');
  assert.equal(api.status, 200, api.text);
  assert.equal(api.json.Chain.StartNode, WEB_ROUTER);
  assert.deepEqual(api.json.Chain.Nodes[`resolver:${V1}`].Resolver.Failover.Targets, [V1_DC2]);

  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/#/services/web`);
    await page.getByRole('heading', { level: 1, name: 'web' }).waitFor();
    const section = routing(page);
    await section.locator(`path.edge[data-kind="failover"][data-from="resolver:${V1}"]`).waitFor({ state: 'attached' });
    assert.equal(await section.getAttribute('data-protocol'), 'http');
    await section.getByText('protocol http').waitFor();
    assert.deepEqual(await columns(section), ['service', 'routes', 'splits', 'resolvers', 'targets']);
    for (const title of ['Service', 'Routes', 'Splits', 'Resolvers', 'Targets']) {
      await section.getByRole('heading', { level: 3, name: title, exact: true }).waitFor();
    }

    // Routes, each match written out, in the order they are tried; the default route last.
    const routes = section.getByRole('list', { name: /^Routes of web/ }).locator(':scope > li');
    assert.equal(await routes.count(), 4);
    const route = (n) => section.locator(`li[data-route="${n}"]`);
    await route(1).getByText('Route 1').waitFor();
    await route(1).getByText('path starts with /admin').waitFor();
    await route(1).getByText('→ resolver admin').waitFor();
    await route(2).getByText('header x-canary is “1”').waitFor();
    await route(2).getByText('→ resolver web · subset v2').waitFor();
    await route(3).getByText('path matches regex ^/api/v[0-9]+/').waitFor();
    await route(3).getByText('query debug is present').waitFor();
    await route(3).getByText('method GET or HEAD').waitFor();
    await route(3).getByText('request timeout 2s').waitFor();
    await route(3).getByText('retries up to 3, on status 503').waitFor();
    await route(4).and(page.locator('[data-default="yes"]')).getByText('Default route').waitFor();
    await route(4).getByText('any other request').waitFor();
    await route(4).getByText('→ splitter of web').waitFor();
    assert.deepEqual(await routes.evaluateAll((ls) => ls.map((l) => l.dataset.next)),
      [`resolver:${ADMIN}`, `resolver:${V2}`, `resolver:${V1}`, WEB_SPLITTER]);

    // The split, as percentages.
    const split = (n) => section.locator(`li[data-split="${n}"]`);
    await split(1).locator('.split-weight', { hasText: /^90%$/ }).waitFor();
    await split(1).getByText('of requests → resolver web · subset v1').waitFor();
    await split(2).locator('.split-weight', { hasText: /^10%$/ }).waitFor();
    await split(2).getByText('of requests → resolver web · subset v2').waitFor();

    // Resolvers: subsets with their filters, the connect timeout, failover in order.
    const v1 = section.locator(`li.chain-box[data-node="resolver:${V1}"]`);
    await v1.getByText('Subset v1', { exact: true }).waitFor();
    await v1.getByText('Service.Meta.version == v1').waitFor();
    await v1.getByText('Connect timeout 3s').waitFor();
    await v1.getByText('→ target web · subset v1 in dc1').waitFor();
    await v1.getByRole('list', { name: /^Failover targets/ }).getByText('1. web · subset v1 in dc2').waitFor();
    const v2 = section.locator(`li.chain-box[data-node="resolver:${V2}"]`);
    await v2.getByText('Service.Meta.version == v2').waitFor();
    await v2.getByText('Only instances with passing checks').waitFor();
    await v2.getByText('1. web · subset v2 in dc2').waitFor();
    const admin = section.locator(`li.chain-box[data-node="resolver:${ADMIN}"]`);
    await admin.getByText('Defaults: no service-resolver for admin').waitFor();
    await admin.getByText('Connect timeout 5s').waitFor();

    // Targets: service, subset, datacenter; the dc2 ones marked as failover targets in words.
    const target = (id) => section.locator(`li[data-target-id="${id}"]`);
    await target(V1).getByText('Datacenter dc1', { exact: true }).waitFor();
    assert.equal(await target(V1).getAttribute('data-role'), 'primary');
    await target(V1_DC2).getByText('Failover target').waitFor();
    await target(V1_DC2).getByText('Datacenter dc2', { exact: true }).waitFor();
    await target(V1_DC2).getByText('Subset v1', { exact: true }).waitFor();
    await target(V1_DC2).getByText('Failover 1 for web · subset v1 in dc1').waitFor();
    assert.equal(await target(V1_DC2).getAttribute('data-role'), 'failover');
    await target(ADMIN).getByText('All instances').waitFor();
    assert.deepEqual(await section.locator('li[data-target-id]').evaluateAll((ls) => ls.map((l) => l.dataset.targetId)),
      [ADMIN, V2, V2_DC2, V1, V1_DC2]);

    // The edges: every step of the chain, and the failover edges as their own kind.
    assert.deepEqual(await edges(section), [
      `failover resolver:${V1} -> target:${V1_DC2} #1`,
      `failover resolver:${V2} -> target:${V2_DC2} #1`,
      `route ${WEB_ROUTER} -> ${WEB_SPLITTER} #4`,
      `route ${WEB_ROUTER} -> resolver:${ADMIN} #1`,
      `route ${WEB_ROUTER} -> resolver:${V1} #3`,
      `route ${WEB_ROUTER} -> resolver:${V2} #2`,
      `split ${WEB_SPLITTER} -> resolver:${V1} #1`,
      `split ${WEB_SPLITTER} -> resolver:${V2} #2`,
      `start service -> ${WEB_ROUTER} #1`,
      `target resolver:${ADMIN} -> target:${ADMIN} #1`,
      `target resolver:${V1} -> target:${V1} #1`,
      `target resolver:${V2} -> target:${V2} #1`,
    ].sort());
    const failoverEdge = section.locator(`path.edge[data-kind="failover"][data-to="target:${V1_DC2}"]`);
    assert.match(await failoverEdge.getAttribute('class'), /edge-failover/);
    assert.equal(await section.locator(`text.edge-label[data-to="target:${V1_DC2}"]`).textContent(), 'failover 1');
    // Dashed, not only another colour.
    assert.notEqual(await failoverEdge.evaluate((p) => getComputedStyle(p).strokeDasharray), 'none');
    assert.equal(await section.locator('path.edge[data-kind="route"]').first().evaluate((p) => getComputedStyle(p).strokeDasharray), 'none');
    await section.getByRole('list', { name: 'Legend' }).getByText(/^failover, tried in the numbered order/).waitFor();
    assert.deepEqual(await edgeGeometry(section), []);

    // A live change: the split becomes 50/50 and the router goes away, without a reload.
    await putConfig({ Kind: 'service-splitter', Name: 'web', Splits: [{ Weight: 50, ServiceSubset: 'v1' }, { Weight: 50, ServiceSubset: 'v2' }] });
    await split(1).locator('.split-weight', { hasText: /^50%$/ }).waitFor();
    await split(2).locator('.split-weight', { hasText: /^50%$/ }).waitFor();
    await deleteConfig('service-router', 'web');
    await section.locator('.chain-col[data-column="routes"]').waitFor({ state: 'detached' });
    await section.getByText('No service-router for “web”: every request takes the same way.').waitFor();
    await section.locator(`path.edge[data-kind="start"][data-to="${WEB_SPLITTER}"]`).waitFor({ state: 'attached' });
    assert.deepEqual(await columns(section), ['service', 'splits', 'resolvers', 'targets']);
    assert.deepEqual(await edgeGeometry(section), []);

    // A target is a link to its service's page, which has its own (default) chain.
    await target(ADMIN).waitFor({ state: 'detached' });
    await putConfig({ Kind: 'service-splitter', Name: 'web', Splits: [{ Weight: 80, ServiceSubset: 'v1' }, { Weight: 20, Service: 'admin' }] });
    await target(ADMIN).getByRole('link', { name: 'admin' }).click();
    await page.waitForURL(/#\/services\/admin$/);
    await page.getByRole('heading', { level: 1, name: 'admin' }).waitFor();
    const adminSection = routing(page);
    await adminSection.locator(`path.edge[data-kind="target"][data-to="target:${ADMIN}"]`).waitFor({ state: 'attached' });
    await adminSection.getByText('No service-router, service-splitter or service-resolver applies to “admin”').waitFor();
    assert.deepEqual(await columns(adminSection), ['service', 'resolvers', 'targets']);

    // A resolver that redirects: "legacy" is served by web's subset v2, and says so.
    await putConfig({ Kind: 'service-defaults', Name: 'legacy', Protocol: 'http' });
    await putConfig({ Kind: 'service-resolver', Name: 'legacy', Redirect: { Service: 'web', ServiceSubset: 'v2' } });
    await page.goto(`${env.agent.baseUrl}/ui/#/services/legacy`);
    const legacy = routing(page);
    await legacy.locator(`path.edge[data-kind="failover"][data-to="target:${V2_DC2}"]`).waitFor({ state: 'attached' });
    assert.deepEqual(await edges(legacy), [
      `failover resolver:${V2} -> target:${V2_DC2} #1`,
      `start service -> resolver:${V2} #1`,
      `target resolver:${V2} -> target:${V2} #1`,
    ]);
    await legacy.locator(`li.chain-box[data-node="resolver:${V2}"]`).getByText('Redirect from legacy').waitFor();
    await legacy.locator('li[data-node="service"]').getByText('→ resolver web · subset v2').waitFor();
    assert.deepEqual(await edgeGeometry(legacy), []);

    assert.deepEqual(problems.pageErrors, []);
    assert.deepEqual(problems.consoleErrors, []);
  } finally {
    await context.close();
    await env.agent.call('DELETE', '/v1/config/service-resolver/legacy');
    for (const kind of ['service-router', 'service-splitter', 'service-resolver']) await env.agent.call('DELETE', `/v1/config/${kind}/web`);
  }
});

test('a tcp service shows service → resolver → target, says why it has no routes, and shows failover as it is written', { timeout: 60_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  const PG = 'postgres.default.default.dc1';
  try {
    await page.goto(`${env.agent.baseUrl}/ui/#/services/postgres`);
    await page.getByRole('heading', { level: 1, name: 'postgres' }).waitFor();
    const section = routing(page);
    await section.locator(`path.edge[data-kind="target"][data-to="target:${PG}"]`).waitFor({ state: 'attached' });
    assert.equal(await section.getAttribute('data-protocol'), 'tcp');
    await section.locator('[data-note="tcp"]').getByText('“postgres” speaks tcp: its traffic is routed per connection, not per request, so it has no routes or splits.').waitFor();
    await section.locator('[data-note="default"]').waitFor();
    assert.deepEqual(await columns(section), ['service', 'resolvers', 'targets']);
    assert.deepEqual(await edges(section), [
      `start service -> resolver:${PG} #1`,
      `target resolver:${PG} -> target:${PG} #1`,
    ]);
    assert.equal(await section.locator('li[data-route], li[data-split]').count(), 0);
    const resolver = section.locator(`li.chain-box[data-node="resolver:${PG}"]`);
    await resolver.getByText('Defaults: no service-resolver for postgres').waitFor();
    await section.locator(`li[data-target-id="${PG}"]`).getByText('Datacenter dc1', { exact: true }).waitFor();
    assert.deepEqual(await edgeGeometry(section), []);

    // A resolver with two failover targets: they are drawn in the order written.
    await putConfig({
      Kind: 'service-resolver', Name: 'postgres', ConnectTimeout: '2s',
      Failover: { '*': { Targets: [{ Service: 'postgres-replica' }, { Datacenter: 'dc2' }] } },
    });
    await section.locator('path.edge[data-kind="failover"][data-index="2"]').waitFor({ state: 'attached' });
    await section.locator('[data-note="default"]').waitFor({ state: 'detached' });
    await section.locator('[data-note="tcp"]').waitFor();
    await resolver.getByText('Connect timeout 2s').waitFor();
    await resolver.getByText('1. postgres-replica in dc1').waitFor();
    await resolver.getByText('2. postgres in dc2').waitFor();
    assert.deepEqual(await edges(section), [
      `failover resolver:${PG} -> target:postgres-replica.default.default.dc1 #1`,
      `failover resolver:${PG} -> target:postgres.default.default.dc2 #2`,
      `start service -> resolver:${PG} #1`,
      `target resolver:${PG} -> target:${PG} #1`,
    ]);
    assert.deepEqual(await section.locator('text.edge-label').allTextContents(), ['failover 1', 'failover 2']);
    await section.locator('li[data-target-id="postgres.default.default.dc2"]').getByText('Failover 2 for postgres in dc1').waitFor();
    assert.deepEqual(await edgeGeometry(section), []);

    // A sidecar proxy is not routed to by name: its page has no Routing section.
    const reg = await env.agent.call('PUT', '/v1/agent/service/register', { Name: 'billing', Port: 9000, Connect: { SidecarService: {} } });
    assert.equal(reg.status, 200, reg.text);
    await page.goto(`${env.agent.baseUrl}/ui/#/services/billing-sidecar-proxy`);
    await page.locator('li[data-instance="billing-sidecar-proxy"]').waitFor();
    await page.locator('section.routing').waitFor({ state: 'hidden' });
    await page.goto(`${env.agent.baseUrl}/ui/#/services/billing`);
    await routing(page).locator('path.edge[data-kind="target"]').waitFor({ state: 'attached' });

    assert.deepEqual(problems.pageErrors, []);
    assert.deepEqual(problems.consoleErrors, []);
  } finally {
    await context.close();
    await env.agent.call('DELETE', '/v1/config/service-resolver/postgres');
  }
});

test('an API error is shown in the Routing section, the rest of the page still works, and the diagram comes back', { timeout: 60_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    let failing = true;
    await page.route('**/v1/discovery-chain/**', (route) => (failing
      ? route.fulfill({ status: 500, contentType: 'text/plain', body: 'discovery chain "web": compile failed' })
      : route.continue()));
    await page.goto(`${env.agent.baseUrl}/ui/#/services/web`);
    const section = routing(page);
    const alert = section.getByRole('alert');
    await alert.getByText('Could not load the routing chain of this service.').waitFor();
    await alert.getByText('discovery chain "web": compile failed (HTTP 500)').waitFor();
    await alert.getByText('Retrying automatically…').waitFor();
    await page.locator('li[data-instance="web-1"]').waitFor(); // the instances are unaffected
    assert.equal(await section.locator('svg.chain-edges').count(), 0);

    failing = false;
    await section.locator('path.edge[data-kind="start"]').waitFor({ state: 'attached' });
    await alert.waitFor({ state: 'detached' });

    assert.deepEqual(problems.pageErrors, []);
    // The browser logs the failed requests themselves; nothing else may be logged.
    assert.deepEqual(problems.consoleErrors.filter((e) => !e.includes('status of 500')), []);
  } finally {
    await context.close();
  }
});
