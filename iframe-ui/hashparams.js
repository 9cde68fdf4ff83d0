// The page's URL hash, in the two formats it reads: cq's own (`#queue=local&job={json}`) and the
// reference system's hash-query format (`#?job=<base64>&queue=…`: keys sorted, values
// URL-encoded, JSON values as base64 of the JSON, booleans true only when the text is `true`).
// Reading is pure; the page decides what to do with the result. See docs/embedding.md.

/** Parameters the page reads itself; in the reference format every other one becomes an
 * environment variable of the job, as the reference does. */
export const SYSTEM_PARAMS = new Set([
  // the reference's
  'job', 'inputs', 'queue', 'queueOverride', 'ignoreQueueOverride', 'control', 'definition', 'autostart',
  'allowsetjob', 'resolverefs', 'terminal', 'debug', 'maxJobDuration', 'config',
  // cq's
  'namespace', 'jobId', 'line', 'view', 'token', 'origin', 'jobformat',
  // set by metapage hosts and editors, never meant for the job (the reference's successor
  // excludes them from the job too)
  'channel', 'CHANNEL', 'readonly', 'edit', 'parent-metapage-id', 'fs-path', 'metapage', 'metaframe',
]);

/** JSON-valued parameters. */
const JSON_PARAMS = ['job', 'inputs', 'control', 'definition'];

/** Splits a hash into its format and its decoded `key → text` pairs. */
export function splitHash(hash) {
  let text = hash;
  while (text.startsWith('#')) text = text.slice(1);
  const q = text.indexOf('?');
  const params = new Map();
  if (q === -1) {
    for (const [k, v] of new URLSearchParams(text)) params.set(k, v);
    return { format: 'cq', pre: '', params };
  }
  // hash-query: split on `&` and the first `=`, then URL-decode (no `+` → space, unlike
  // URLSearchParams: `+` is a base64 character).
  for (const part of text.slice(q + 1).split('&')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const key = eq === -1 ? part : part.slice(0, eq);
    const raw = eq === -1 ? '' : part.slice(eq + 1);
    let value = raw;
    try { value = decodeURIComponent(raw); } catch { /* keep it as written, as hash-query does */ }
    params.set(key, value);
  }
  return { format: 'reference', pre: text.slice(0, q), params };
}

/** Decodes a JSON parameter: plain JSON (cq's format), or base64 of the JSON, with or without
 * the URI-encoding older hash-query versions applied before base64. */
export function decodeJson(text) {
  if (text === undefined || text === null || text === '') return undefined;
  const t = text.trim();
  if (t.startsWith('{') || t.startsWith('[')) return JSON.parse(t);
  let b64 = t;
  while (b64.endsWith('%3D')) b64 = b64.slice(0, -3);
  const binary = atob(b64);
  if (binary.includes('%')) return JSON.parse(decodeURIComponent(binary));
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  let json;
  try { json = new TextDecoder('utf-8', { fatal: true }).decode(bytes); } catch { json = binary; }
  return JSON.parse(json);
}

/** Reads the page's configuration from a hash. Throws (with the parameter's name) when a JSON
 * parameter cannot be decoded. */
export function readHash(hash) {
  const { format, pre, params } = splitHash(hash);
  const reference = format === 'reference';
  const bool = (k) => (reference ? params.get(k) === 'true' : ['1', 'true', 'yes'].includes(params.get(k) || ''));
  const json = {};
  for (const k of JSON_PARAMS) {
    try {
      json[k] = decodeJson(params.get(k));
    } catch (e) {
      throw new Error(`the \`${k}\` hash parameter is neither JSON nor base64 of JSON (${e.message})`);
    }
  }
  const override = !bool('ignoreQueueOverride') && params.get('queueOverride');
  const control = json.control || {};
  const env = {};
  if (reference) {
    for (const [k, v] of params) {
      if (SYSTEM_PARAMS.has(k) || k.startsWith('mp_') || k.startsWith('mp-')) continue;
      if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) env[k] = v;
    }
  }
  return {
    format,
    pre,
    params,
    queue: override || params.get('queue') || 'local',
    namespace: params.get('namespace') || control.namespace || null,
    autostart: bool('autostart'),
    allowSetJob: bool('allowsetjob'),
    resolveRefs: bool('resolverefs'),
    debug: bool('debug'),
    maxJobDuration: params.get('maxJobDuration') || null,
    hostOrigin: params.get('origin') || '*',
    view: params.get('view') || 'job',
    token: params.get('token') || null,
    jobId: params.get('jobId') || null,
    /** A log line to scroll to and highlight (1-based), or 0. */
    line: Math.max(0, parseInt(params.get('line') || '0', 10) || 0),
    // In the reference format `job` is a reference definition unless the page wrote it itself.
    jobFormat: reference && params.get('jobformat') !== 'cq' ? 'reference' : 'cq',
    job: json.job,
    inputs: json.inputs,
    control,
    env,
  };
}

/** The reference definition the reference's page would run for this configuration: the `job`
 * parameter, plus the `inputs` parameter as utf8 `configFiles`, plus the other parameters as
 * environment variables that also replace `${KEY}` in `command` and `build.context`. */
export function referenceDefinition(config, job = config.job) {
  const def = structuredClone(job || {});
  if (config.inputs && Object.keys(config.inputs).length) {
    def.configFiles = { ...(def.configFiles || {}) };
    for (const [name, text] of Object.entries(config.inputs)) def.configFiles[name] = { type: 'utf8', value: String(text) };
  }
  if (Object.keys(config.env).length) {
    def.env = { ...(def.env || {}), ...config.env };
    const substitute = (s) => s.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (m, k) => (k in config.env ? config.env[k] : m));
    if (typeof def.command === 'string') def.command = substitute(def.command);
    if (def.build && typeof def.build.context === 'string') def.build = { ...def.build, context: substitute(def.build.context) };
  }
  // The reference's page keeps maxJobDuration to itself; cq applies it to a job that sets none.
  if (config.maxJobDuration && !def.maxDuration) def.maxDuration = config.maxJobDuration;
  return def;
}

/** JSON with object keys sorted, as the reference's hash-query writes it. */
export function stableStringify(value) {
  if (Array.isArray(value)) return `[${value.map(stableStringify).join(',')}]`;
  if (value && typeof value === 'object') {
    return `{${Object.keys(value).sort().filter((k) => value[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${stableStringify(value[k])}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/** The hash with `updates` applied (`undefined` removes a key), written in the format it was
 * read in. JSON values are objects here and are encoded as that format encodes them. */
export function writeHash(hash, updates) {
  const { format, pre, params } = splitHash(hash);
  for (const [k, v] of Object.entries(updates)) {
    if (v === undefined || v === null) params.delete(k);
    else params.set(k, typeof v === 'string' ? v : v);
  }
  if (format === 'cq') {
    const out = new URLSearchParams();
    for (const [k, v] of params) out.set(k, typeof v === 'string' ? v : JSON.stringify(v));
    return `#${out.toString()}`;
  }
  const keys = [...params.keys()].sort();
  const parts = keys.map((k) => {
    const v = params.get(k);
    // btoa(encodeURIComponent(json)) survives any character; the decoder of every hash-query
    // version reads it.
    if (typeof v !== 'string') return `${k}=${btoa(encodeURIComponent(stableStringify(v)))}`;
    const base64Like = /^[A-Za-z0-9+/]+={0,2}$/.test(v) && v.length % 4 === 0;
    return `${k}=${base64Like ? v : encodeURIComponent(v)}`;
  });
  return `#${pre}?${parts.join('&')}`;
}
