// Service mesh: the Intentions page (create, edit, delete, API errors) and the mesh part
// of a service page (membership, sidecar, upstreams, allowed callers).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { seededSuite, openPage, entity } from './lib/harness.mjs';

const env = seededSuite('mesh');

/** The intention as the API reads it, or null when there is none. */
async function intention(source, destination) {
  const r = await env.agent.call('GET', `/v1/connect/intentions/exact?source=${encodeURIComponent(source)}&destination=${encodeURIComponent(destination)}`);
  if (r.status === 404) return null;
  assert.equal(r.status, 200, r.text);
  return r.json;
}

async function putIntention(source, destination, body) {
  const r = await env.agent.call('PUT', `/v1/connect/intentions/exact?source=${encodeURIComponent(source)}&destination=${encodeURIComponent(destination)}`, body);
  assert.equal(r.status, 200, r.text);
}

const row = (page, source, destination) => page.locator(`.intention-rows li[data-source="${source}"][data-destination="${destination}"]`);

test('creates an intention, lists it by precedence, edits it to deny and deletes it', { timeout: 60_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/#/services`);
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Intentions' }).click();
    await page.waitForURL(/#\/intentions$/);
    await page.getByRole('heading', { level: 1, name: /^Intentions/ }).waitFor();
    await page.getByText('There are no intentions yet.').waitFor();
    // The dev agent sets no default policy and has ACLs off: unmatched connections are allowed.
    await page.locator('.policy-note[data-policy="allow"]').getByText('Connections that no intention matches are allowed').waitFor();

    // Create web -> postgres (allow).
    await page.getByRole('button', { name: 'Create' }).click();
    const form = page.getByRole('form', { name: 'Create intention' });
    await form.getByLabel('Source service').fill('web');
    await form.getByLabel('Destination service').fill('postgres');
    assert.equal(await form.getByLabel(/^Allow/).isChecked(), true, 'allow is the default action');
    await form.getByLabel(/^Description/).fill('web reads <b>orders</b>');
    await form.getByRole('button', { name: 'Save' }).click();
    await form.waitFor({ state: 'detached' });
    await page.getByRole('status').getByText('Created the intention web → postgres (allow).').waitFor();
    const webPg = row(page, 'web', 'postgres');
    await webPg.locator('.action-allow').waitFor();
    await webPg.getByText('web reads <b>orders</b>', { exact: true }).waitFor(); // text, never markup
    assert.equal((await webPg.locator('.precedence').textContent()).trim(), '9');
    let got = await intention('web', 'postgres');
    assert.equal(got.Action, 'allow');
    assert.equal(got.Description, 'web reads <b>orders</b>');

    // A wildcard source deny; the API's order (highest precedence first) is kept.
    await page.getByRole('button', { name: 'Create' }).click();
    await form.getByLabel('Source service').fill('*');
    await form.getByLabel('Destination service').fill('postgres');
    await form.getByLabel(/^Deny/).check();
    await form.getByRole('button', { name: 'Save' }).click();
    const anyPg = row(page, '*', 'postgres');
    await anyPg.locator('.action-deny').waitFor();
    await anyPg.getByText('(any service)').waitFor();
    assert.equal((await anyPg.locator('.precedence').textContent()).trim(), '8');
    const order = await page.locator('.intention-rows > li').evaluateAll((lis) => lis.map((li) => `${li.dataset.source}>${li.dataset.destination}`));
    assert.deepEqual(order, ['web>postgres', '*>postgres']);
    assert.equal((await intention('*', 'postgres')).Action, 'deny');

    // Creating the same pair again is refused rather than overwriting it.
    await page.getByRole('button', { name: 'Create' }).click();
    await form.getByLabel('Source service').fill('web');
    await form.getByLabel('Destination service').fill('postgres');
    await form.getByLabel(/^Deny/).check();
    await form.getByRole('button', { name: 'Save' }).click();
    await form.getByRole('alert').getByText('An intention from “web” to “postgres” already exists.').waitFor();
    assert.equal((await intention('web', 'postgres')).Action, 'allow');

    // A 4xx from the API is shown with its body text.
    await form.getByLabel('Source service').fill('team/web');
    await form.getByRole('button', { name: 'Save' }).click();
    await form.getByRole('alert').getByText('Could not save: namespaces are a consul enterprise feature (HTTP 400)').waitFor();
    await form.getByRole('button', { name: 'Cancel' }).click();
    await form.waitFor({ state: 'detached' });

    // Edit web -> postgres to deny with a new description.
    await webPg.getByRole('button', { name: 'Edit intention web → postgres' }).click();
    const edit = page.getByRole('form', { name: 'Edit intention web → postgres' });
    assert.equal(await edit.getByLabel(/^Allow/).isChecked(), true);
    assert.equal(await edit.getByLabel('Description').inputValue(), 'web reads <b>orders</b>');
    await edit.getByLabel(/^Deny/).check();
    await edit.getByLabel('Description').fill('blocked during the migration');
    await edit.getByRole('button', { name: 'Save' }).click();
    await edit.waitFor({ state: 'detached' });
    await webPg.locator('.action-deny').waitFor();
    await webPg.getByText('blocked during the migration').waitFor();
    got = await intention('web', 'postgres');
    assert.equal(got.Action, 'deny');
    assert.equal(got.Description, 'blocked during the migration');

    // Delete: cancelling the dialog keeps it; confirming removes it.
    await webPg.getByRole('button', { name: 'Delete intention web → postgres' }).click();
    const dialog = page.getByRole('dialog', { name: 'Delete intention?' });
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    await dialog.waitFor({ state: 'detached' });
    assert.notEqual(await intention('web', 'postgres'), null);
    await webPg.getByRole('button', { name: 'Delete intention web → postgres' }).click();
    await dialog.getByRole('button', { name: 'Delete intention' }).click();
    await webPg.waitFor({ state: 'detached' });
    await anyPg.waitFor();
    assert.equal(await intention('web', 'postgres'), null);

    // A change made elsewhere shows up without a reload.
    await putIntention('*', 'postgres', { Action: 'allow', Description: 'opened by the API' });
    await anyPg.locator('.action-allow').waitFor();
    await anyPg.getByText('opened by the API').waitFor();
    // The wildcard one is deleted through the UI as well.
    await anyPg.getByRole('button', { name: 'Delete intention * → postgres' }).click();
    await dialog.getByText('from “*” to “postgres”').waitFor();
    await dialog.getByRole('button', { name: 'Delete intention' }).click();
    await page.getByText('There are no intentions yet.').waitFor();
    assert.equal(await intention('*', 'postgres'), null);

    assert.deepEqual(problems.pageErrors, []);
    // The browser logs the refused request itself; nothing else may be logged.
    assert.deepEqual(problems.consoleErrors.filter((e) => !(e.includes('status of 400') && e.includes('source=team%2Fweb'))), []);
  } finally {
    await context.close();
  }
});

test('an L7 intention is marked L7 and keeps its permissions when its description is edited', { timeout: 45_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    let r = await env.agent.call('PUT', '/v1/config', { Kind: 'service-defaults', Name: 'web', Protocol: 'http' });
    assert.equal(r.status, 200, r.text);
    const permissions = [{ Action: 'allow', HTTP: { PathPrefix: '/api/' } }];
    r = await env.agent.call('PUT', '/v1/config', { Kind: 'service-intentions', Name: 'web', Sources: [{ Name: 'postgres', Permissions: permissions }] });
    assert.equal(r.status, 200, r.text);

    await page.goto(`${env.agent.baseUrl}/ui/#/intentions`);
    const l7 = row(page, 'postgres', 'web');
    await l7.locator('.action-l7', { hasText: 'L7' }).waitFor();
    await l7.getByText('1 L7 permission').click();
    await l7.getByText('"PathPrefix": "/api/"').waitFor();

    await l7.getByRole('button', { name: 'Edit intention postgres → web' }).click();
    const edit = page.getByRole('form', { name: 'Edit intention postgres → web' });
    await edit.getByText('This intention has L7 permissions').waitFor();
    assert.equal(await edit.getByRole('radio').count(), 0, 'no allow/deny choice for an L7 intention');
    await edit.getByLabel('Description').fill('only the API paths');
    await edit.getByRole('button', { name: 'Save' }).click();
    await l7.getByText('only the API paths').waitFor();
    const got = await intention('postgres', 'web');
    assert.equal(got.Description, 'only the API paths');
    assert.deepEqual(got.Permissions, permissions);
    assert.equal(got.Action ?? '', '');

    await env.agent.call('DELETE', '/v1/config/service-intentions/web');
    await l7.waitFor({ state: 'detached' });
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});

test('a service page shows mesh membership, its sidecar, upstreams and allowed callers', { timeout: 60_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    const reg = await env.agent.call('PUT', '/v1/agent/service/register', {
      Name: 'billing', Port: 9000,
      Connect: { SidecarService: { Proxy: { Upstreams: [{ DestinationName: 'db', LocalBindPort: 9191 }] } } },
    });
    assert.equal(reg.status, 200, reg.text);
    // The agent's own view has the sidecar at once (the catalog gets it by anti-entropy).
    const sidecar = await env.agent.call('GET', '/v1/agent/service/billing-sidecar-proxy');
    assert.equal(sidecar.status, 200, sidecar.text);
    const proxyPort = sidecar.json.Port;
    assert.ok(proxyPort > 0);

    await page.goto(`${env.agent.baseUrl}/ui/#/services/billing`);
    await page.getByRole('heading', { level: 1, name: 'billing' }).waitFor();
    const mesh = page.getByRole('region', { name: 'Service mesh' });
    await mesh.and(page.locator('[data-mesh="yes"]')).waitFor();
    await page.locator('.summary .badge-mesh', { hasText: 'In the service mesh' }).waitFor();
    await mesh.getByText('“billing” is in the service mesh: 1 sidecar proxy carries its traffic.').waitFor();

    // The sidecar: its node, address:port and health.
    const sc = mesh.getByRole('list', { name: 'Sidecar proxies' }).locator('li[data-sidecar="billing-sidecar-proxy"]');
    await sc.getByRole('link', { name: 'billing-sidecar-proxy' }).waitFor();
    await sc.getByText('for billing').waitFor();
    await sc.getByRole('link', { name: 'ui-test' }).waitFor();
    await sc.getByText(`127.0.0.1:${proxyPort}`, { exact: true }).waitFor();
    await sc.locator('.health-summary .status').first().waitFor();

    // The upstream from the sidecar's registration.
    const up = mesh.getByRole('table', { name: 'Upstreams' }).locator('tr[data-upstream="db"]');
    await up.getByRole('link', { name: 'db' }).waitFor();
    await up.getByText('local', { exact: true }).waitFor();
    await up.getByText('127.0.0.1:9191', { exact: true }).waitFor();

    // No intentions yet: the default policy is what applies.
    await mesh.getByText('No intention names “billing” or “*” as its destination.').waitFor();
    await mesh.locator('.policy-note[data-policy="allow"]').waitFor();

    // Intentions created elsewhere appear live, in evaluation order.
    await putIntention('web', 'billing', { Action: 'allow', Description: 'checkout' });
    await putIntention('*', 'billing', { Action: 'deny' });
    const callers = mesh.getByRole('list', { name: 'Intentions for billing' });
    const webCaller = callers.locator('li[data-source="web"]');
    await webCaller.locator('.action-allow').waitFor();
    await webCaller.getByText('checkout').waitFor();
    await callers.locator('li[data-source="*"] .action-deny').waitFor();
    const order = await callers.locator('li').evaluateAll((lis) => lis.map((li) => li.dataset.source));
    assert.deepEqual(order, ['web', '*']);
    await webCaller.getByRole('link', { name: 'web' }).click();
    await page.waitForURL(/#\/services\/web$/);

    // A service with neither a sidecar nor connect-native instances is not in the mesh.
    await page.getByRole('region', { name: 'Service mesh' }).and(page.locator('[data-mesh="no"]')).waitFor();
    await page.getByText('“web” is not in the service mesh').waitFor();

    // The sidecar's own page names the service it is the sidecar of.
    await page.goto(`${env.agent.baseUrl}/ui/#/services/billing-sidecar-proxy`);
    const proxyMesh = page.getByRole('region', { name: 'Service mesh' });
    await proxyMesh.locator('.proxy-for').getByText('is the sidecar proxy of').waitFor();
    await proxyMesh.locator('.proxy-for').getByRole('link', { name: 'billing' }).waitFor();
    await proxyMesh.getByText('127.0.0.1:9000', { exact: true }).waitFor();
    await proxyMesh.locator('tr[data-upstream="db"]').getByText('127.0.0.1:9191').waitFor();
    await page.locator('li[data-instance="billing-sidecar-proxy"]').getByText('connect-proxy').waitFor();
    await proxyMesh.locator('.proxy-for').getByRole('link', { name: 'billing' }).click();
    await page.waitForURL(/#\/services\/billing$/);
    await page.getByRole('heading', { level: 1, name: 'billing' }).waitFor();

    // A connect-native service is in the mesh without a sidecar.
    await env.agent.register(entity({
      node: 'web-1', address: '192.0.2.11',
      service: { ID: 'ledger-1', Service: 'ledger', Port: 7000, Connect: { Native: true } },
    }));
    await page.goto(`${env.agent.baseUrl}/ui/#/services/ledger`);
    const nativeMesh = page.getByRole('region', { name: 'Service mesh' });
    await nativeMesh.and(page.locator('[data-mesh="yes"]')).waitFor();
    await nativeMesh.getByText('1 instance is connect-native').waitFor();
    await nativeMesh.locator('li[data-native="ledger-1"]').getByText('192.0.2.11:7000').waitFor();

    await env.agent.call('DELETE', '/v1/connect/intentions/exact?source=web&destination=billing');
    await env.agent.call('DELETE', '/v1/connect/intentions/exact?source=*&destination=billing');
    assert.deepEqual(problems.pageErrors, []);
    assert.deepEqual(problems.consoleErrors, []);
  } finally {
    await context.close();
  }
});
