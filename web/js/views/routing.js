// The Routing part of a service page: the service's compiled discovery chain
// (GET /v1/discovery-chain/<name>, Consul's shape) drawn left to right as
//   service → routes (service-router) → splits (service-splitter) → resolvers → targets,
// with each resolver's failover targets as dashed, numbered "failover" edges.
// The boxes are plain DOM (lists, in reading order, every edge also written out as text);
// the connector lines are one inline SVG laid over them, drawn from the boxes' positions.
import { h } from '../dom.js';
import { watch, encodePath } from '../api.js';
import { link } from '../router.js';
import { Region } from '../common.js';

const SVG_NS = 'http://www.w3.org/2000/svg';
const HTTP_LIKE = new Set(['http', 'http2', 'grpc']);

/**
 * The routing section of the page of service `name`. Returns {el, update(entries)}: update()
 * takes every answer of health/service/<name>; the first starts following the chain (a
 * blocking query, so config entry changes redraw it), and the section goes away for good
 * once the instances show a sidecar proxy or gateway, which callers do not route to by name.
 */
export function routingSection(name, signal) {
  const el = h('section', { class: 'routing panel', 'aria-labelledby': 'routing-title' });
  const protocolBadge = h('span', { class: 'routing-protocol' });
  el.append(
    h('div', { class: 'panel-head' }, h('h2', { class: 'section-title', id: 'routing-title' }, 'Routing'), protocolBadge),
    h('p', { class: 'muted small routing-intro' },
      `How a caller’s sidecar sends requests for “${name}”: its compiled discovery chain, read from `,
      h('code', null, `/v1/discovery-chain/${name}`), '.'));
  const bodyEl = h('div', { class: 'routing-body' });
  el.append(bodyEl);
  const region = new Region(bodyEl);
  let following = null; // AbortController of the chain's watch, once started
  let diagram = null; // {el, connect, disconnect}

  signal.addEventListener('abort', () => diagram?.disconnect(), { once: true });

  function update(entries) {
    // Sidecar proxies and gateways are not destinations that callers route to by name.
    if (entries.some((e) => e.Service?.Kind)) {
      following?.abort();
      diagram?.disconnect();
      el.hidden = true;
      return;
    }
    if (following || el.hidden) return;
    following = new AbortController();
    signal.addEventListener('abort', () => following.abort(), { once: true });
    watch(`discovery-chain/${encodePath(name)}`, {
      signal: following.signal,
      onData: (data) => render(data?.Chain),
      onError: (err) => region.error(err, { what: 'load the routing chain of this service' }),
    });
  }

  function render(chain) {
    diagram?.disconnect();
    diagram = null;
    if (!chain || typeof chain !== 'object' || !chain.StartNode) {
      protocolBadge.replaceChildren();
      return region.show(h('p', { class: 'notice' }, 'The agent answered without a discovery chain for this service.'));
    }
    const protocol = String(chain.Protocol || 'tcp');
    el.dataset.protocol = protocol;
    protocolBadge.replaceChildren(h('span', { class: 'badge', title: 'Protocol of the chain' }, `protocol ${protocol}`));
    const model = buildModel(chain);
    const built = drawing(model, name);
    region.show(notes(chain, protocol, model), built.el, legend(model));
    diagram = built;
    built.connect();
  }

  return { el, update };
}

// ---------- The graph: columns of boxes, and edges between anchors ----------

/** "web.default.default" / "v1.web.default.default.dc1" without the default namespace/partition. */
function shortName(s) {
  return String(s || '').replace(/\.default\.default(?=\.|$)/, '');
}

/** "web", "web · subset v1", "web · subset v1 · dc2" for a target (dc only when it is not `localDc`). */
function targetText(t, localDc) {
  if (!t) return '';
  const parts = [t.Service];
  if (t.ServiceSubset) parts.push(`subset ${t.ServiceSubset}`);
  if (t.Datacenter && t.Datacenter !== localDc) parts.push(t.Datacenter);
  return parts.join(' · ');
}

/**
 * Lay the chain out: which boxes go in which column (in the order a reader follows them from
 * the start node) and which edges join them. Column of a node: by its Type.
 */
function buildModel(chain) {
  const nodes = chain.Nodes && typeof chain.Nodes === 'object' ? chain.Nodes : {};
  const targets = chain.Targets && typeof chain.Targets === 'object' ? chain.Targets : {};
  const dc = chain.Datacenter || '';
  const columns = { router: [], splitter: [], resolver: [], target: [] };
  const seen = new Set();
  const edges = [];
  // What the edges into a resolver asked for, to tell a redirect from a plain hop.
  const asked = new Map(); // resolver key -> [service asked for]
  const failoverOf = new Map(); // target id -> [{resolver, order}]
  const primaryOf = new Map(); // target id -> [resolver key]

  const ask = (key, service) => {
    if (!asked.has(key)) asked.set(key, []);
    asked.get(key).push(service || chain.ServiceName);
  };
  const addTarget = (id) => {
    if (!seen.has(`target:${id}`)) {
      seen.add(`target:${id}`);
      columns.target.push(id);
    }
  };
  const visit = (key) => {
    if (!key || seen.has(key)) return;
    seen.add(key);
    const n = nodes[key];
    if (!n) return;
    const type = columns[n.Type] ? n.Type : 'resolver';
    columns[type].push(key);
    if (n.Type === 'router') {
      (n.Routes || []).forEach((r, i) => {
        const d = r.Definition?.Destination || {};
        edges.push({ kind: 'route', from: key, fromAnchor: `${key}/route/${i}`, to: r.NextNode, index: i + 1 });
        if (nodes[r.NextNode]?.Type === 'resolver') ask(r.NextNode, d.Service);
        visit(r.NextNode);
      });
    } else if (n.Type === 'splitter') {
      (n.Splits || []).forEach((s, i) => {
        const d = s.Definition || {};
        edges.push({ kind: 'split', from: key, fromAnchor: `${key}/split/${i}`, to: s.NextNode, index: i + 1 });
        if (nodes[s.NextNode]?.Type === 'resolver') ask(s.NextNode, d.Service);
        visit(s.NextNode);
      });
    } else {
      const r = n.Resolver || {};
      if (r.Target) {
        edges.push({ kind: 'target', from: key, fromAnchor: `${key}/target`, to: `target:${r.Target}`, index: 1 });
        if (!primaryOf.has(r.Target)) primaryOf.set(r.Target, []);
        primaryOf.get(r.Target).push(key);
        addTarget(r.Target);
      }
      (r.Failover?.Targets || []).forEach((id, i) => {
        edges.push({ kind: 'failover', from: key, fromAnchor: `${key}/failover/${i}`, to: `target:${id}`, index: i + 1 });
        if (!failoverOf.has(id)) failoverOf.set(id, []);
        failoverOf.get(id).push({ resolver: key, order: i + 1 });
        addTarget(id);
      });
    }
  };
  const start = chain.StartNode;
  edges.push({ kind: 'start', from: 'service', fromAnchor: 'service', to: start, index: 1 });
  if (nodes[start]?.Type === 'resolver') ask(start, chain.ServiceName);
  visit(start);
  // Anything the walk did not reach (a chain compiled by someone else): still shown.
  for (const key of Object.keys(nodes)) visit(key);
  for (const id of Object.keys(targets)) addTarget(id);
  return { chain, nodes, targets, dc, columns, edges, asked, failoverOf, primaryOf };
}

/** Draw the model: a CSS grid of columns of boxes, and an SVG of edges over it. */
function drawing(model, name) {
  const { chain, nodes, targets, dc, columns } = model;
  const anchors = new Map(); // anchor key -> element the edge leaves from / arrives at
  const anchor = (key, el) => { anchors.set(key, el); el.dataset.anchor = key; return el; };
  const nameOf = (key) => describeNode(nodes[key], targets, dc, key);

  const cols = [];
  // Column 0: the service itself.
  cols.push(column('service', 'Service', [
    anchor('service', h('li', { class: 'chain-box box-service', dataset: { node: 'service' } },
      h('span', { class: 'box-kind' }, 'Service'),
      h('span', { class: 'box-title' }, chain.ServiceName || name),
      h('span', { class: 'box-line muted' }, `in ${dc || 'this datacenter'}`),
      h('span', { class: 'box-next' }, `→ ${nameOf(chain.StartNode)}`))),
  ]));

  if (columns.router.length) {
    cols.push(column('routes', 'Routes', columns.router.map((key) => routerBox(key, nodes[key], model, anchor, nameOf))));
  }
  if (columns.splitter.length) {
    cols.push(column('splits', 'Splits', columns.splitter.map((key) => splitterBox(key, nodes[key], model, anchor, nameOf))));
  }
  cols.push(column('resolvers', 'Resolvers', columns.resolver.map((key) => resolverBox(key, nodes[key], model, anchor))));
  cols.push(column('targets', 'Targets', columns.target.map((id) => targetBox(id, model, anchor))));

  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('class', 'chain-edges');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('focusable', 'false');
  const grid = h('div', { class: 'chain', dataset: { columns: String(cols.length) } }, cols, svg);
  const scroller = h('div', {
    class: 'chain-scroll', role: 'group', tabindex: '0',
    'aria-label': `Routing diagram of ${chain.ServiceName || name}`,
    dataset: { startNode: chain.StartNode },
  }, grid);

  const hint = h('p', { class: 'muted small chain-scroll-hint', hidden: true }, 'The diagram is wider than the page: scroll it sideways.');
  const draw = () => {
    drawEdges(svg, grid, model.edges, anchors);
    hint.hidden = scroller.scrollWidth <= scroller.clientWidth + 1;
  };
  let observer = null;
  let frame = 0;
  const redraw = () => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(draw);
  };
  return {
    el: h('div', { class: 'chain-wrap' }, hint, scroller),
    connect() {
      draw();
      observer = new ResizeObserver(redraw);
      observer.observe(scroller);
      observer.observe(grid);
      for (const box of grid.querySelectorAll('.chain-box')) observer.observe(box);
    },
    disconnect() {
      cancelAnimationFrame(frame);
      observer?.disconnect();
    },
  };
}

function column(key, title, boxes) {
  const id = `chain-col-${key}`;
  return h('div', { class: `chain-col chain-col-${key}`, dataset: { column: key }, role: 'group', 'aria-labelledby': id },
    h('h3', { class: 'chain-col-title', id }, title),
    h('ul', { class: 'chain-nodes' }, boxes));
}

/** Short text for a node, as the "→ …" line of what leads to it. */
function describeNode(n, targets, dc, key) {
  if (!n) return shortName(key);
  if (n.Type === 'router') return `router of ${shortName(n.Name)}`;
  if (n.Type === 'splitter') return `splitter of ${shortName(n.Name)}`;
  const t = targets[n.Resolver?.Target];
  return `resolver ${t ? targetText(t, dc) : shortName(n.Name)}`;
}

// ---------- Boxes ----------

function routerBox(key, n, model, anchor, nameOf) {
  const routes = n.Routes || [];
  const chainService = model.chain.ServiceName;
  return anchor(key, h('li', { class: 'chain-box box-router', dataset: { node: key } },
    h('span', { class: 'box-kind' }, 'Router'),
    h('span', { class: 'box-title' }, shortName(n.Name)),
    h('ol', { class: 'box-rows', 'aria-label': `Routes of ${shortName(n.Name)}, in the order they are tried` }, routes.map((r, i) => {
      const def = r.Definition || {};
      const isDefault = i === routes.length - 1 && isCatchAll(def.Match) && (def.Destination?.Service || chainService) === chainService;
      const dest = def.Destination || {};
      return anchor(`${key}/route/${i}`, h('li', { class: `box-row route-row${isDefault ? ' route-default' : ''}`, dataset: { route: String(i + 1), next: r.NextNode || '', default: isDefault ? 'yes' : null } },
        h('span', { class: 'row-label' }, isDefault ? 'Default route' : `Route ${i + 1}`),
        isDefault
          ? h('span', { class: 'match muted' }, 'any other request')
          : h('ul', { class: 'match-list', 'aria-label': 'Matches when' }, matchSummary(def.Match).map((m) => h('li', { class: 'match' }, m))),
        destinationExtras(dest).map((x) => h('span', { class: 'box-line muted small' }, x)),
        h('span', { class: 'box-next' }, `→ ${nameOf(r.NextNode)}`)));
    }))));
}

function splitterBox(key, n, model, anchor, nameOf) {
  const splits = n.Splits || [];
  return anchor(key, h('li', { class: 'chain-box box-splitter', dataset: { node: key } },
    h('span', { class: 'box-kind' }, 'Splitter'),
    h('span', { class: 'box-title' }, shortName(n.Name)),
    h('ol', { class: 'box-rows', 'aria-label': `Splits of ${shortName(n.Name)}` }, splits.map((s, i) => {
      const weight = percent(s.Weight);
      return anchor(`${key}/split/${i}`, h('li', { class: 'box-row split-row', dataset: { split: String(i + 1), weight: String(s.Weight ?? 0), next: s.NextNode || '' } },
        h('span', { class: 'split-weight' }, weight),
        h('span', { class: 'box-line' }, `of requests → ${nameOf(s.NextNode)}`),
        headerChanges(s.Definition).map((x) => h('span', { class: 'box-line muted small' }, x))));
    }))));
}

function resolverBox(key, n, model, anchor) {
  const r = n.Resolver || {};
  const { targets, dc, chain } = model;
  const t = targets[r.Target] || {};
  const lines = [];
  if (t.ServiceSubset) {
    lines.push(h('span', { class: 'box-line' }, 'Subset ', h('strong', null, t.ServiceSubset)));
    if (t.Subset?.Filter) lines.push(h('span', { class: 'box-line' }, 'Filter ', h('code', { class: 'filter-expr' }, breakable(t.Subset.Filter))));
    if (t.Subset?.OnlyPassing) lines.push(h('span', { class: 'box-line' }, 'Only instances with passing checks'));
  }
  // A redirect: what led here asked for another service (or the target is in another DC).
  const from = [...new Set((model.asked.get(key) || []).filter((svc) => t.Service && svc !== t.Service))];
  if (from.length) lines.push(h('span', { class: 'box-line redirect' }, `Redirect from ${from.join(', ')}`));
  if (t.Datacenter && dc && t.Datacenter !== dc) lines.push(h('span', { class: 'box-line redirect' }, `Redirect to datacenter ${t.Datacenter}`));
  if (r.ConnectTimeout) lines.push(h('span', { class: 'box-line' }, `Connect timeout ${duration(r.ConnectTimeout)}`));
  if (r.RequestTimeout) lines.push(h('span', { class: 'box-line' }, `Request timeout ${duration(r.RequestTimeout)}`));
  if (n.LoadBalancer?.Policy) lines.push(h('span', { class: 'box-line' }, `Load balancing ${n.LoadBalancer.Policy}`));
  if (r.Default) lines.push(h('span', { class: 'box-line muted' }, `Defaults: no service-resolver for ${t.Service || shortName(n.Name)}`));
  const failovers = r.Failover?.Targets || [];
  return anchor(key, h('li', { class: 'chain-box box-resolver', dataset: { node: key, target: r.Target || '' } },
    h('span', { class: 'box-kind' }, 'Resolver'),
    h('span', { class: 'box-title' }, t.Service || shortName(n.Name)),
    lines,
    anchor(`${key}/target`, h('span', { class: 'box-next' }, `→ target ${targetText(t, dc) || shortName(r.Target)}${t.Datacenter ? ` in ${t.Datacenter}` : ''}`)),
    failovers.length
      ? h('div', { class: 'failover-part' },
        h('span', { class: 'box-line failover-title' }, 'Failover, in order'),
        h('ol', { class: 'box-rows failover-list', 'aria-label': `Failover targets of ${targetText(t, dc) || chain.ServiceName}` }, failovers.map((id, i) => {
          const ft = targets[id];
          return anchor(`${key}/failover/${i}`, h('li', { class: 'box-row failover-row', dataset: { failover: String(i + 1), next: `target:${id}` } },
            `${i + 1}. ${ft ? targetText(ft, ft.Datacenter) : shortName(id)}${ft?.Datacenter ? ` in ${ft.Datacenter}` : ''}`));
        })))
      : null));
}

function targetBox(id, model, anchor) {
  const t = model.targets[id] || {};
  const failover = model.failoverOf.get(id) || [];
  const primary = model.primaryOf.get(id) || [];
  const onlyFailover = failover.length > 0 && primary.length === 0;
  const service = t.Service || shortName(id);
  return anchor(`target:${id}`, h('li', {
    class: `chain-box box-target${onlyFailover ? ' box-failover' : ''}`,
    title: t.SNI ? `SNI ${t.SNI}` : null,
    dataset: { targetId: id, role: onlyFailover ? 'failover' : 'primary' },
  },
  h('span', { class: 'box-kind' }, onlyFailover ? 'Failover target' : 'Target'),
  h('a', { class: 'box-title', href: link(`/services/${encodeURIComponent(service)}`, t.Datacenter || undefined) }, service),
  t.ServiceSubset ? h('span', { class: 'box-line' }, 'Subset ', h('strong', null, t.ServiceSubset)) : h('span', { class: 'box-line muted' }, 'All instances'),
  h('span', { class: 'box-line' }, `Datacenter ${t.Datacenter || '?'}`),
  t.MeshGateway?.Mode ? h('span', { class: 'box-line' }, `Mesh gateway ${t.MeshGateway.Mode}`) : null,
  t.External ? h('span', { class: 'box-line' }, 'External service') : null,
  failover.map((f) => {
    const of = model.targets[model.nodes[f.resolver]?.Resolver?.Target];
    return h('span', { class: 'box-line failover-note' }, `Failover ${f.order} for ${of ? `${targetText(of, of.Datacenter)} in ${of.Datacenter}` : shortName(f.resolver)}`);
  })));
}

// ---------- Text: matches, destinations, durations ----------

function isCatchAll(match) {
  const m = match?.HTTP;
  if (!m) return !match;
  const keys = Object.keys(m).filter((k) => {
    const v = m[k];
    return !(v === '' || v === null || v === undefined || v === false || (Array.isArray(v) && v.length === 0));
  });
  return keys.length === 0 || (keys.length === 1 && m.PathPrefix === '/');
}

/** One line per condition of a route's match (all of them must hold). */
export function matchSummary(match) {
  const m = match?.HTTP || {};
  const out = [];
  if (m.PathExact) out.push(`path is ${m.PathExact}`);
  if (m.PathPrefix) out.push(`path starts with ${m.PathPrefix}`);
  if (m.PathRegex) out.push(`path matches regex ${m.PathRegex}`);
  for (const hd of m.Header || []) out.push(`header ${condition(hd)}`);
  for (const q of m.QueryParam || []) out.push(`query ${condition(q)}`);
  if (Array.isArray(m.Methods) && m.Methods.length) out.push(`method ${m.Methods.join(' or ')}`);
  if (m.CaseInsensitive) out.push('(path case-insensitive)');
  if (!out.length) out.push('any request');
  return out;
}

function condition(c) {
  const not = c.Invert ? ' not' : '';
  const n = c.Name || '?';
  if (c.Present) return `${n} is${c.Invert ? ' absent' : ' present'}`;
  if (c.Exact !== undefined && c.Exact !== '') return `${n} is${not} “${c.Exact}”`;
  if (c.Prefix) return `${n}${not} starting with “${c.Prefix}”`;
  if (c.Suffix) return `${n}${not} ending with “${c.Suffix}”`;
  if (c.Contains) return `${n}${not} containing “${c.Contains}”`;
  if (c.Regex) return `${n}${not} matching regex ${c.Regex}`;
  return c.Invert ? `${n} is absent` : `${n} is present`;
}

/** Rewrites, timeouts, retries and header changes of a route's destination. */
function destinationExtras(d) {
  const out = [];
  if (d.PrefixRewrite) out.push(`rewrites the prefix to ${d.PrefixRewrite}`);
  if (d.RequestTimeout) out.push(`request timeout ${duration(d.RequestTimeout)}`);
  if (d.IdleTimeout) out.push(`idle timeout ${duration(d.IdleTimeout)}`);
  const retries = [];
  if (d.NumRetries) retries.push(`up to ${d.NumRetries}`);
  if (d.RetryOnConnectFailure) retries.push('on connect failure');
  if (Array.isArray(d.RetryOnStatusCodes) && d.RetryOnStatusCodes.length) retries.push(`on status ${d.RetryOnStatusCodes.join(', ')}`);
  if (Array.isArray(d.RetryOn) && d.RetryOn.length) retries.push(`on ${d.RetryOn.join(', ')}`);
  if (retries.length) out.push(`retries ${retries.join(', ')}`);
  out.push(...headerChanges(d));
  return out;
}

function headerChanges(d) {
  const out = [];
  for (const [field, what] of [['RequestHeaders', 'request'], ['ResponseHeaders', 'response']]) {
    const m = d?.[field];
    if (!m) continue;
    const names = [...Object.keys(m.Add || {}), ...Object.keys(m.Set || {}), ...(m.Remove || [])];
    if (names.length) out.push(`changes ${what} headers ${names.join(', ')}`);
  }
  return out;
}

/** Text with line-break opportunities after each "." (long filter expressions in a narrow box). */
function breakable(text) {
  return String(text).split(/(?<=\.)/).flatMap((part, i) => (i ? [h('wbr'), part] : [part]));
}

function percent(w) {
  const n = Number(w) || 0;
  return `${Number.isInteger(n) ? n : Number(n.toFixed(2))}%`;
}

/** A Go duration string as is; a number of nanoseconds as "1.5s", "250ms", "2m30s". */
export function duration(v) {
  if (typeof v === 'string') return v;
  const ns = Number(v) || 0;
  if (ns >= 60e9) {
    const m = Math.floor(ns / 60e9);
    const s = Number(((ns - m * 60e9) / 1e9).toFixed(3));
    return s ? `${m}m${s}s` : `${m}m`;
  }
  if (ns >= 1e9) return `${Number((ns / 1e9).toFixed(3))}s`;
  if (ns >= 1e6) return `${Number((ns / 1e6).toFixed(3))}ms`;
  return `${ns}ns`;
}

// ---------- Notes above and the legend below ----------

function notes(chain, protocol, model) {
  const out = [];
  const svc = chain.ServiceName;
  if (!HTTP_LIKE.has(protocol)) {
    out.push(h('p', { class: 'routing-note', dataset: { note: 'tcp' } },
      `“${svc}” speaks ${protocol}: its traffic is routed per connection, not per request, so it has no routes or splits. `,
      'Its resolver alone decides where connections go. Set ', h('code', null, 'Protocol = "http"'),
      ' (or http2, grpc) in its service-defaults to route requests by path, header or method and to split them by weight.'));
  }
  if (chain.Default) {
    out.push(h('p', { class: 'routing-note muted', dataset: { note: 'default' } },
      `No service-router, service-splitter or service-resolver applies to “${svc}”: callers reach all its healthy instances in ${chain.Datacenter || 'this datacenter'}, with the default connect timeout.`));
  } else if (HTTP_LIKE.has(protocol) && !model.columns.router.length) {
    out.push(h('p', { class: 'routing-note muted', dataset: { note: 'no-router' } }, `No service-router for “${svc}”: every request takes the same way.`));
  }
  return out.length ? h('div', { class: 'routing-notes' }, out) : null;
}

function legend(model) {
  const hasFailover = model.edges.some((e) => e.kind === 'failover');
  const sample = (cls) => {
    const s = document.createElementNS(SVG_NS, 'svg');
    s.setAttribute('class', 'legend-line');
    s.setAttribute('viewBox', '0 0 36 10');
    s.setAttribute('aria-hidden', 'true');
    const p = document.createElementNS(SVG_NS, 'path');
    p.setAttribute('d', 'M1 5H35');
    p.setAttribute('class', `edge ${cls}`);
    s.append(p);
    return s;
  };
  return h('ul', { class: 'chain-legend', 'aria-label': 'Legend' },
    h('li', null, sample('edge-next'), 'next step (solid line)'),
    hasFailover ? h('li', null, sample('edge-failover'), 'failover, tried in the numbered order when the target has no healthy instance (dashed line)') : null);
}

// ---------- The connector lines ----------

/**
 * Draw every edge as a curve from the right edge of its source box (at the height of the row
 * it leaves from) to the left edge of its destination box. An edge that skips a column runs
 * through it in a free lane (above, between or below that column's boxes), never behind a
 * box it does not touch. Each path carries data-from / data-to (node keys, "service", or
 * "target:<id>"), data-kind and data-index, so what it joins can be read back.
 */
function drawEdges(svg, grid, edges, anchors) {
  if (!grid.isConnected) return;
  const origin = grid.getBoundingClientRect();
  const width = Math.max(grid.scrollWidth, Math.ceil(origin.width));
  const height = Math.max(grid.scrollHeight, Math.ceil(origin.height));
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height));
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  const rel = (r) => ({ left: r.left - origin.left, right: r.right - origin.left, top: r.top - origin.top, bottom: r.bottom - origin.top, height: r.height });
  const cols = [...grid.querySelectorAll(':scope > .chain-col')].map((col) => ({
    el: col,
    rect: rel(col.getBoundingClientRect()),
    floor: rel(col.querySelector('.chain-col-title').getBoundingClientRect()).bottom + 4,
    boxes: [...col.querySelectorAll(':scope > .chain-nodes > .chain-box')].map((b) => rel(b.getBoundingClientRect())),
  }));
  const colOf = (el) => cols.findIndex((c) => c.el.contains(el));

  /** A height near `want` where a line can cross column `c` without touching a box. */
  const lane = (c, want) => {
    const free = (y) => y > c.floor && y < height + 10 && c.boxes.every((b) => y < b.top - 4 || y > b.bottom + 4);
    if (free(want)) return want;
    const candidates = [];
    c.boxes.forEach((b, i) => {
      candidates.push(b.top - 8, b.bottom + 8);
      const next = c.boxes[i + 1];
      if (next) candidates.push((b.bottom + next.top) / 2);
    });
    return candidates.filter(free).sort((a, b) => Math.abs(a - want) - Math.abs(b - want))[0] ?? want;
  };

  const defs = document.createElementNS(SVG_NS, 'defs');
  for (const kind of ['next', 'failover']) {
    const marker = document.createElementNS(SVG_NS, 'marker');
    marker.setAttribute('id', `chain-arrow-${kind}`);
    marker.setAttribute('viewBox', '0 0 10 10');
    marker.setAttribute('refX', '9');
    marker.setAttribute('refY', '5');
    marker.setAttribute('markerWidth', '7');
    marker.setAttribute('markerHeight', '7');
    marker.setAttribute('orient', 'auto-start-reverse');
    const tip = document.createElementNS(SVG_NS, 'path');
    tip.setAttribute('d', 'M0 0L10 5L0 10z');
    tip.setAttribute('class', `arrow arrow-${kind}`);
    marker.append(tip);
    defs.append(marker);
  }
  const r = (n) => Math.round(n * 10) / 10;
  const paths = [];
  const labels = [];
  for (const e of edges) {
    const fromEl = anchors.get(e.fromAnchor);
    const toEl = anchors.get(e.to);
    const fromBoxEl = fromEl?.closest('.chain-box');
    const toBoxEl = toEl?.closest('.chain-box');
    if (!fromBoxEl || !toBoxEl) continue;
    const row = rel(fromEl.getBoundingClientRect());
    const from = rel(fromBoxEl.getBoundingClientRect());
    const to = rel(toBoxEl.getBoundingClientRect());
    const x1 = from.right;
    const y1 = row.top + row.height / 2;
    const x2 = to.left - 1;
    const y2 = to.top + Math.min(to.height / 2, 28);
    // Waypoints, each left and entered horizontally: start, through skipped columns, end.
    const points = [[x1, y1]];
    const [ca, cb] = [colOf(fromBoxEl), colOf(toBoxEl)];
    for (let c = ca + 1; c < cb; c++) {
      const col = cols[c].rect;
      const mid = (col.left + col.right) / 2;
      const want = y1 + ((y2 - y1) * (mid - x1)) / Math.max(1, x2 - x1);
      const y = lane(cols[c], want);
      points.push([col.left - 6, y], [col.right + 6, y]);
    }
    points.push([x2, y2]);
    let d = `M${r(x1)} ${r(y1)}`;
    for (let i = 1; i < points.length; i++) {
      const [xa, ya] = points[i - 1];
      const [xb, yb] = points[i];
      if (ya === yb) {
        d += ` L${r(xb)} ${r(yb)}`;
      } else {
        const dx = Math.max(12, (xb - xa) / 2);
        d += ` C${r(xa + dx)} ${r(ya)} ${r(xb - dx)} ${r(yb)} ${r(xb)} ${r(yb)}`;
      }
    }
    const failover = e.kind === 'failover';
    const p = document.createElementNS(SVG_NS, 'path');
    p.setAttribute('d', d);
    p.setAttribute('class', `edge edge-${e.kind} ${failover ? 'edge-failover' : 'edge-next'}`);
    p.setAttribute('marker-end', `url(#chain-arrow-${failover ? 'failover' : 'next'})`);
    Object.assign(p.dataset, { from: e.from, to: e.to, kind: e.kind, index: String(e.index) });
    paths.push(p);
    if (failover) {
      // "failover N" over the middle of the last stretch, in the gap before the target.
      const [xa, ya] = points[points.length - 2];
      const t = document.createElementNS(SVG_NS, 'text');
      t.setAttribute('x', String(r((xa + x2) / 2)));
      t.setAttribute('y', String(r((ya + y2) / 2 - 5)));
      t.setAttribute('text-anchor', 'middle');
      t.setAttribute('class', 'edge-label');
      Object.assign(t.dataset, { from: e.from, to: e.to, index: String(e.index) });
      t.textContent = `failover ${e.index}`;
      labels.push(t);
    }
  }
  svg.replaceChildren(defs, ...paths, ...labels);
  svg.dataset.edges = String(paths.length);
}
