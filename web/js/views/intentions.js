// Intentions (#/intentions): which services may connect to which through the mesh.
// Consul's intentions API keys an intention by its source and destination names
// (PUT/DELETE /v1/connect/intentions/exact?source=S&destination=D); "*" is the wildcard.
import { h, icon, plural } from '../dom.js';
import { get, request, watch, isRemoteDc, currentDc } from '../api.js';
import { link } from '../router.js';
import { pageHeader, filterBox, emptyState, Region, confirmDialog } from '../common.js';

export const WILDCARD = '*';

const keyOf = (i) => `${i.SourceName}\u0000${i.DestinationName}`;

/** True for an L7 intention: per-request Permissions instead of one Action. */
export function isL7(i) {
  return Array.isArray(i.Permissions) && i.Permissions.length > 0;
}

/** "allow", "deny" or "L7" as a pill with an icon (the text carries the meaning). */
export function actionBadge(i) {
  if (isL7(i)) {
    return h('span', { class: 'action action-l7', title: `${plural(i.Permissions.length, 'L7 permission')}, checked per request` }, icon('doc'), 'L7');
  }
  const a = String(i.Action || '');
  const cls = a === 'allow' || a === 'deny' ? a : 'other';
  return h('span', { class: `action action-${cls}` }, icon(a === 'allow' ? 'passing' : 'critical'), a || 'unknown');
}

/** Left-edge colour of a row or card for an intention. */
export function actionEdge(i) {
  if (isL7(i)) return 'status-edge-warning';
  return i.Action === 'allow' ? 'status-edge-passing' : 'status-edge-critical';
}

/** A service name as a link to its page; the wildcard as "* (any service)". */
export function serviceRef(name) {
  if (name === WILDCARD) {
    return h('span', { class: 'wildcard' }, h('code', null, '*'), ' ', h('span', { class: 'muted' }, '(any service)'));
  }
  return h('a', { class: 'service-ref', href: link(`/services/${encodeURIComponent(name)}`) }, name);
}

/** "web → api" for messages and accessible names. */
export function routeText(i) {
  return `${i.SourceName} → ${i.DestinationName}`;
}

/**
 * The default intention policy this agent applies when no intention matches, from
 * agent/self: {allow, configured, connectEnabled}; null when it cannot be read.
 */
export async function defaultPolicy(signal) {
  try {
    const { data } = await get('agent/self', { signal });
    const debug = data?.DebugConfig || {};
    const p = debug.DefaultIntentionPolicy;
    return { allow: p !== 'deny', configured: p === 'allow' || p === 'deny', connectEnabled: debug.ConnectEnabled !== false };
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    return null;
  }
}

/** One sentence on what happens to connections that no intention matches. */
export function policyNote(policy) {
  if (isRemoteDc()) {
    return h('p', { class: 'policy-note' }, `Connections that no intention matches follow the default intention policy of the agents in ${currentDc()}.`);
  }
  if (!policy) return h('p', { class: 'policy-note muted' }, 'The default intention policy could not be read from the agent.');
  const word = policy.allow ? 'allow' : 'deny';
  return h('p', { class: 'policy-note', dataset: { policy: word } },
    h('span', { class: 'policy-label' }, 'Default policy'), ' ',
    actionBadge({ Action: word }), ' ',
    `Connections that no intention matches are ${policy.allow ? 'allowed' : 'denied'}`,
    policy.configured
      ? h('span', { class: 'muted' }, ` (connect.default_intention_policy is “${word}”).`)
      : h('span', { class: 'muted' }, ' (ACLs are disabled and connect.default_intention_policy is not set).'));
}

/** PUT one intention by source and destination; resolves when written, rejects with ApiError. */
export function putIntention({ source, destination, action, description, permissions, sourceType }, signal) {
  const body = { SourceName: source, DestinationName: destination, Description: description || '' };
  if (permissions && permissions.length) body.Permissions = permissions;
  else body.Action = action;
  if (sourceType) body.SourceType = sourceType;
  return request('PUT', 'connect/intentions/exact', { params: { source, destination }, body: JSON.stringify(body), signal });
}

export function deleteIntention(source, destination, signal) {
  return request('DELETE', 'connect/intentions/exact', { params: { source, destination }, signal });
}

export function intentionsList({ root, signal }) {
  const createBtn = h('button', { type: 'button', class: 'button primary', 'aria-expanded': 'false', 'aria-controls': 'intention-create' }, 'Create');
  const { header, h1 } = pageHeader('Intentions', [], [createBtn]);
  const count = h('span', { class: 'count', 'aria-live': 'polite' });
  h1.append(' ', count);
  let filter = '';
  const { el: filterEl } = filterBox('intention-filter', 'Filter intentions', 'Service or description', (v) => {
    filter = v.trim().toLowerCase();
    render();
  });
  const intro = h('div', { class: 'intro' },
    h('p', { class: 'muted' }, 'Intentions decide which services may connect to which through the service mesh. They are listed in the order they are evaluated: the most precise match (highest precedence) decides. Use “*” for any service.'));
  const policyEl = h('div', { class: 'policy' });
  const formHost = h('div', { id: 'intention-create' });
  const statusEl = h('p', { class: 'notice-ok', role: 'status' });
  const listEl = h('div', { class: 'list-region' });
  root.append(header, intro, policyEl, formHost, statusEl, h('div', { class: 'toolbar' }, filterEl), listEl);
  const region = new Region(listEl);

  let intentions = null; // as the API lists them: highest precedence first
  let editing = null; // {key, form, original, notice}

  defaultPolicy(signal).then((p) => { if (!signal.aborted) policyEl.replaceChildren(policyNote(p)); }, () => {});

  watch('connect/intentions', {
    signal,
    onData: (data) => { intentions = Array.isArray(data) ? data : []; render(); },
    onError: (err) => region.error(err),
  });

  createBtn.addEventListener('click', () => {
    if (formHost.firstChild) return closeForm();
    createBtn.setAttribute('aria-expanded', 'true');
    statusEl.replaceChildren();
    formHost.append(createForm());
    formHost.querySelector('input').focus();
  });
  function closeForm() {
    formHost.replaceChildren();
    createBtn.setAttribute('aria-expanded', 'false');
    createBtn.focus();
  }

  function say(text) {
    statusEl.replaceChildren(icon('passing'), h('span', null, text));
  }

  function createForm() {
    const names = h('datalist', { id: 'intention-service-names' });
    get('catalog/services', { signal }).then(({ data }) => {
      names.replaceChildren(...[WILDCARD, ...Object.keys(data || {}).sort((a, b) => a.localeCompare(b))].map((n) => h('option', { value: n })));
    }, () => {}); // suggestions only
    const field = (id, label, hint) => {
      const input = h('input', { id, required: true, autocomplete: 'off', spellcheck: 'false', list: 'intention-service-names', 'aria-describedby': `${id}-hint` });
      return { input, el: h('div', { class: 'field' }, h('label', { for: id }, label), input, h('p', { class: 'hint', id: `${id}-hint` }, hint)) };
    };
    const src = field('intention-source', 'Source service', 'The service that opens connections, or “*” for any service.');
    const dst = field('intention-destination', 'Destination service', 'The service being called, or “*” for any service.');
    const { el: actionEl, value: actionValue } = actionChoice('intention-action', 'allow');
    const desc = h('input', { id: 'intention-description', autocomplete: 'off', maxlength: '512' });
    const errorEl = h('div', { class: 'form-error', role: 'alert' });
    const save = h('button', { type: 'submit', class: 'button primary' }, 'Save');
    const form = h('form', { class: 'panel intention-form', 'aria-label': 'Create intention' },
      h('h2', { class: 'section-title' }, 'Create an intention'),
      names,
      h('div', { class: 'field-row' }, src.el, dst.el),
      actionEl,
      h('div', { class: 'field' }, h('label', { for: 'intention-description' }, 'Description ', h('span', { class: 'muted' }, '(optional)')), desc),
      errorEl,
      h('div', { class: 'form-actions' }, save, h('button', { type: 'button', class: 'button', onclick: closeForm }, 'Cancel')));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      errorEl.replaceChildren();
      const source = src.input.value.trim();
      const destination = dst.input.value.trim();
      if (!source) return errorEl.append('Enter the source service (or “*” for any service).');
      if (!destination) return errorEl.append('Enter the destination service (or “*” for any service).');
      const existing = (intentions || []).find((i) => i.SourceName === source && i.DestinationName === destination);
      if (existing) {
        return errorEl.append(`An intention from “${source}” to “${destination}” already exists. Edit it in the list below.`);
      }
      save.disabled = true;
      try {
        await putIntention({ source, destination, action: actionValue(), description: desc.value }, signal);
        closeForm();
        say(`Created the intention ${source} → ${destination} (${actionValue()}).`);
      } catch (err) {
        if (err.name !== 'AbortError') errorEl.append(`Could not save: ${err.message}`);
      } finally {
        save.disabled = false;
      }
    });
    form.addEventListener('keydown', (ev) => { if (ev.key === 'Escape') closeForm(); });
    return form;
  }

  function render() {
    if (!intentions) return;
    if (editing) {
      const now = intentions.find((i) => keyOf(i) === editing.key);
      if (!now) {
        say(`The intention ${editing.route} was deleted by someone else while you were editing it.`);
        editing = null;
      } else if (!sameContent(now, editing.original)) {
        editing.notice.replaceChildren('Someone else changed this intention while you were editing it. Saving replaces their change.');
      }
    }
    const shown = filter
      ? intentions.filter((i) => [i.SourceName, i.DestinationName, i.Description].some((v) => String(v || '').toLowerCase().includes(filter)))
      : intentions;
    count.textContent = filter ? `${shown.length} of ${intentions.length}` : String(intentions.length);
    if (!intentions.length) return region.show(emptyState('There are no intentions yet. Use “Create” to add one; until then the default policy decides every connection.'));
    if (!shown.length) return region.show(emptyState(`No intentions match “${filter}”.`));
    region.show(h('ul', { class: 'rows intention-rows', 'aria-label': 'Intentions' }, shown.map(intentionRow)));
  }

  function intentionRow(i) {
    const route = routeText(i);
    const editBtn = h('button', { type: 'button', class: 'button small-button', onclick: () => startEdit(i) },
      'Edit', h('span', { class: 'visually-hidden' }, ` intention ${route}`));
    const deleteBtn = h('button', { type: 'button', class: 'button danger small-button', onclick: () => remove(i) },
      'Delete', h('span', { class: 'visually-hidden' }, ` intention ${route}`));
    const isEditing = editing && editing.key === keyOf(i);
    return h('li', { class: `row intention-row ${actionEdge(i)}${isEditing ? ' editing' : ''}`, dataset: { source: i.SourceName, destination: i.DestinationName } },
      h('div', { class: 'intention-route' },
        h('span', { class: 'visually-hidden' }, 'From '),
        serviceRef(i.SourceName),
        icon('arrow', 'route-arrow'),
        h('span', { class: 'visually-hidden' }, ' to '),
        serviceRef(i.DestinationName)),
      h('div', { class: 'intention-action' }, actionBadge(i)),
      h('div', { class: 'intention-precedence' }, h('span', { class: 'cell-label' }, 'Precedence '), h('span', { class: 'precedence' }, String(i.Precedence ?? ''))),
      h('div', { class: 'intention-description' },
        i.Description ? h('span', { class: 'description' }, i.Description) : h('span', { class: 'muted small' }, 'No description'),
        isL7(i) ? permissionsDetails(i) : null),
      h('div', { class: 'intention-buttons' }, isEditing ? null : [editBtn, deleteBtn]),
      isEditing ? editing.form : null);
  }

  function startEdit(i) {
    if (editing) {
      if (editing.key === keyOf(i)) return;
      editing = null;
    }
    const l7 = isL7(i);
    const choice = l7 ? null : actionChoice('intention-edit-action', i.Action === 'deny' ? 'deny' : 'allow');
    const desc = h('input', { id: 'intention-edit-description', autocomplete: 'off', maxlength: '512' });
    desc.value = i.Description || '';
    const notice = h('div', { class: 'notice', role: 'status' });
    const errorEl = h('div', { class: 'form-error', role: 'alert' });
    const save = h('button', { type: 'submit', class: 'button primary' }, 'Save');
    const form = h('form', { class: 'intention-edit', 'aria-label': `Edit intention ${routeText(i)}` },
      l7
        ? h('p', { class: 'hint' }, 'This intention has L7 permissions, which this page keeps as they are; change them in the destination’s service-intentions config entry.')
        : choice.el,
      h('div', { class: 'field' }, h('label', { for: 'intention-edit-description' }, 'Description'), desc),
      notice, errorEl,
      h('div', { class: 'form-actions' }, save, h('button', { type: 'button', class: 'button', onclick: () => stopEdit() }, 'Cancel')));
    form.addEventListener('keydown', (ev) => { if (ev.key === 'Escape') stopEdit(); });
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      errorEl.replaceChildren();
      save.disabled = true;
      const action = l7 ? '' : choice.value();
      try {
        await putIntention({
          source: i.SourceName, destination: i.DestinationName, action, description: desc.value,
          permissions: l7 ? i.Permissions : null, sourceType: i.SourceType,
        }, signal);
        // Show what was written until the blocking query brings the new index.
        const idx = intentions.findIndex((x) => keyOf(x) === keyOf(i));
        if (idx >= 0) intentions[idx] = { ...intentions[idx], ...(l7 ? {} : { Action: action }), Description: desc.value || undefined };
        say(`Saved the intention ${routeText(i)}${l7 ? '' : ` (${action})`}.`);
        stopEdit();
      } catch (err) {
        if (err.name !== 'AbortError') errorEl.append(`Could not save: ${err.message}`);
      } finally {
        save.disabled = false;
      }
    });
    editing = { key: keyOf(i), route: routeText(i), form, original: i, notice };
    statusEl.replaceChildren();
    render();
    (choice ? form.querySelector('input:checked') : desc).focus();
  }

  function stopEdit() {
    const key = editing?.key;
    editing = null;
    render();
    if (key) {
      const [source, destination] = key.split('\u0000');
      listEl.querySelector(`li[data-source="${CSS.escape(source)}"][data-destination="${CSS.escape(destination)}"] .intention-buttons button`)?.focus();
    }
  }

  async function remove(i) {
    const ok = await confirmDialog({
      title: 'Delete intention?',
      message: `This deletes the intention from “${i.SourceName}” to “${i.DestinationName}”. Their connections will then be decided by the next matching intention or the default policy.`,
      confirmLabel: 'Delete intention',
    });
    if (!ok) return;
    try {
      await deleteIntention(i.SourceName, i.DestinationName, signal);
      intentions = intentions.filter((x) => keyOf(x) !== keyOf(i));
      say(`Deleted the intention ${routeText(i)}.`);
      render();
    } catch (err) {
      if (err.name !== 'AbortError') region.error(err, { retrying: false, what: `delete the intention ${routeText(i)}` });
    }
  }
}

/** Allow/deny radio buttons in a fieldset; value() reads the choice. */
function actionChoice(idPrefix, initial) {
  const radio = (value, label, hint) => {
    const id = `${idPrefix}-${value}`;
    return h('div', { class: 'radio' },
      h('input', { type: 'radio', id, name: idPrefix, value, checked: value === initial }),
      h('label', { for: id }, h('strong', null, label), ' ', h('span', { class: 'muted' }, hint)));
  };
  const el = h('fieldset', { class: 'field choice' },
    h('legend', null, 'Action'),
    radio('allow', 'Allow', 'the source may connect'),
    radio('deny', 'Deny', 'connections are refused'));
  return { el, value: () => el.querySelector('input:checked')?.value || initial };
}

function permissionsDetails(i) {
  return h('details', { class: 'permissions' },
    h('summary', null, plural(i.Permissions.length, 'L7 permission')),
    h('pre', { class: 'check-output', tabindex: '0' }, JSON.stringify(i.Permissions, null, 2)));
}

function sameContent(a, b) {
  return a.Action === b.Action && (a.Description || '') === (b.Description || '') && JSON.stringify(a.Permissions || null) === JSON.stringify(b.Permissions || null);
}
