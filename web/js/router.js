// Hash routing state shared by the views: "#/<path>?dc=<dc>".

const state = { localDc: null, dc: null, datacenters: [] };

export function routerState() {
  return state;
}

/** Parse location.hash into {path, dc}. */
export function parseHash(hash = location.hash) {
  const raw = hash.replace(/^#/, '');
  const qi = raw.indexOf('?');
  const path = (qi >= 0 ? raw.slice(0, qi) : raw) || '/';
  const query = new URLSearchParams(qi >= 0 ? raw.slice(qi + 1) : '');
  return { path, dc: query.get('dc') || null };
}

/** Hash link to `path` (already URL-encoded) in datacenter `dc` (default: the chosen one). */
export function link(path, dc = state.dc) {
  const q = dc && dc !== state.localDc ? `?dc=${encodeURIComponent(dc)}` : '';
  return `#${path}${q}`;
}

export function navigate(path, dc) {
  location.hash = link(path, dc);
}

/** Decode one URL path segment, tolerating malformed escapes. */
export function decodeSegment(s) {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}
