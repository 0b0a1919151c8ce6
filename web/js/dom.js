// Small DOM helpers. Every string coming from the server goes through
// text nodes (textContent); innerHTML is never used with data.

const SVG_NS = 'http://www.w3.org/2000/svg';

/**
 * h('a', {href: '#/x', class: 'link', onclick: fn}, 'text', child, [more])
 * Attributes whose name starts with "on" become event listeners; `class`
 * sets className; `dataset` merges into element.dataset; boolean true sets
 * an empty attribute, false/null/undefined are skipped. Children may be
 * strings/numbers (become text nodes), nodes, arrays, or null (skipped).
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith('on') && typeof value === 'function') {
        el.addEventListener(name.slice(2), value);
      } else if (name === 'class') {
        el.className = value;
      } else if (name === 'dataset') {
        Object.assign(el.dataset, value);
      } else if (name === 'value' || name === 'checked' || name === 'selected') {
        el[name] = value;
      } else {
        el.setAttribute(name, value === true ? '' : String(value));
      }
    }
  }
  append(el, children);
  return el;
}

export function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else if (child instanceof Node) parent.appendChild(child);
    else parent.appendChild(document.createTextNode(String(child)));
  }
  return parent;
}

/** Replace all children of `el` with `children`. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// Icons: fixed, hand-written path data (never server data).
const ICONS = {
  passing: ['M4 12.5l5 5L20 6.5'],
  warning: ['M12 3.5L22 20.5H2z', 'M12 10v4.5', 'M12 17.2v.3'],
  critical: ['M12 2.5a9.5 9.5 0 1 0 0 19a9.5 9.5 0 1 0 0-19z', 'M8.5 8.5l7 7', 'M15.5 8.5l-7 7'],
  unknown: ['M12 2.5a9.5 9.5 0 1 0 0 19a9.5 9.5 0 1 0 0-19z', 'M9.5 9.5a2.5 2.5 0 1 1 3.5 2.3c-.7.3-1 .8-1 1.5v.7', 'M12 17v.3'],
  folder: ['M3 6.5a1.5 1.5 0 0 1 1.5-1.5h4.6l2 2.2h8.4A1.5 1.5 0 0 1 21 8.7v9.8a1.5 1.5 0 0 1-1.5 1.5h-15A1.5 1.5 0 0 1 3 18.5z'],
  key: ['M14.5 3.5a6 6 0 1 0 0 .01z', 'M10.2 13.8L3.5 20.5', 'M5.5 18.5l2 2', 'M7.5 16.5l2 2'],
  doc: ['M6 2.5h8l4 4v15H6z', 'M14 2.5v4h4', 'M9 12h6', 'M9 15.5h6'],
  server: ['M4 4h16v6H4z', 'M4 14h16v6H4z', 'M7.5 7v.2', 'M7.5 17v.2'],
  star: ['M12 3l2.6 5.6 6 .7-4.5 4.1 1.2 6L12 16.5 6.7 19.4l1.2-6L3.4 9.3l6-.7z'],
  live: ['M12 12m-3 0a3 3 0 1 0 6 0a3 3 0 1 0-6 0'],
  arrow: ['M4 12h15', 'M13.5 6.5L19 12l-5.5 5.5'],
  mesh: ['M6 6m-2.5 0a2.5 2.5 0 1 0 5 0a2.5 2.5 0 1 0-5 0', 'M18 6m-2.5 0a2.5 2.5 0 1 0 5 0a2.5 2.5 0 1 0-5 0', 'M12 18m-2.5 0a2.5 2.5 0 1 0 5 0a2.5 2.5 0 1 0-5 0', 'M8.5 6h7', 'M7.3 8.2l3.4 7.6', 'M16.7 8.2l-3.4 7.6'],
};

export function icon(name, extraClass = '') {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('focusable', 'false');
  svg.setAttribute('class', `icon icon-${name} ${extraClass}`.trim());
  for (const d of ICONS[name] || ICONS.unknown) {
    const path = document.createElementNS(SVG_NS, 'path');
    path.setAttribute('d', d);
    svg.appendChild(path);
  }
  return svg;
}

export const STATUS_ORDER = ['critical', 'warning', 'passing'];

export function normStatus(s) {
  return s === 'passing' || s === 'warning' || s === 'critical' ? s : 'unknown';
}

/** Worst status of a list of checks, or null when there are none. */
export function worstStatus(checks) {
  let worst = null;
  const rank = { critical: 3, unknown: 2, warning: 1, passing: 0 };
  for (const c of checks) {
    const s = normStatus(c.Status);
    if (worst === null || rank[s] > rank[worst]) worst = s;
  }
  return worst;
}

/** A status pill: colour + icon + text, e.g. "✓ passing". */
export function statusBadge(status, label) {
  const s = normStatus(status);
  return h('span', { class: `status status-${s}` }, icon(s), h('span', { class: 'status-text' }, label ?? String(status || 'unknown')));
}

/** Count checks by status; returns {passing, warning, critical, unknown}. */
export function countStatuses(checks) {
  const counts = { passing: 0, warning: 0, critical: 0, unknown: 0 };
  for (const c of checks) counts[normStatus(c.Status)]++;
  return counts;
}

/** "2 passing · 1 critical" as a group of pills; "No checks" when empty. */
export function healthSummary(checks) {
  const counts = countStatuses(checks);
  const parts = [];
  for (const s of ['critical', 'warning', 'unknown', 'passing']) {
    if (counts[s]) parts.push(statusBadge(s, `${counts[s]} ${s}`));
  }
  if (!parts.length) return h('span', { class: 'muted no-checks' }, 'No checks');
  return h('span', { class: 'health-summary' }, parts);
}

export function tagList(tags) {
  if (!tags || !tags.length) return null;
  return h('ul', { class: 'tags', 'aria-label': 'Tags' }, tags.map((t) => h('li', { class: 'tag' }, t)));
}

export function plural(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

/** Definition list from [[label, value], ...]; skips empty values. */
export function defList(pairs, cls = 'props') {
  const dl = h('dl', { class: cls });
  for (const [label, value] of pairs) {
    if (value === null || value === undefined || value === '') continue;
    dl.append(h('div', { class: 'prop' }, h('dt', null, label), h('dd', null, value)));
  }
  return dl;
}

/** Sleep that rejects/returns early when the signal aborts. */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}
