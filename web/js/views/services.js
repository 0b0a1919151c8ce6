// Services list (#/services) and service page (#/services/<name>).
import { h, healthSummary, statusBadge, tagList, plural, worstStatus, defList, normStatus } from '../dom.js';
import { get, watch, encodePath } from '../api.js';
import { link } from '../router.js';
import { pageHeader, filterBox, emptyState, Region } from '../common.js';
import { meshSection } from './mesh.js';
import { routingSection } from './routing.js';

const instanceKey = (node, serviceId) => `${node}\u0000${serviceId}`;

export function servicesList({ root, signal }) {
  const { header, h1 } = pageHeader('Services');
  const count = h('span', { class: 'count', 'aria-live': 'polite' });
  h1.append(' ', count);
  let filter = '';
  const { el: filterEl } = filterBox('service-filter', 'Filter services', 'Name or tag', (v) => {
    filter = v.trim().toLowerCase();
    render();
  });
  const listEl = h('div', { class: 'list-region', 'aria-busy': 'true' });
  root.append(header, h('div', { class: 'toolbar' }, filterEl), listEl);
  const region = new Region(listEl);

  let catalog = null; // name -> tags
  let checks = null; // all checks in the datacenter
  const fallback = new Map(); // name -> [{Node, Checks}] for services without service checks
  let fallbackGen = 0;

  watch('catalog/services', {
    signal,
    onData: (data) => { catalog = data || {}; refreshFallback(); render(); },
    onError: (err) => region.error(err),
  });
  watch('health/state/any', {
    signal,
    onData: (data) => { checks = data || []; refreshFallback(); render(); },
    onError: (err) => region.error(err),
  });

  // Services with no service-level check are invisible in
  // health/state/any; ask for their instances once per change.
  async function refreshFallback() {
    if (!catalog || !checks) return;
    const withChecks = new Set(checks.filter((c) => c.ServiceName).map((c) => c.ServiceName));
    const missing = Object.keys(catalog).filter((name) => !withChecks.has(name));
    const gen = ++fallbackGen;
    for (const name of [...fallback.keys()]) if (!missing.includes(name)) fallback.delete(name);
    const queue = missing.slice(0, 100);
    const worker = async () => {
      while (queue.length) {
        const name = queue.shift();
        try {
          const { data } = await get(`health/service/${encodePath(name)}`, { signal });
          if (gen !== fallbackGen || signal.aborted) return;
          fallback.set(name, (data || []).map((e) => ({ Node: e.Node?.Node, Checks: e.Checks || [] })));
        } catch (err) {
          if (err.name === 'AbortError') return;
        }
      }
    };
    await Promise.all([worker(), worker()]);
    if (gen === fallbackGen && !signal.aborted) render();
  }

  function summarize() {
    const byService = new Map();
    const nodeChecks = new Map();
    for (const c of checks) {
      if (!c.ServiceID) {
        if (!nodeChecks.has(c.Node)) nodeChecks.set(c.Node, []);
        nodeChecks.get(c.Node).push(c);
      }
    }
    for (const c of checks) {
      if (!c.ServiceID || !c.ServiceName) continue;
      let s = byService.get(c.ServiceName);
      if (!s) byService.set(c.ServiceName, (s = { instances: new Set(), checks: [] }));
      const key = instanceKey(c.Node, c.ServiceID);
      if (!s.instances.has(key)) {
        s.instances.add(key);
        s.checks.push(...(nodeChecks.get(c.Node) || []));
      }
      s.checks.push(c);
    }
    return Object.keys(catalog).sort((a, b) => a.localeCompare(b)).map((name) => {
      const s = byService.get(name);
      if (s) return { name, tags: catalog[name] || [], instances: s.instances.size, checks: s.checks };
      const fb = fallback.get(name);
      return {
        name,
        tags: catalog[name] || [],
        instances: fb ? fb.length : null,
        checks: fb ? fb.flatMap((i) => i.Checks) : [],
      };
    });
  }

  function render() {
    if (!catalog || !checks) return;
    const all = summarize();
    const shown = filter
      ? all.filter((s) => s.name.toLowerCase().includes(filter) || s.tags.some((t) => t.toLowerCase().includes(filter)))
      : all;
    count.textContent = filter ? `${shown.length} of ${all.length}` : String(all.length);
    if (!all.length) return region.show(emptyState('No services are registered in this datacenter.'));
    if (!shown.length) return region.show(emptyState(`No services match “${filter}”.`));
    region.show(h('ul', { class: 'rows', 'aria-label': 'Services' }, shown.map(serviceRow)));
  }

  function serviceRow(s) {
    const worst = worstStatus(s.checks);
    return h('li', { class: `row status-edge-${worst || 'none'}`, dataset: { service: s.name } },
      h('div', { class: 'row-main' },
        h('a', { class: 'row-title', href: link(`/services/${encodeURIComponent(s.name)}`) }, s.name),
        h('span', { class: 'row-meta' }, s.instances === null ? '' : plural(s.instances, 'instance'))),
      h('div', { class: 'row-health' }, healthSummary(s.checks)),
      h('div', { class: 'row-tags' }, tagList(s.tags)));
  }
}

export function serviceDetail({ root, signal, params }) {
  const name = params.name;
  const { header } = pageHeader(name, [['Services', link('/services')], [name]]);
  const summary = h('div', { class: 'summary' });
  const body = h('div', { class: 'list-region' });
  const mesh = meshSection(name, signal);
  const routing = routingSection(name, signal);
  root.append(header, summary, mesh.el, routing.el, body);
  const region = new Region(body);

  watch(`health/service/${encodePath(name)}`, {
    signal,
    onData: (data) => render(data || []),
    onError: (err) => region.error(err),
  });

  function render(entries) {
    entries.sort((a, b) => (a.Node?.Node || '').localeCompare(b.Node?.Node || '') || (a.Service?.ID || '').localeCompare(b.Service?.ID || ''));
    const allChecks = entries.flatMap((e) => e.Checks || []);
    summary.replaceChildren(
      h('span', { class: 'summary-item' }, plural(entries.length, 'instance')),
      h('span', { class: 'summary-item' }, healthSummary(allChecks)),
      mesh.badge);
    mesh.update(entries);
    routing.update(entries);
    if (!entries.length) {
      return region.show(emptyState(`No instances of “${name}” are registered in this datacenter.`));
    }
    region.show(h('h2', { class: 'section-title' }, 'Instances'),
      h('ul', { class: 'cards', 'aria-label': 'Instances' }, entries.map(instanceCard)));
  }
}

function instanceCard(e) {
  const node = e.Node || {};
  const svc = e.Service || {};
  const checks = e.Checks || [];
  const address = svc.Address || node.Address || '';
  const worst = worstStatus(checks);
  return h('li', { class: `card status-edge-${worst || 'none'}`, dataset: { instance: svc.ID || '' } },
    h('div', { class: 'card-head' },
      h('h3', { class: 'card-title' }, svc.ID || svc.Service || ''),
      worst ? statusBadge(worst) : h('span', { class: 'muted' }, 'No checks')),
    defList([
      ['Node', h('a', { href: link(`/nodes/${encodeURIComponent(node.Node || '')}`) }, node.Node || '')],
      ['Address', address ? `${address}${svc.Port ? `:${svc.Port}` : ''}` : (svc.Port ? `port ${svc.Port}` : '')],
      ['Kind', svc.Kind || null],
      ['Proxy for', svc.Kind === 'connect-proxy' && svc.Proxy?.DestinationServiceName
        ? h('a', { href: link(`/services/${encodeURIComponent(svc.Proxy.DestinationServiceName)}`) }, svc.Proxy.DestinationServiceName)
        : null],
      ['Connect', svc.Connect?.Native ? 'connect-native' : null],
      ['Tags', tagList(svc.Tags)],
      ['Meta', metaList(svc.Meta)],
    ]),
    checksList(checks, { showKind: true }));
}

export function metaList(meta) {
  const entries = Object.entries(meta || {});
  if (!entries.length) return null;
  return h('ul', { class: 'meta' }, entries.map(([k, v]) => h('li', null, h('span', { class: 'meta-key' }, k), ' = ', h('span', { class: 'meta-value' }, v))));
}

/** List of checks with status, name, and Output. */
export function checksList(checks, { showKind = false, showService = false } = {}) {
  if (!checks.length) return h('p', { class: 'muted' }, 'No health checks.');
  const rank = { critical: 0, warning: 1, unknown: 2, passing: 3 };
  const sorted = [...checks].sort((a, b) => (rank[a.Status] ?? 2) - (rank[b.Status] ?? 2) || (a.Name || '').localeCompare(b.Name || ''));
  return h('ul', { class: 'checks', 'aria-label': 'Health checks' }, sorted.map((c) => h('li', { class: `check check-${normStatus(c.Status)}`, dataset: { check: c.CheckID || '' } },
    h('div', { class: 'check-head' },
      statusBadge(c.Status),
      h('span', { class: 'check-name' }, c.Name || c.CheckID || ''),
      showService && c.ServiceName
        ? h('span', { class: 'check-kind' }, 'service ', h('a', { href: link(`/services/${encodeURIComponent(c.ServiceName)}`) }, c.ServiceName))
        : (showKind ? h('span', { class: 'check-kind' }, c.ServiceID ? 'service check' : 'node check') : null),
      h('code', { class: 'check-id' }, c.CheckID || '')),
    c.Notes ? h('p', { class: 'check-notes' }, c.Notes) : null,
    c.Output ? h('pre', { class: 'check-output', tabindex: '0', 'aria-label': `Output of ${c.Name || c.CheckID}` }, c.Output) : null)));
}
