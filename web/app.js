// Trellis web UI: bootstraps the header, datacenter picker and hash router.
import { h } from './js/dom.js';
import { get, setDatacenters } from './js/api.js';
import { parseHash, link, routerState, decodeSegment } from './js/router.js';
import { errorBox } from './js/common.js';
import { servicesList, serviceDetail } from './js/views/services.js';
import { nodesList, nodeDetail } from './js/views/nodes.js';
import { kvView } from './js/views/kv.js';
import { intentionsList } from './js/views/intentions.js';

const main = document.getElementById('main');
const picker = document.getElementById('dc-picker');
const select = document.getElementById('dc-select');
let controller = null;
let firstRender = true;

/** Match a route path to a view. */
function route(path) {
  let m;
  if (path === '/' || path === '') return { redirect: '/services' };
  if (path === '/services' || path === '/services/') return { section: 'services', title: 'Services', view: servicesList, params: {} };
  if ((m = /^\/services\/(.+)$/.exec(path))) {
    const name = decodeSegment(m[1]);
    return { section: 'services', title: name, view: serviceDetail, params: { name } };
  }
  if (path === '/nodes' || path === '/nodes/') return { section: 'nodes', title: 'Nodes', view: nodesList, params: {} };
  if ((m = /^\/nodes\/(.+)$/.exec(path))) {
    const name = decodeSegment(m[1]);
    return { section: 'nodes', title: name, view: nodeDetail, params: { name } };
  }
  if (path === '/intentions' || path === '/intentions/') return { section: 'intentions', title: 'Intentions', view: intentionsList, params: {} };
  if (path === '/kv') return { redirect: '/kv/' };
  if ((m = /^\/kv\/(.*)$/.exec(path))) {
    const p = m[1].split('/').map(decodeSegment).join('/');
    return { section: 'kv', title: p || 'Key/Value', view: kvView, params: { path: p } };
  }
  return { section: null, title: 'Not found', view: notFound, params: {} };
}

function notFound({ root }) {
  root.append(h('h1', { tabindex: '-1' }, 'Page not found'),
    h('p', null, 'There is nothing at this address. ', h('a', { href: link('/services') }, 'Go to services'), '.'));
}

function render() {
  const { path, dc } = parseHash();
  const state = routerState();
  state.dc = dc || state.localDc;
  setDatacenters(state.localDc, state.dc);

  const r = route(path);
  if (r.redirect) {
    history.replaceState(null, '', `${location.pathname}${location.search}${link(r.redirect)}`);
    return render();
  }

  controller?.abort();
  controller = new AbortController();
  // A confirmation left open belongs to the page being left: cancel it.
  for (const d of document.querySelectorAll('dialog[open]')) d.close('cancel');
  updateHeader(r.section);
  document.title = `${r.title} · ${state.dc ? `${state.dc} · ` : ''}Trellis`;
  main.replaceChildren();
  try {
    r.view({ root: main, signal: controller.signal, params: r.params });
  } catch (err) {
    main.replaceChildren(errorBox(err, { retrying: false }));
    throw err;
  }
  if (!firstRender) {
    window.scrollTo(0, 0);
    main.querySelector('h1')?.focus({ preventScroll: true });
  }
  firstRender = false;
}

function updateHeader(section) {
  for (const a of document.querySelectorAll('[data-nav]')) {
    const target = a.dataset.nav;
    a.href = link(target === 'kv' ? '/kv/' : `/${target}`);
    if (target === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.querySelector('.brand').href = link('/services');

  const { datacenters, localDc, dc } = routerState();
  const names = [...datacenters];
  if (dc && !names.includes(dc)) names.push(dc); // unknown DC from a shared link: still show it
  select.replaceChildren(...names.map((name) =>
    h('option', { value: name, selected: name === dc }, name === localDc ? `${name} (local)` : (datacenters.includes(name) ? name : `${name} (unknown)`))));
  select.value = dc || '';
  picker.hidden = names.length <= 1;
}

select.addEventListener('change', () => {
  const { path } = parseHash();
  const m = /^\/(services|nodes|intentions|kv)/.exec(path);
  const section = m ? (m[1] === 'kv' ? '/kv/' : `/${m[1]}`) : '/services';
  location.hash = link(section, select.value);
});

async function start() {
  // Accept "/ui/?dc=dc2#/nodes" as well as "#/nodes?dc=dc2".
  const search = new URLSearchParams(location.search);
  if (search.get('dc')) {
    const { path, dc } = parseHash();
    const want = dc || search.get('dc');
    search.delete('dc');
    const q = search.toString();
    history.replaceState(null, '', `${location.pathname}${q ? `?${q}` : ''}#${path}?dc=${encodeURIComponent(want)}`);
  }

  const state = routerState();
  const [self, dcs] = await Promise.allSettled([get('agent/self'), get('catalog/datacenters')]);
  const local = self.status === 'fulfilled' ? self.value.data?.Config?.Datacenter || null : null;
  const list = dcs.status === 'fulfilled' && Array.isArray(dcs.value.data) ? dcs.value.data : [];
  state.localDc = local || list[0] || null;
  state.datacenters = state.localDc ? [state.localDc, ...list.filter((d) => d !== state.localDc)] : list;

  window.addEventListener('hashchange', render);
  render();

  const failed = [self, dcs].find((r) => r.status === 'rejected');
  if (failed) {
    main.prepend(errorBox(failed.reason, { retrying: false, what: 'read the agent’s datacenter information' }));
  }
}

document.getElementById('skip-link').addEventListener('click', (ev) => {
  ev.preventDefault();
  (main.querySelector('h1') || main).focus();
});

start();
