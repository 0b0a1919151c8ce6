// The service-mesh part of a service page: is the service in the mesh (a sidecar proxy or
// connect-native instances), its sidecars and their upstreams, and which callers its
// intentions allow. For a sidecar proxy itself: the service it is the sidecar of.
import { h, icon, healthSummary, worstStatus, plural } from '../dom.js';
import { watch, encodePath } from '../api.js';
import { link } from '../router.js';
import { Region, loading } from '../common.js';
import { actionBadge, actionEdge, serviceRef, defaultPolicy, policyNote, WILDCARD } from './intentions.js';

const PROXY_KIND = 'connect-proxy';
/** Where a sidecar's upstream listens when the registration names no address (Consul's default). */
const DEFAULT_BIND_ADDRESS = '127.0.0.1';

/**
 * The mesh section of the page of service `name`. Returns {el, badge, update(entries)}:
 * `el` goes in the page, `badge` in its summary line, and update() takes every answer of
 * health/service/<name> (the page already follows it).
 */
export function meshSection(name, signal) {
  const el = h('section', { class: 'mesh panel', 'aria-labelledby': 'mesh-title' });
  const badge = h('span', { class: 'mesh-badge' });
  const titleRow = h('div', { class: 'panel-head' }, h('h2', { class: 'section-title', id: 'mesh-title' }, 'Service mesh'));
  const bodyEl = h('div', { class: 'mesh-body' });
  el.append(titleRow, bodyEl);
  const region = new Region(bodyEl);

  let mode = null; // 'service' | 'proxy' | 'gateway', fixed by the first answer
  let instances = [];
  let connect = null; // health/connect/<name>: its sidecars and connect-native instances
  let matches = null; // intentions whose destination matches <name>, evaluation order
  let policy; // undefined until agent/self answers

  function update(entries) {
    instances = entries;
    if (!mode) {
      const kinds = entries.map((e) => e.Service?.Kind || '');
      mode = kinds.includes(PROXY_KIND) ? 'proxy' : (kinds.some((k) => k) ? 'gateway' : 'service');
      if (mode === 'service') follow();
    }
    render();
  }

  function follow() {
    watch(`health/connect/${encodePath(name)}`, {
      signal,
      onData: (data) => { connect = Array.isArray(data) ? data : []; render(); },
      onError: (err) => region.error(err, { what: 'load the service’s sidecar proxies' }),
    });
    watch('connect/intentions/match', {
      params: { by: 'destination', name },
      signal,
      onData: (data) => { matches = (data && data[name]) || []; render(); },
      onError: (err) => region.error(err, { what: 'load the intentions for this service' }),
    });
    defaultPolicy(signal).then((p) => { if (!signal.aborted) { policy = p; render(); } }, () => {});
  }

  function render() {
    if (mode === 'proxy') return renderProxy();
    if (mode === 'gateway') {
      const kind = instances.find((e) => e.Service?.Kind)?.Service.Kind;
      badge.replaceChildren(h('span', { class: 'badge badge-mesh' }, icon('mesh'), kind));
      return region.show(h('p', null, `“${name}” is a ${kind}: it carries mesh traffic for other services.`));
    }
    if (!connect) return;
    const sidecars = connect.filter((e) => e.Service?.Kind === PROXY_KIND);
    const native = dedupe([...connect, ...instances].filter((e) => e.Service?.Kind !== PROXY_KIND && e.Service?.Connect?.Native));
    const inMesh = sidecars.length > 0 || native.length > 0;
    el.dataset.mesh = inMesh ? 'yes' : 'no';
    badge.replaceChildren(inMesh
      ? h('span', { class: 'badge badge-mesh' }, icon('mesh'), 'In the service mesh')
      : h('span', { class: 'badge' }, 'Not in the service mesh'));

    region.show(
      membership(sidecars, native, inMesh),
      sidecars.length ? sidecarList(sidecars) : null,
      native.length ? nativeList(native) : null,
      sidecars.length ? upstreamsPart(sidecars) : null,
      callersPart());
  }

  function membership(sidecars, native, inMesh) {
    if (!inMesh) {
      return h('p', { class: 'mesh-status' },
        `“${name}” is not in the service mesh: no sidecar proxy is registered for it and none of its instances is connect-native. `,
        'Register it with ', h('code', null, '"Connect": {"SidecarService": {}}'), ' to give it a sidecar.');
    }
    const parts = [];
    if (sidecars.length) parts.push(`${plural(sidecars.length, 'sidecar proxy', 'sidecar proxies')} ${sidecars.length === 1 ? 'carries' : 'carry'} its traffic`);
    if (native.length) parts.push(`${plural(native.length, 'instance')} ${native.length === 1 ? 'is' : 'are'} connect-native (mTLS without a sidecar)`);
    const covered = new Set([
      ...sidecars.map((e) => instanceKey(e.Node?.Node, e.Service?.Proxy?.DestinationServiceID)),
      ...native.map((e) => instanceKey(e.Node?.Node, e.Service?.ID)),
    ]);
    const bare = instances.filter((e) => !covered.has(instanceKey(e.Node?.Node, e.Service?.ID)));
    return h('div', { class: 'mesh-status' },
      h('p', null, `“${name}” is in the service mesh: ${parts.join(', and ')}.`),
      bare.length
        ? h('p', { class: 'notice' }, `Not covered: ${bare.map((e) => `${e.Service?.ID} on ${e.Node?.Node}`).join(', ')} ${bare.length === 1 ? 'has' : 'have'} no sidecar proxy.`)
        : null);
  }

  function callersPart() {
    const items = matches === null ? [loading()] : [
      matches.length
        ? h('ul', { class: 'rows intention-rows', 'aria-label': `Intentions for ${name}` }, matches.map((i) =>
          h('li', { class: `row caller-row ${actionEdge(i)}`, dataset: { source: i.SourceName, destination: i.DestinationName } },
            h('div', { class: 'intention-route' },
              h('span', { class: 'cell-label' }, 'From '), serviceRef(i.SourceName),
              i.DestinationName === WILDCARD ? h('span', { class: 'muted small' }, ' (intention for any destination)') : null),
            h('div', { class: 'intention-action' }, actionBadge(i)),
            h('div', { class: 'intention-precedence' }, h('span', { class: 'cell-label' }, 'Precedence '), h('span', { class: 'precedence' }, String(i.Precedence ?? ''))),
            h('div', { class: 'intention-description' }, i.Description ? h('span', { class: 'description' }, i.Description) : null))))
        : h('p', { class: 'muted' }, `No intention names “${name}” or “*” as its destination.`),
      policy === undefined ? null : policyNote(policy),
    ];
    return h('div', { class: 'mesh-part', 'aria-labelledby': 'mesh-callers-title', role: 'group' },
      h('div', { class: 'part-head' },
        h('h3', { class: 'part-title', id: 'mesh-callers-title' }, `Who may call ${name}`),
        h('a', { href: link('/intentions') }, 'Manage intentions')),
      h('p', { class: 'muted small' }, 'Intentions that apply to it, in the order they are evaluated: the first that matches a caller decides.'),
      items);
  }

  function renderProxy() {
    const proxies = instances.filter((e) => e.Service?.Kind === PROXY_KIND);
    const targets = [...new Set(proxies.map((e) => e.Service?.Proxy?.DestinationServiceName).filter(Boolean))];
    el.dataset.proxyFor = targets.join(' ');
    badge.replaceChildren(h('span', { class: 'badge badge-mesh' }, icon('mesh'), 'Sidecar proxy'));
    region.show(
      h('p', { class: 'mesh-status proxy-for' },
        `“${name}” is the sidecar proxy of `,
        targets.length ? targets.map((t, i) => [i ? ', ' : '', serviceRef(t)]) : h('span', { class: 'muted' }, 'no service (its registration names no destination)'),
        ': it carries that service’s traffic in the mesh.'),
      h('ul', { class: 'rows', 'aria-label': 'Proxied instances' }, proxies.map((e) => {
        const p = e.Service?.Proxy || {};
        const local = p.LocalServiceAddress || p.LocalServicePort ? `${p.LocalServiceAddress || DEFAULT_BIND_ADDRESS}${p.LocalServicePort ? `:${p.LocalServicePort}` : ''}` : '';
        return h('li', { class: 'row', dataset: { sidecar: e.Service?.ID || '' } },
          h('div', { class: 'row-main' }, h('span', { class: 'row-title' }, e.Service?.ID || ''), h('span', { class: 'row-meta' }, `on ${e.Node?.Node || ''}`)),
          h('div', null, h('span', { class: 'cell-label' }, 'Instance '), p.DestinationServiceID || p.DestinationServiceName || ''),
          h('div', null, local ? [h('span', { class: 'cell-label' }, 'Local service '), h('span', { class: 'mono' }, local)] : null));
      })),
      upstreamsPart(proxies));
  }

  return { el, badge, update };
}

const instanceKey = (node, id) => `${node || ''}\u0000${id || ''}`;

function dedupe(entries) {
  const seen = new Set();
  return entries.filter((e) => {
    const k = instanceKey(e.Node?.Node, e.Service?.ID);
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

function addressOf(e) {
  const addr = e.Service?.Address || e.Node?.Address || '';
  const port = e.Service?.Port;
  return addr ? `${addr}${port ? `:${port}` : ''}` : (port ? `port ${port}` : '');
}

function sidecarList(sidecars) {
  return h('div', { class: 'mesh-part', role: 'group', 'aria-labelledby': 'mesh-sidecars-title' },
    h('h3', { class: 'part-title', id: 'mesh-sidecars-title' }, sidecars.length === 1 ? 'Sidecar proxy' : `Sidecar proxies (${sidecars.length})`),
    h('ul', { class: 'rows', 'aria-label': 'Sidecar proxies' }, sidecars.map((e) => {
      const svc = e.Service || {};
      const checks = e.Checks || [];
      return h('li', { class: `row sidecar-row status-edge-${worstStatus(checks) || 'none'}`, dataset: { sidecar: svc.ID || '' } },
        h('div', { class: 'row-main' },
          h('a', { class: 'row-title', href: link(`/services/${encodeURIComponent(svc.Service || '')}`) }, svc.ID || svc.Service || ''),
          svc.Proxy?.DestinationServiceID ? h('span', { class: 'row-meta' }, `for ${svc.Proxy.DestinationServiceID}`) : null),
        h('div', { class: 'row-main' },
          h('span', { class: 'cell-label' }, 'Node'),
          h('a', { href: link(`/nodes/${encodeURIComponent(e.Node?.Node || '')}`) }, e.Node?.Node || ''),
          h('span', { class: 'mono sidecar-address' }, addressOf(e))),
        h('div', { class: 'row-health' }, healthSummary(checks)));
    })));
}

function nativeList(native) {
  return h('div', { class: 'mesh-part', role: 'group', 'aria-labelledby': 'mesh-native-title' },
    h('h3', { class: 'part-title', id: 'mesh-native-title' }, 'Connect-native instances'),
    h('ul', { class: 'rows', 'aria-label': 'Connect-native instances' }, native.map((e) =>
      h('li', { class: 'row', dataset: { native: e.Service?.ID || '' } },
        h('div', { class: 'row-main' }, h('span', { class: 'row-title' }, e.Service?.ID || '')),
        h('div', { class: 'row-main' },
          h('span', { class: 'cell-label' }, 'Node'),
          h('a', { href: link(`/nodes/${encodeURIComponent(e.Node?.Node || '')}`) }, e.Node?.Node || ''),
          h('span', { class: 'mono' }, addressOf(e))),
        h('div', { class: 'row-health' }, healthSummary(e.Checks || []))))));
}

/** The upstreams of a set of proxies, each listed once; notes which proxies have one when they differ. */
function upstreamsPart(proxies) {
  const byKey = new Map();
  for (const e of proxies) {
    for (const u of e.Service?.Proxy?.Upstreams || []) {
      const k = JSON.stringify([u.DestinationType || 'service', u.DestinationName, u.Datacenter || '', u.LocalBindAddress || '', u.LocalBindPort || 0, u.LocalBindSocketPath || '']);
      if (!byKey.has(k)) byKey.set(k, { u, on: [] });
      byKey.get(k).on.push(e.Service?.ID || '');
    }
  }
  const rows = [...byKey.values()];
  const body = rows.length
    ? h('div', { class: 'table-wrap' }, h('table', { class: 'mesh-table', 'aria-label': 'Upstreams' },
      h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Destination'), h('th', { scope: 'col' }, 'Datacenter'), h('th', { scope: 'col' }, 'Local address'))),
      h('tbody', null, rows.map(({ u, on }) => h('tr', { dataset: { upstream: u.DestinationName || '' } },
        h('td', null,
          u.DestinationType === 'prepared_query'
            ? [h('span', { class: 'muted' }, 'prepared query '), u.DestinationName]
            : serviceRef(u.DestinationName || ''),
          on.length < proxies.length ? h('span', { class: 'muted small' }, ` (only on ${on.join(', ')})`) : null),
        h('td', null, u.Datacenter || h('span', { class: 'muted' }, 'local')),
        h('td', { class: 'mono' }, u.LocalBindSocketPath || `${u.LocalBindAddress || DEFAULT_BIND_ADDRESS}:${u.LocalBindPort ?? ''}`))))))
    : h('p', { class: 'muted' }, 'No upstreams: the sidecar opens no local listeners for other services.');
  return h('div', { class: 'mesh-part', role: 'group', 'aria-labelledby': 'mesh-upstreams-title' },
    h('h3', { class: 'part-title', id: 'mesh-upstreams-title' }, 'Upstreams'),
    rows.length ? h('p', { class: 'muted small' }, 'Services the sidecar lets this one call, each on a local address.') : null,
    body);
}
