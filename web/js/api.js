// Consul HTTP API client with datacenter handling and blocking queries.
import { sleep } from './dom.js';

const ctx = { localDc: null, dc: null };

/** Set the agent's own datacenter and the one the user chose. */
export function setDatacenters(localDc, chosenDc) {
  ctx.localDc = localDc;
  ctx.dc = chosenDc;
}

export function currentDc() {
  return ctx.dc || ctx.localDc;
}

export function isRemoteDc() {
  return Boolean(ctx.dc && ctx.dc !== ctx.localDc);
}

export class ApiError extends Error {
  constructor(status, statusText, body, url) {
    const detail = (body || '').trim() || statusText || 'Request failed';
    super(status ? `${detail} (HTTP ${status})` : detail);
    this.name = 'ApiError';
    this.status = status;
    this.detail = detail;
    this.url = url;
  }
}

/** Encode a path made of user/server strings: each "/"-separated part is escaped. */
export function encodePath(path) {
  return String(path).split('/').map(encodeURIComponent).join('/');
}

/**
 * Build "/v1/<path>?<query>". `params` is an object; a value of `true`
 * produces a bare flag ("?keys"), null/undefined/false are skipped.
 * `dc` is added when the chosen datacenter is not the agent's own.
 */
export function apiUrl(path, params = {}) {
  const parts = [];
  const all = { ...params };
  if (isRemoteDc()) all.dc = ctx.dc;
  for (const [k, v] of Object.entries(all)) {
    if (v === null || v === undefined || v === false) continue;
    parts.push(v === true ? encodeURIComponent(k) : `${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
  }
  return `/v1/${path}${parts.length ? `?${parts.join('&')}` : ''}`;
}

/**
 * Perform a request. Resolves to {status, data, index}. `data` is parsed
 * JSON (or null for an empty body). A 404 resolves with data null when
 * `allow404` is set; any other non-2xx status rejects with ApiError.
 */
export async function request(method, path, { params, body, signal, allow404 = false } = {}) {
  const url = apiUrl(path, params);
  let res;
  try {
    res = await fetch(url, {
      method,
      body,
      signal,
      headers: body !== undefined ? { 'Content-Type': 'application/octet-stream' } : undefined,
      cache: 'no-store',
    });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, '', `Could not reach the Trellis agent: ${err.message}`, url);
  }
  const index = Number(res.headers.get('X-Consul-Index')) || 0;
  const text = await res.text();
  if (res.status === 404 && allow404) return { status: 404, data: null, index };
  if (!res.ok) throw new ApiError(res.status, res.statusText, text, url);
  let data = null;
  if (text.trim() !== '') {
    try {
      data = JSON.parse(text);
    } catch {
      throw new ApiError(res.status, res.statusText, `Unexpected response from ${url}`, url);
    }
  }
  return { status: res.status, data, index };
}

export const get = (path, opts) => request('GET', path, opts);

/**
 * Follow a GET through Consul blocking queries until `signal` aborts.
 * onData(data, response) runs for the first answer and every time the
 * X-Consul-Index changes; onError(err) runs on failures, after which
 * the loop backs off (1 s, then 2 s) and tries again.
 */
export function watch(path, { params = {}, signal, allow404 = false, onData, onError }) {
  (async () => {
    let index = 0;
    let failures = 0;
    let mustDeliver = true;
    while (!signal.aborted) {
      const started = Date.now();
      const p = { ...params };
      if (index > 0) {
        p.index = index;
        p.wait = '30s';
      }
      let res;
      try {
        res = await request('GET', path, { params: p, signal, allow404 });
      } catch (err) {
        if (signal.aborted || err.name === 'AbortError') return;
        failures++;
        index = 0;
        mustDeliver = true;
        try { onError?.(err); } catch (e) { reportError(e); }
        await sleep(failures === 1 ? 1000 : 2000, signal);
        continue;
      }
      if (signal.aborted) return;
      failures = 0;
      const changed = res.index !== index;
      if (changed || mustDeliver) {
        mustDeliver = false;
        try { onData(res.data, res); } catch (e) { reportError(e); }
      }
      if (!res.index) {
        // No index header: the endpoint cannot block, so poll gently.
        index = 0;
        await sleep(5000, signal);
      } else {
        // Consul: reset when the index goes backwards.
        index = res.index < index ? 0 : res.index;
        // Guard against a server answering a blocking query at once
        // with the same index over and over.
        if (!changed && Date.now() - started < 250) await sleep(1000, signal);
      }
    }
  })();
}

function reportError(e) {
  // Surface programming errors without breaking the loop.
  setTimeout(() => { throw e; });
}
