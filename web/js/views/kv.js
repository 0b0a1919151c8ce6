// Key/Value browser (#/kv/<folder>/ and #/kv/<key>).
import { h, icon, defList } from '../dom.js';
import { request, watch, encodePath } from '../api.js';
import { link, navigate } from '../router.js';
import { pageHeader, emptyState, Region, confirmDialog } from '../common.js';

const kvHref = (path) => link(`/kv/${encodePath(path)}`);

/** Parent folder of a key or folder path ("" is the root). */
export function parentOf(path) {
  const trimmed = path.endsWith('/') ? path.slice(0, -1) : path;
  const i = trimmed.lastIndexOf('/');
  return i < 0 ? '' : trimmed.slice(0, i + 1);
}

function crumbs(path) {
  const out = [['Key/Value', path === '' ? null : kvHref('')]];
  const parts = path.split('/');
  const isFolder = path.endsWith('/');
  if (isFolder) parts.pop();
  let acc = '';
  parts.forEach((part, i) => {
    const last = i === parts.length - 1;
    acc += part + (last && !isFolder ? '' : '/');
    out.push([last && !isFolder ? part : `${part}/`, last ? null : kvHref(acc)]);
  });
  return out;
}

/** Decode a Consul base64 value: {text, bytes, binary}. */
export function decodeValue(b64) {
  if (!b64) return { text: '', bytes: 0, binary: false };
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  try {
    return { text: new TextDecoder('utf-8', { fatal: true }).decode(bytes), bytes: bytes.length, binary: false };
  } catch {
    return { text: b64, bytes: bytes.length, binary: true };
  }
}

function encodeValue(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = '';
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

function prettyJson(text) {
  const t = text.trim();
  if (!t || !/^[[{"\d-]|^(true|false|null)$/.test(t)) return null;
  try {
    const v = JSON.parse(t);
    if (v === null || typeof v !== 'object') return null; // only objects/arrays are worth formatting
    return JSON.stringify(v, null, 2);
  } catch {
    return null;
  }
}

export function kvView(ctx) {
  const path = ctx.params.path;
  if (path === '' || path.endsWith('/')) folderView(ctx, path);
  else keyView(ctx, path);
}

function folderView({ root, signal }, prefix) {
  const title = prefix === '' ? 'Key/Value' : prefix.slice(0, -1).split('/').pop() + '/';
  const createBtn = h('button', { type: 'button', class: 'button primary', 'aria-expanded': 'false', 'aria-controls': 'kv-create' }, 'Create');
  const deleteBtn = prefix === '' ? null : h('button', { type: 'button', class: 'button danger' }, 'Delete folder');
  const { header } = pageHeader(title, prefix === '' ? [] : crumbs(prefix), [createBtn, deleteBtn]);
  const formHost = h('div', { id: 'kv-create' });
  const listEl = h('div', { class: 'list-region' });
  root.append(header, formHost, listEl);
  const region = new Region(listEl);

  createBtn.addEventListener('click', () => {
    if (formHost.firstChild) return closeForm();
    createBtn.setAttribute('aria-expanded', 'true');
    formHost.append(createForm(prefix, closeForm, signal));
    formHost.querySelector('input').focus();
  });
  function closeForm() {
    formHost.replaceChildren();
    createBtn.setAttribute('aria-expanded', 'false');
    createBtn.focus();
  }

  deleteBtn?.addEventListener('click', async () => {
    const ok = await confirmDialog({
      title: 'Delete folder?',
      message: `This deletes the folder “${prefix}” and every key inside it. This cannot be undone.`,
      confirmLabel: 'Delete folder',
    });
    if (!ok) return;
    try {
      await request('DELETE', `kv/${encodePath(prefix)}`, { params: { recurse: true }, signal });
      navigate(`/kv/${encodePath(parentOf(prefix))}`);
    } catch (err) {
      if (err.name !== 'AbortError') region.error(err, { retrying: false, what: 'delete the folder' });
    }
  });

  watch(`kv/${encodePath(prefix)}`, {
    params: { keys: true, separator: '/' },
    allow404: true,
    signal,
    onData: (keys) => render(Array.isArray(keys) ? keys : []),
    onError: (err) => region.error(err),
  });

  function render(keys) {
    const entries = keys.filter((k) => k !== prefix && k.startsWith(prefix)).map((k) => ({
      key: k,
      name: k.slice(prefix.length),
      folder: k.endsWith('/'),
    }));
    entries.sort((a, b) => (b.folder - a.folder) || a.name.localeCompare(b.name));
    if (!entries.length) {
      return region.show(emptyState(prefix === '' ? 'There are no keys yet. Use “Create” to add one.' : 'This folder is empty.'));
    }
    region.show(h('ul', { class: 'rows kv-list', 'aria-label': 'Keys' }, entries.map((e) => h('li', { class: 'row kv-row', dataset: { key: e.key } },
      h('a', { class: 'row-title', href: kvHref(e.key) },
        icon(e.folder ? 'folder' : 'doc'),
        h('span', null, e.name),
        h('span', { class: 'visually-hidden' }, e.folder ? ' (folder)' : ' (key)'))))));
  }
}

function createForm(prefix, onCancel, signal) {
  const keyInput = h('input', { id: 'kv-new-key', name: 'key', required: true, autocomplete: 'off', spellcheck: 'false', 'aria-describedby': 'kv-new-key-hint' });
  const valueInput = h('textarea', { id: 'kv-new-value', name: 'value', rows: '8', spellcheck: 'false' });
  const errorEl = h('div', { class: 'form-error', role: 'alert' });
  const save = h('button', { type: 'submit', class: 'button primary' }, 'Save');
  const form = h('form', { class: 'panel kv-form', 'aria-label': 'Create key' },
    h('h2', { class: 'section-title' }, 'Create a key'),
    h('div', { class: 'field' },
      h('label', { for: 'kv-new-key' }, 'Key'),
      h('div', { class: 'input-prefix' }, prefix ? h('span', { class: 'prefix mono' }, prefix) : null, keyInput),
      h('p', { class: 'hint', id: 'kv-new-key-hint' }, 'End the name with “/” to create a folder.')),
    h('div', { class: 'field' },
      h('label', { for: 'kv-new-value' }, 'Value'),
      valueInput),
    errorEl,
    h('div', { class: 'form-actions' }, save, h('button', { type: 'button', class: 'button', onclick: onCancel }, 'Cancel')));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    errorEl.replaceChildren();
    const name = keyInput.value;
    if (!name.trim()) return errorEl.append('Enter a key name.');
    if (name.startsWith('/')) return errorEl.append('Key names cannot start with “/”.');
    const key = prefix + name;
    const isFolder = key.endsWith('/');
    save.disabled = true;
    try {
      const { data } = await request('PUT', `kv/${encodePath(key)}`, { params: { cas: 0 }, body: isFolder ? '' : valueInput.value, signal });
      if (data === false) {
        errorEl.append(`“${key}” already exists. Open it to edit its value.`);
        return;
      }
      navigate(`/kv/${encodePath(key)}`);
    } catch (err) {
      if (err.name !== 'AbortError') errorEl.append(`Could not save: ${err.message}`);
    } finally {
      save.disabled = false;
    }
  });
  form.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') onCancel();
  });
  return form;
}

function keyView({ root, signal }, key) {
  const name = key.split('/').pop();
  const editBtn = h('button', { type: 'button', class: 'button' }, 'Edit');
  const deleteBtn = h('button', { type: 'button', class: 'button danger' }, 'Delete');
  const { header } = pageHeader(name, crumbs(key), [editBtn, deleteBtn]);
  const body = h('div', { class: 'kv-body' });
  root.append(header, body);
  const region = new Region(body);

  let entry; // undefined until loaded; null when missing
  let editing = null; // {textarea, baseIndex, changed}

  watch(`kv/${encodePath(key)}`, {
    allow404: true,
    signal,
    onData: (data) => {
      const next = Array.isArray(data) && data.length ? data[0] : null;
      if (editing) {
        if ((next?.ModifyIndex ?? -1) !== editing.baseIndex) markChangedWhileEditing(next);
        entry = next;
        return;
      }
      entry = next;
      render();
    },
    onError: (err) => region.error(err),
  });

  editBtn.addEventListener('click', () => startEdit());
  deleteBtn.addEventListener('click', async () => {
    const ok = await confirmDialog({
      title: 'Delete key?',
      message: `This deletes the key “${key}”. This cannot be undone.`,
      confirmLabel: 'Delete key',
    });
    if (!ok) return;
    try {
      await request('DELETE', `kv/${encodePath(key)}`, { signal });
      navigate(`/kv/${encodePath(parentOf(key))}`);
    } catch (err) {
      if (err.name !== 'AbortError') region.error(err, { retrying: false, what: 'delete the key' });
    }
  });

  function render() {
    editBtn.hidden = deleteBtn.hidden = !entry;
    if (!entry) {
      return region.show(emptyState(`The key “${key}” does not exist. It may have been deleted.`),
        h('p', null, h('a', { href: kvHref(parentOf(key)) }, 'Back to folder')));
    }
    const value = decodeValue(entry.Value);
    editBtn.disabled = value.binary;
    editBtn.title = value.binary ? 'Binary values cannot be edited here' : '';
    const pretty = value.binary ? null : prettyJson(value.text);
    let valueEl;
    let label;
    if (value.binary) {
      label = 'Binary value (shown as base64)';
      valueEl = h('pre', { class: 'kv-value', tabindex: '0' }, value.text);
    } else if (pretty !== null) {
      label = 'JSON (formatted)';
      valueEl = h('pre', { class: 'kv-value json', tabindex: '0' }, pretty);
    } else if (value.text === '') {
      label = 'Value';
      valueEl = h('p', { class: 'muted kv-empty' }, 'Empty value');
    } else {
      label = 'Value';
      valueEl = h('pre', { class: 'kv-value', tabindex: '0' }, value.text);
    }
    region.show(
      h('section', { class: 'panel', 'aria-label': 'Value' },
        h('div', { class: 'panel-head' }, h('h2', { class: 'section-title' }, label), h('span', { class: 'muted small' }, `${value.bytes} bytes`)),
        valueEl),
      defList([
        ['Key', h('code', null, entry.Key)],
        ['Flags', String(entry.Flags ?? 0)],
        ['Modify index', String(entry.ModifyIndex ?? '')],
        ['Create index', String(entry.CreateIndex ?? '')],
        ['Lock index', entry.LockIndex ? String(entry.LockIndex) : null],
        ['Session', entry.Session || null],
      ], 'props kv-props'));
  }

  function startEdit() {
    if (!entry || editing) return;
    const value = decodeValue(entry.Value);
    const textarea = h('textarea', { id: 'kv-edit-value', rows: String(Math.min(24, Math.max(8, value.text.split('\n').length + 2))), spellcheck: 'false' });
    textarea.value = value.text;
    const errorEl = h('div', { class: 'form-error', role: 'alert' });
    const notice = h('div', { class: 'notice', role: 'status' });
    const save = h('button', { type: 'submit', class: 'button primary' }, 'Save');
    const cancel = h('button', { type: 'button', class: 'button', onclick: () => stopEdit() }, 'Cancel');
    const form = h('form', { class: 'panel kv-form', 'aria-label': 'Edit value' },
      h('div', { class: 'field' }, h('label', { for: 'kv-edit-value' }, `Value of ${key}`), textarea),
      notice, errorEl,
      h('div', { class: 'form-actions' }, save, cancel));
    editing = { baseIndex: entry.ModifyIndex, notice };
    editBtn.hidden = deleteBtn.hidden = true;
    form.addEventListener('keydown', (ev) => { if (ev.key === 'Escape') stopEdit(); });
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      errorEl.replaceChildren();
      save.disabled = true;
      try {
        const { data } = await request('PUT', `kv/${encodePath(key)}`, { params: { cas: editing.baseIndex }, body: textarea.value, signal });
        if (data === false) {
          errorEl.append('Not saved: the key was changed or deleted by someone else after you started editing. Cancel to see the current value.');
          return;
        }
        // Show what was written until the blocking query brings the new index.
        if (entry) entry = { ...entry, Value: encodeValue(textarea.value) };
        stopEdit();
      } catch (err) {
        if (err.name !== 'AbortError') errorEl.append(`Could not save: ${err.message}`);
      } finally {
        save.disabled = false;
      }
    });
    region.show(form);
    textarea.focus();
  }

  function markChangedWhileEditing(next) {
    editing.notice.replaceChildren(next
      ? 'Someone else changed this key while you were editing. Saving will fail; cancel to see the new value.'
      : 'Someone else deleted this key while you were editing.');
  }

  function stopEdit() {
    editing = null;
    render();
    editBtn.focus();
  }
}
