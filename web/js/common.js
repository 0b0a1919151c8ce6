// Page furniture shared by the views.
import { h, icon } from './dom.js';
import { link, routerState } from './router.js';

/**
 * Page heading with breadcrumbs: crumbs = [[label, href], ...] (the last
 * one is the current page and gets no link). Returns {header, h1}.
 */
export function pageHeader(title, crumbs = [], actions = null) {
  const nav = crumbs.length
    ? h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' },
        h('ol', null, crumbs.map(([label, href]) => h('li', null, href ? h('a', { href }, label) : h('span', null, label)))))
    : null;
  const h1 = h('h1', { tabindex: '-1' }, title);
  const header = h('div', { class: 'page-header' }, nav, h('div', { class: 'title-row' }, h1, actions ? h('div', { class: 'actions' }, actions) : null));
  return { header, h1 };
}

export function loading(text = 'Loading…') {
  return h('p', { class: 'loading', role: 'status' }, h('span', { class: 'spinner', 'aria-hidden': 'true' }), text);
}

/** A clear error panel, with a way back to the local datacenter when a remote one fails. */
export function errorBox(err, { retrying = true, what = 'load this page' } = {}) {
  const { dc, localDc } = routerState();
  const remote = dc && localDc && dc !== localDc;
  const msg = err?.detail || err?.message || String(err);
  const status = err?.status ? ` (HTTP ${err.status})` : '';
  return h('div', { class: 'error-box', role: 'alert' },
    icon('critical'),
    h('div', null,
      h('p', { class: 'error-title' }, remote ? `Could not ${what} from datacenter “${dc}”.` : `Could not ${what}.`),
      h('p', { class: 'error-detail' }, `${msg}${status}`),
      retrying ? h('p', { class: 'muted small' }, 'Retrying automatically…') : null,
      remote ? h('p', null, h('a', { class: 'button', href: link(currentSection(), localDc) }, `Switch to ${localDc} (local datacenter)`)) : null));
}

function currentSection() {
  const m = /^\/(services|nodes|intentions|kv)/.exec(location.hash.replace(/^#/, ''));
  return m ? `/${m[1]}${m[1] === 'kv' ? '/' : ''}` : '/services';
}

/** Text filter input with a visible label; calls onInput(value). */
export function filterBox(id, label, placeholder, onInput) {
  const input = h('input', { id, type: 'search', placeholder, autocomplete: 'off', spellcheck: 'false', oninput: () => onInput(input.value) });
  return { el: h('div', { class: 'filter' }, h('label', { for: id }, label), input), input };
}

export function emptyState(text) {
  return h('p', { class: 'empty' }, text);
}

/** Manage one page region that shows data, a loading note or an error. */
export class Region {
  constructor(el) {
    this.el = el;
    this.hasData = false;
    this.errorEl = null;
    el.replaceChildren(loading());
  }
  /** Show content (nodes) and clear any error. Keeps keyboard focus on the same link/control across live updates. */
  show(...children) {
    const refocus = focusSelector(this.el);
    this.hasData = true;
    this.errorEl = null;
    this.el.replaceChildren(...children.filter(Boolean));
    this.el.removeAttribute('aria-busy');
    if (refocus) this.el.querySelector(refocus)?.focus({ preventScroll: true });
  }
  error(err, opts) {
    const box = errorBox(err, opts);
    if (this.errorEl) this.errorEl.replaceWith(box);
    else if (this.hasData) this.el.prepend(box);
    else this.el.replaceChildren(box);
    this.errorEl = box;
  }
}

/**
 * Modal confirmation built on <dialog>. Resolves true when the user
 * confirms, false on Cancel or Escape.
 */
export function confirmDialog({ title, message, confirmLabel = 'Delete', danger = true }) {
  return new Promise((resolve) => {
    const cancel = h('button', { type: 'button', class: 'button', autofocus: true, onclick: () => dialog.close('cancel') }, 'Cancel');
    const ok = h('button', { type: 'button', class: `button ${danger ? 'danger' : 'primary'}`, onclick: () => dialog.close('confirm') }, confirmLabel);
    const titleId = `dlg-title-${Date.now()}`;
    const dialog = h('dialog', { class: 'confirm', 'aria-labelledby': titleId },
      h('h2', { id: titleId }, title),
      h('p', null, message),
      h('div', { class: 'dialog-actions' }, cancel, ok));
    const opener = document.activeElement;
    dialog.addEventListener('close', () => {
      const confirmed = dialog.returnValue === 'confirm';
      dialog.remove();
      if (opener && document.contains(opener)) opener.focus();
      resolve(confirmed);
    });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

/** A selector that finds "the same" focused element again after a re-render. */
function focusSelector(container) {
  const a = document.activeElement;
  if (!a || a === container || !container.contains(a)) return null;
  const href = a.getAttribute('href');
  if (href) return `[href="${CSS.escape(href)}"]`;
  if (a.id) return `#${CSS.escape(a.id)}`;
  const check = a.closest('[data-check]');
  const instance = a.closest('[data-instance]');
  if (check && a.tagName === 'PRE') {
    const scope = instance ? `[data-instance="${CSS.escape(instance.dataset.instance)}"] ` : '';
    return `${scope}[data-check="${CSS.escape(check.dataset.check)}"] pre`;
  }
  return null;
}
