// Nodes list (#/nodes) and node page (#/nodes/<name>).
import { h, icon, healthSummary, worstStatus, defList, tagList } from '../dom.js';
import { get, watch, encodePath } from '../api.js';
import { link } from '../router.js';
import { pageHeader, filterBox, emptyState, Region } from '../common.js';
import { checksList, metaList } from './services.js';

/** Host part of "ip:port", "[v6]:port" or a bare address. */
export function hostOf(addr) {
  const s = String(addr || '');
  const m = /^\[([^\]]+)\](?::\d+)?$/.exec(s);
  if (m) return m[1];
  const parts = s.split(':');
  return parts.length === 2 ? parts[0] : s;
}

/** Fetch leader and peers; resolves to {leader: host|null, servers: Set<host>}. */
async function serverRoles(signal) {
  const [leader, peers] = await Promise.all([
    get('status/leader', { signal }).then((r) => r.data).catch(() => null),
    get('status/peers', { signal }).then((r) => r.data).catch(() => null),
  ]);
  const servers = new Set((Array.isArray(peers) ? peers : []).map(hostOf));
  const leaderHost = typeof leader === 'string' && leader ? hostOf(leader) : null;
  if (leaderHost) servers.add(leaderHost);
  return { leader: leaderHost, servers };
}

function nodeAddresses(node) {
  const out = new Set();
  if (node?.Address) out.add(node.Address);
  for (const v of Object.values(node?.TaggedAddresses || {})) if (v) out.add(v);
  return out;
}

function roleOf(node, roles) {
  if (!roles) return null;
  const addrs = nodeAddresses(node);
  if (roles.leader && addrs.has(roles.leader)) return 'leader';
  for (const a of addrs) if (roles.servers.has(a)) return 'server';
  return null;
}

function roleBadges(role) {
  if (!role) return null;
  return h('span', { class: 'roles' },
    h('span', { class: 'badge badge-server', title: 'Server (Raft peer)' }, icon('server'), 'Server'),
    role === 'leader' ? h('span', { class: 'badge badge-leader', title: 'Raft leader' }, icon('star'), 'Leader') : null);
}

export function nodesList({ root, signal }) {
  const { header, h1 } = pageHeader('Nodes');
  const count = h('span', { class: 'count', 'aria-live': 'polite' });
  h1.append(' ', count);
  let filter = '';
  const { el: filterEl } = filterBox('node-filter', 'Filter nodes', 'Name or address', (v) => {
    filter = v.trim().toLowerCase();
    render();
  });
  const listEl = h('div', { class: 'list-region' });
  root.append(header, h('div', { class: 'toolbar' }, filterEl), listEl);
  const region = new Region(listEl);

  let nodes = null;
  let checks = null;
  let roles = null;
  let rolesGen = 0;

  async function refreshRoles() {
    const gen = ++rolesGen;
    const r = await serverRoles(signal);
    if (gen === rolesGen && !signal.aborted) {
      roles = r;
      render();
    }
  }

  watch('catalog/nodes', {
    signal,
    onData: (data) => { nodes = data || []; render(); refreshRoles(); },
    onError: (err) => region.error(err),
  });
  watch('health/state/any', {
    signal,
    onData: (data) => { checks = data || []; render(); },
    onError: (err) => region.error(err),
  });

  function render() {
    if (!nodes || !checks) return;
    const byNode = new Map();
    for (const c of checks) {
      if (!byNode.has(c.Node)) byNode.set(c.Node, { node: [], service: [] });
      byNode.get(c.Node)[c.ServiceID ? 'service' : 'node'].push(c);
    }
    const sorted = [...nodes].sort((a, b) => a.Node.localeCompare(b.Node));
    const shown = filter
      ? sorted.filter((n) => n.Node.toLowerCase().includes(filter) || (n.Address || '').toLowerCase().includes(filter))
      : sorted;
    count.textContent = filter ? `${shown.length} of ${sorted.length}` : String(sorted.length);
    if (!sorted.length) return region.show(emptyState('No nodes are registered in this datacenter.'));
    if (!shown.length) return region.show(emptyState(`No nodes match “${filter}”.`));
    region.show(h('ul', { class: 'rows', 'aria-label': 'Nodes' }, shown.map((n) => {
      const c = byNode.get(n.Node) || { node: [], service: [] };
      const worst = worstStatus(c.node);
      const role = roleOf(n, roles);
      return h('li', { class: `row status-edge-${worst || 'none'}`, dataset: { node: n.Node, role: role || '' } },
        h('div', { class: 'row-main' },
          h('a', { class: 'row-title', href: link(`/nodes/${encodeURIComponent(n.Node)}`) }, n.Node),
          roleBadges(role),
          h('span', { class: 'row-meta mono' }, n.Address || '')),
        h('div', { class: 'row-health' }, h('span', { class: 'cell-label' }, 'Node checks'), healthSummary(c.node)),
        h('div', { class: 'row-health' }, h('span', { class: 'cell-label' }, 'Service checks'), healthSummary(c.service)));
    })));
  }
}

export function nodeDetail({ root, signal, params }) {
  const name = params.name;
  const { header } = pageHeader(name, [['Nodes', link('/nodes')], [name]]);
  const infoEl = h('div', { class: 'node-info' });
  const body = h('div', { class: 'list-region' });
  root.append(header, infoEl, body);
  const region = new Region(body);

  let info; // undefined: not loaded; null: node not found
  let checks = null;
  let roles = null;

  watch(`catalog/node/${encodePath(name)}`, {
    signal,
    allow404: true, // Consul answers 200 null for an unknown node; tolerate 404 too
    onData: (data) => {
      info = data;
      render();
      serverRoles(signal).then((r) => { if (!signal.aborted) { roles = r; render(); } });
    },
    onError: (err) => region.error(err),
  });
  watch(`health/node/${encodePath(name)}`, {
    signal,
    onData: (data) => { checks = data || []; render(); },
    onError: (err) => region.error(err),
  });

  function render() {
    if (info === undefined || !checks) return;
    if (!info || !info.Node) {
      infoEl.replaceChildren();
      return region.show(emptyState(`There is no node called “${name}” in this datacenter.`));
    }
    const node = info.Node;
    const role = roleOf(node, roles);
    const tagged = Object.entries(node.TaggedAddresses || {}).filter(([, v]) => v);
    const nodeChecks = checks.filter((c) => !c.ServiceID);
    infoEl.replaceChildren(
      h('div', { class: 'summary' },
        h('span', { class: 'summary-item' }, h('span', { class: 'cell-label' }, 'Node checks'), healthSummary(nodeChecks)),
        roleBadges(role)),
      defList([
        ['Address', h('span', { class: 'mono' }, node.Address || '')],
        ['Datacenter', node.Datacenter],
        ['Node ID', node.ID ? h('code', null, node.ID) : null],
        ['Tagged addresses', tagged.length ? h('ul', { class: 'meta' }, tagged.map(([k, v]) => h('li', null, h('span', { class: 'meta-key' }, k), ' ', h('span', { class: 'mono' }, v)))) : null],
        ['Meta', metaList(node.Meta)],
      ]));

    // Services may come as a map (catalog/node) or a list (node-services).
    const svcs = Array.isArray(info.Services) ? info.Services : Object.values(info.Services || {});
    svcs.sort((a, b) => (a.Service || '').localeCompare(b.Service || '') || (a.ID || '').localeCompare(b.ID || ''));
    const svcRows = svcs.map((s) => {
      const sc = checks.filter((c) => c.ServiceID === s.ID);
      const worst = worstStatus(sc);
      return h('li', { class: `row status-edge-${worst || 'none'}`, dataset: { service: s.Service || '' } },
        h('div', { class: 'row-main' },
          h('a', { class: 'row-title', href: link(`/services/${encodeURIComponent(s.Service || '')}`) }, s.Service || ''),
          s.ID && s.ID !== s.Service ? h('span', { class: 'row-meta' }, s.ID) : null,
          h('span', { class: 'row-meta mono' }, `${s.Address || node.Address || ''}${s.Port ? `:${s.Port}` : ''}`)),
        h('div', { class: 'row-health' }, healthSummary(sc)),
        h('div', { class: 'row-tags' }, tagList(s.Tags)));
    });

    region.show(
      h('section', { 'aria-labelledby': 'node-checks-h' },
        h('h2', { class: 'section-title', id: 'node-checks-h' }, 'Health checks'),
        checksList(checks, { showService: true, showKind: true })),
      h('section', { 'aria-labelledby': 'node-services-h' },
        h('h2', { class: 'section-title', id: 'node-services-h' }, `Services (${svcs.length})`),
        svcRows.length ? h('ul', { class: 'rows', 'aria-label': 'Services on this node' }, svcRows) : emptyState('No services on this node.')));
  }
}
