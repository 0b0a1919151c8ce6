// Key/Value: browse, create, edit and delete through the UI.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { seededSuite, openPage } from './lib/harness.mjs';

const env = seededSuite('kv');

test('browses folders and shows values as text and formatted JSON', { timeout: 45_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/#/kv/`);
    await page.getByRole('link', { name: 'config/ (folder)' }).click();
    await page.waitForURL(/#\/kv\/config\/$/);
    await page.getByRole('link', { name: 'app/ (folder)' }).click();
    await page.waitForURL(/#\/kv\/config\/app\/$/);
    await page.getByRole('link', { name: 'name (key)' }).click();
    await page.waitForURL(/#\/kv\/config\/app\/name$/);
    // Server strings are text, never markup.
    await page.locator('.kv-value').getByText('trellis <b>demo</b>', { exact: true }).waitFor();
    assert.equal(await page.locator('.kv-value b').count(), 0);

    await page.getByRole('navigation', { name: 'Breadcrumb' }).getByRole('link', { name: 'app/' }).click();
    await page.getByRole('link', { name: 'settings (key)' }).click();
    await page.getByRole('heading', { name: 'JSON (formatted)' }).waitFor();
    const text = await page.locator('.kv-value').textContent();
    assert.equal(text, JSON.stringify({ replicas: 3, regions: ['eu', 'us'], debug: false }, null, 2));
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});

test('creates, edits and deletes a key, with confirmation', { timeout: 60_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    await page.goto(`${env.agent.baseUrl}/ui/#/kv/config/`);
    await page.getByRole('link', { name: 'app/ (folder)' }).waitFor();

    // Create config/ui-test/greeting (a new sub-folder on the way).
    await page.getByRole('button', { name: 'Create' }).click();
    await page.getByLabel('Key', { exact: true }).fill('ui-test/greeting');
    await page.getByLabel('Value', { exact: true }).fill('hello from the browser');
    await page.getByRole('button', { name: 'Save' }).click();
    await page.waitForURL(/#\/kv\/config\/ui-test\/greeting$/);
    await page.locator('.kv-value').getByText('hello from the browser', { exact: true }).waitFor();
    assert.equal(await env.agent.kvGet('config/ui-test/greeting'), 'hello from the browser');

    // Creating the same key again is refused rather than overwriting it.
    await page.goto(`${env.agent.baseUrl}/ui/#/kv/config/ui-test/`);
    await page.getByRole('link', { name: 'greeting (key)' }).waitFor();
    await page.getByRole('button', { name: 'Create' }).click();
    await page.getByLabel('Key', { exact: true }).fill('greeting');
    await page.getByLabel('Value', { exact: true }).fill('overwrite?');
    await page.getByRole('button', { name: 'Save' }).click();
    await page.getByRole('alert').getByText('already exists').waitFor();
    assert.equal(await env.agent.kvGet('config/ui-test/greeting'), 'hello from the browser');
    await page.getByRole('button', { name: 'Cancel' }).click();

    // Edit.
    await page.getByRole('link', { name: 'greeting (key)' }).click();
    await page.getByRole('button', { name: 'Edit' }).click();
    const editor = page.getByLabel('Value of config/ui-test/greeting');
    assert.equal(await editor.inputValue(), 'hello from the browser');
    await editor.fill('{"greeting": "hi", "n": 2}');
    await page.getByRole('button', { name: 'Save' }).click();
    await page.getByRole('heading', { name: 'JSON (formatted)' }).waitFor();
    await page.locator('.kv-value').getByText('"greeting": "hi"').waitFor();
    assert.equal(await env.agent.kvGet('config/ui-test/greeting'), '{"greeting": "hi", "n": 2}');

    // Delete: cancelling the dialog keeps the key.
    await page.getByRole('button', { name: 'Delete' }).click();
    const dialog = page.getByRole('dialog', { name: 'Delete key?' });
    await dialog.waitFor();
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    await dialog.waitFor({ state: 'detached' });
    assert.equal(await env.agent.kvGet('config/ui-test/greeting'), '{"greeting": "hi", "n": 2}');

    await page.getByRole('button', { name: 'Delete' }).click();
    await dialog.getByRole('button', { name: 'Delete key' }).click();
    await page.waitForURL(/#\/kv\/config\/ui-test\/$/);
    await page.getByText('This folder is empty.').waitFor();
    assert.equal(await env.agent.kvGet('config/ui-test/greeting'), null);
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});

test('deletes a folder recursively and follows changes made elsewhere', { timeout: 45_000 }, async () => {
  const { context, page, problems } = await openPage(env.browser);
  try {
    await env.agent.kvPut('tmp/a', '1');
    await env.agent.kvPut('tmp/sub/b', '2');
    await page.goto(`${env.agent.baseUrl}/ui/#/kv/tmp/`);
    await page.getByRole('link', { name: 'a (key)' }).waitFor();
    // A key written by someone else appears without a reload.
    await env.agent.kvPut('tmp/c', '3');
    await page.getByRole('link', { name: 'c (key)' }).waitFor();

    await page.getByRole('button', { name: 'Delete folder' }).click();
    const dialog = page.getByRole('dialog', { name: 'Delete folder?' });
    await dialog.getByText('“tmp/”').waitFor();
    await dialog.getByRole('button', { name: 'Delete folder' }).click();
    await page.waitForURL(/#\/kv\/$/);
    await page.getByRole('link', { name: 'config/ (folder)' }).waitFor();
    assert.equal(await page.getByRole('link', { name: 'tmp/ (folder)' }).count(), 0);
    assert.equal(await env.agent.kvGet('tmp/a'), null);
    assert.equal(await env.agent.kvGet('tmp/sub/b'), null);
    assert.deepEqual(problems.pageErrors, []);
  } finally {
    await context.close();
  }
});
