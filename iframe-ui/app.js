// The cq page: configure and run a job, watch it live (state, phase, logs, outputs), and watch
// a queue. Configuration comes from the URL hash and from the embedding page (postMessage);
// see docs/embedding.md. One job is on screen at a time: `showJob` switches, and forgets the
// job before; the log is drawn by logview.js.

import { Connection } from './connection.js';
import { LogView } from './logview.js';
import { readHash, referenceDefinition, writeHash } from './hashparams.js';
import { Metaframe, inputToDataRef } from './metaframe.js';

const $ = (sel) => document.querySelector(sel);

// ---- configuration -------------------------------------------------------------------------

// Both hash formats (cq's and the reference system's) are read by hashparams.js.
let hashError = null;
let hashConfig;
try { hashConfig = readHash(location.hash); } catch (e) { hashError = e.message; hashConfig = readHash(''); }
const config = {
  queue: hashConfig.queue,
  namespace: hashConfig.namespace,
  autostart: hashConfig.autostart,
  hostOrigin: hashConfig.hostOrigin,
  view: hashConfig.view,
  allowSetJob: hashConfig.allowSetJob,
  resolveRefs: hashConfig.resolveRefs,
  /** A line to show (`line=N`), of the job `jobId` names. */
  line: hashConfig.line ? { jobId: hashConfig.jobId, n: hashConfig.line } : null,
};
/** Where the broker is: this page's origin, or another broker when `queue` is its URL. */
let apiBase = '';
if (/^https?:\/\//.test(config.queue)) {
  const u = new URL(config.queue);
  apiBase = u.origin;
  config.queue = u.pathname.split('/').filter(Boolean).pop() || 'local';
}
let token = hashConfig.token || sessionStorage.getItem('cq-token') || null;
/** The definition from the host or the hash; form fields override its fields. */
let baseDefinition = (hashConfig.jobFormat === 'cq' && hashConfig.job) || {};
/** Inputs set by the host or the hash (beyond the form's text inputs and files). */
let extraInputs = (hashConfig.format === 'cq' && hashConfig.inputs) || {};

// ---- state ---------------------------------------------------------------------------------

/** The job on screen; everything in it belongs to that one job (see `showJob`). */
const job = {
  id: null,
  /** Counts showings: work started for an earlier one is dropped when it completes. */
  gen: 0,
  view: null,
  /** The definition of the job on screen, as submitted or fetched. */
  definition: null,
  definitionReady: Promise.resolve(),
  /** How its submission was answered (`created`, `joined`, `cached`, `rerun`), if it was ours. */
  outcome: null,
  /** Offset of the next log line expected from the broker. */
  next: 0,
  /** The log so far is being fetched over HTTP; the socket takes over after. */
  loading: false,
  toldState: null,
  toldFinish: null,
  outputsFor: null,
};
const queue = { name: config.queue, jobs: new Map(), workers: [], seq: 0 };
/** Uploaded files: name → {sha256, size}. */
const uploaded = new Map();
const test = {
  lineDelays: [], dropConnection: () => conn.drop(), holdConnection: () => conn.hold(), releaseConnection: () => conn.release(),
  job, queue, ignoredOrigins: [],
};
window.cq = test;

// ---- the host page -------------------------------------------------------------------------

// Only pages whose origin the broker allows (its own and its --allow-origin list) may drive the
// page or hear about its jobs: otherwise any site could frame it and run containers through it.
const allowedOrigins = fetch('/ui/config.json')
  .then((r) => r.json())
  .then((c) => new Set([location.origin, ...(c.allowOrigins || [])]))
  .catch(() => new Set([location.origin]));
/** The host's origin once known: from `origin=`, or from its first accepted message. */
let hostOrigin = null;
allowedOrigins.then((allowed) => {
  if (config.hostOrigin !== '*') {
    if (allowed.has(config.hostOrigin)) hostOrigin = config.hostOrigin;
    else console.warn(`cq: the host origin ${config.hostOrigin} is not allowed by this broker (--allow-origin)`);
  } else if (location.ancestorOrigins && allowed.has(location.ancestorOrigins[0])) {
    [hostOrigin] = location.ancestorOrigins;
  }
});

function tellHost(type, data) {
  if (window.parent === window) return;
  // `cq:ready` says nothing about any job, so it may go to whoever frames the page.
  if (type === 'cq:ready' && !hostOrigin) {
    window.parent.postMessage({ type, ...data }, '*');
    return;
  }
  if (hostOrigin) window.parent.postMessage({ type, ...data }, hostOrigin);
}

window.addEventListener('message', (ev) => {
  if (ev.source !== window.parent || window.parent === window) return;
  if (config.hostOrigin !== '*' && ev.origin !== config.hostOrigin) return;
  allowedOrigins.then((allowed) => {
    if (!allowed.has(ev.origin)) {
      console.warn(`cq: ignoring messages from ${ev.origin}: not an origin this broker allows (--allow-origin)`);
      test.ignoredOrigins.push(ev.origin);
      return;
    }
    hostOrigin = hostOrigin || ev.origin;
    fromHost(ev.data || {});
  });
});

function fromHost(msg) {
  switch (msg.type) {
    case 'cq:setJob':
      // A new definition: the job on screen is no longer the form's.
      showJob(null);
      baseDefinition = msg.definition || {};
      if (msg.queue) config.queue = msg.queue;
      if (msg.namespace !== undefined) config.namespace = msg.namespace;
      fillForm();
      break;
    case 'cq:setInputs':
      extraInputs = normaliseInputs(msg.inputs || {});
      renderTextInputs();
      break;
    case 'cq:run':
      run(Boolean(msg.force));
      break;
    case 'cq:cancel':
      cancel();
      break;
    default:
      break;
  }
}

/** Host inputs may be plain strings (text) or data refs. */
function normaliseInputs(inputs) {
  const out = {};
  for (const [name, v] of Object.entries(inputs)) out[name] = typeof v === 'string' ? { type: 'text', value: v } : v;
  return out;
}

// ---- the connection ------------------------------------------------------------------------

const connEl = $('#conn');
const conn = new Connection({
  token,
  base: apiBase,
  queue: () => queue.name,
  onState(state, detail) {
    connEl.dataset.state = state;
    connEl.textContent = {
      connecting: 'connecting…',
      open: 'live',
      reconnecting: `reconnecting…${detail ? ` (${detail})` : ''}`,
      unauthorized: 'token needed',
    }[state] || state;
    if (state === 'unauthorized') askToken(detail);
  },
  onOpen() {
    conn.send('watchQueue', { queue: queue.name });
    // Resume where the page is: no gap, no repeat.
    if (job.id && !job.loading) conn.send('watchJob', { jobId: job.id, since: job.next });
    if (config.autostart && !job.id && !autostarted) {
      autostarted = true;
      autostartGate.then(() => run(false));
    }
    if (runWhenOpen !== null) {
      const { force, definition } = runWhenOpen;
      runWhenOpen = null;
      submit(definition, force);
    }
  },
  onMessage,
});
let autostarted = false;
/** A run asked for before the connection was up (`{force, definition}`), started once it is. */
let runWhenOpen = null;

function askToken(reason) {
  const given = window.prompt(`This broker needs a client token${reason ? ` (${reason})` : ''}:`);
  if (given) {
    token = given.trim();
    sessionStorage.setItem('cq-token', token);
    conn.setToken(token);
  }
}

function onMessage(msg) {
  const d = msg.data;
  switch (msg.type) {
    case 'job':
      if (d.job.id === job.id) updateJob(d.job);
      break;
    case 'logs':
      // While the log so far comes over HTTP, the socket's lines wait: it is asked from where
      // HTTP ends.
      if (d.jobId === job.id && !job.loading) appendLogs(d.offset, d.lines);
      break;
    case 'queueSnapshot':
      if (d.queue !== queue.name) break;
      queue.seq = d.seq;
      queue.jobs = new Map(d.jobs.map((j) => [j.id, j]));
      queue.workers = d.workers;
      queue.summary = d.summary;
      renderQueue();
      break;
    case 'queueJob': {
      if (d.queue !== queue.name) break;
      const before = queue.jobs.get(d.job.id);
      queue.jobs.set(d.job.id, d.job);
      if (!before || before.state !== d.job.state) workersMayHaveChanged();
      renderQueueSoon();
      break;
    }
    case 'queueWorkers':
      if (d.queue !== queue.name) break;
      queue.workers = d.workers;
      clearTimeout(queue.refreshWorkers);
      queue.refreshWorkers = null;
      renderQueueSoon();
      break;
    case 'error':
      if (d.request === undefined) showError(d.message);
      break;
    default:
      break;
  }
}

// ---- the form ------------------------------------------------------------------------------

function shellQuote(args) {
  return args.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

function fillForm() {
  const d = baseDefinition;
  $('#image').value = d.image || '';
  $('#use-build').checked = Boolean(d.build);
  showBuildFields(Boolean(d.build));
  $('#dockerfile').value = (d.build && d.build.dockerfile) || '';
  $('#git-url').value = (d.build && d.build.git && d.build.git.url) || '';
  $('#git-ref').value = (d.build && d.build.git && d.build.git.ref) || '';
  $('#command').value = Array.isArray(d.command) ? shellQuote(d.command) : (d.command || '');
  $('#env').value = Object.entries(d.env || {}).map(([k, v]) => `${k}=${v}`).join('\n');
  const r = d.resources || {};
  $('#cpus').value = r.cpus ?? '';
  $('#memory').value = r.memory ?? '';
  $('#gpus').value = r.gpus ?? '';
  $('#max-duration').value = d.maxDuration ?? '';
  $('#queue').value = config.queue;
  const texts = {};
  for (const [name, v] of Object.entries(d.inputs || {})) if (v.type === 'text') texts[name] = v;
  extraInputs = { ...texts, ...extraInputs };
  renderTextInputs();
  // Inputs that are not text (files, URLs) are listed; they stay part of the job.
  $('#job-inputs').replaceChildren(...Object.entries(d.inputs || {}).filter(([, v]) => v.type !== 'text').map(([name, v]) => {
    const li = document.createElement('li');
    li.textContent = `${name} (${v.type}${v.size !== undefined ? `, ${formatBytes(v.size)}` : ''})`;
    return li;
  }));
  renderSummary();
}

function renderTextInputs() {
  const box = $('#text-inputs');
  box.replaceChildren();
  for (const [name, ref] of Object.entries(extraInputs)) {
    if (ref.type !== 'text') continue;
    addTextInputRow(name, ref.value);
  }
}

function addTextInputRow(name = '', value = '') {
  const row = document.createElement('div');
  row.className = 'row text-input';
  row.innerHTML = '<label>File name <input class="ti-name" spellcheck="false"></label>'
    + '<label class="grow">Content <textarea class="ti-value" rows="2" spellcheck="false"></textarea></label>'
    + '<button type="button" class="ti-remove" title="Remove" aria-label="remove this input">✕</button>';
  row.querySelector('.ti-name').value = name;
  row.querySelector('.ti-value').value = value;
  row.querySelector('.ti-remove').onclick = () => row.remove();
  $('#text-inputs').append(row);
}

$('#add-text-input').onclick = () => addTextInputRow();
function showBuildFields(on) {
  $('#build-fields').hidden = !on;
  // A built job has no image to pull: the field would only mislead.
  $('#image').closest('label').hidden = on;
}
$('#use-build').onchange = (e) => showBuildFields(e.target.checked);

function definitionFromForm() {
  const d = { ...baseDefinition };
  delete d.image; delete d.build;
  if ($('#use-build').checked) {
    const build = { ...(baseDefinition.build || {}) };
    const dockerfile = $('#dockerfile').value;
    const url = $('#git-url').value.trim();
    if (dockerfile.trim()) build.dockerfile = dockerfile; else delete build.dockerfile;
    if (url) build.git = { url, ...($('#git-ref').value.trim() ? { ref: $('#git-ref').value.trim() } : {}) };
    else delete build.git;
    d.build = build;
  } else {
    const image = $('#image').value.trim();
    if (image) d.image = image;
  }
  const command = $('#command').value.trim();
  if (command) d.command = command; else delete d.command;
  const env = {};
  for (const line of $('#env').value.split('\n')) {
    const i = line.indexOf('=');
    if (line.trim() && i > 0) env[line.slice(0, i).trim()] = line.slice(i + 1);
  }
  if (Object.keys(env).length) d.env = env; else delete d.env;
  const inputs = {};
  for (const [name, ref] of Object.entries(baseDefinition.inputs || {})) if (ref.type !== 'text') inputs[name] = ref;
  for (const [name, ref] of Object.entries(extraInputs)) if (ref.type !== 'text') inputs[name] = ref;
  for (const row of document.querySelectorAll('.text-input')) {
    const name = row.querySelector('.ti-name').value.trim();
    if (name) inputs[name] = { type: 'text', value: row.querySelector('.ti-value').value };
  }
  for (const [name, blob] of uploaded) inputs[name] = { type: 'blob', ...blob };
  if (Object.keys(inputs).length) d.inputs = inputs; else delete d.inputs;
  const resources = {};
  const cpus = parseFloat($('#cpus').value);
  if (!Number.isNaN(cpus)) resources.cpus = cpus;
  if ($('#memory').value.trim()) resources.memory = $('#memory').value.trim();
  const gpus = parseInt($('#gpus').value, 10);
  if (!Number.isNaN(gpus)) resources.gpus = gpus;
  if (Object.keys(resources).length) d.resources = resources; else delete d.resources;
  const maxDuration = $('#max-duration').value.trim();
  if (maxDuration) d.maxDuration = /^\d+$/.test(maxDuration) ? Number(maxDuration) : maxDuration; else delete d.maxDuration;
  return d;
}

// ---- uploads -------------------------------------------------------------------------------

function authHeaders() {
  return token ? { authorization: `Bearer ${token}` } : {};
}

$('#file-inputs').onchange = async (e) => {
  for (const file of e.target.files) await uploadFile(file);
  e.target.value = '';
};

async function uploadFile(file) {
  const li = document.createElement('li');
  const label = document.createElement('span');
  label.textContent = `${file.name} (${formatBytes(file.size)}) `;
  const bar = document.createElement('progress');
  bar.max = file.size || 1;
  bar.value = 0;
  li.append(label, bar);
  $('#file-list').append(li);
  try {
    if (!crypto.subtle) throw new Error('uploads need https or localhost (the browser hides crypto.subtle elsewhere)');
    const bytes = await file.arrayBuffer();
    const sha256 = [...new Uint8Array(await crypto.subtle.digest('SHA-256', bytes))]
      .map((b) => b.toString(16).padStart(2, '0')).join('');
    const planRes = await fetch(`${apiBase}/f/${sha256}/upload`, {
      method: 'POST', headers: { 'content-type': 'application/json', ...authHeaders() }, body: JSON.stringify({ size: file.size }),
    });
    const plan = await planRes.json();
    if (!planRes.ok) throw new Error(plan.error ? plan.error.message : `HTTP ${planRes.status}`);
    if (!plan.exists) {
      await new Promise((resolve, reject) => {
        const xhr = new XMLHttpRequest();
        const local = plan.url.startsWith('/');
        xhr.open(plan.method, local ? `${apiBase}${plan.url}` : plan.url);
        const headers = local ? { ...authHeaders(), ...plan.headers } : plan.headers;
        for (const [k, v] of Object.entries(headers || {})) xhr.setRequestHeader(k, v);
        xhr.upload.onprogress = (p) => { bar.value = p.loaded; };
        xhr.onload = () => (xhr.status < 300 ? resolve() : reject(new Error(`upload failed: HTTP ${xhr.status} ${uploadError(xhr.responseText)}`)));
        xhr.onerror = () => reject(new Error('upload failed: network error'));
        xhr.send(bytes);
      });
    }
    bar.value = bar.max;
    uploaded.set(file.name, { sha256, size: file.size });
    label.textContent = `${file.name} (${formatBytes(file.size)}) ✓ `;
  } catch (err) {
    label.textContent = `${file.name}: ${err.message} `;
    label.className = 'error';
  }
}

// What a failed upload answered: the broker's error message, or S3's <Code> and <Message> only
// (an S3 error body can echo the request's signature, which stays out of the page).
function uploadError(text) {
  try { return JSON.parse(text).error.message; } catch { /* not the broker's JSON */ }
  const code = /<Code>([^<]*)<\/Code>/.exec(text);
  const message = /<Message>([^<]*)<\/Message>/.exec(text);
  if (code) return message ? `${code[1]}: ${message[1]}` : code[1];
  return text.slice(0, 200).replace(/(signature|credential|token)=[^&\s"'<]*/gi, '$1=…');
}

// ---- run, cancel ---------------------------------------------------------------------------

$('#job-form').onsubmit = (e) => { e.preventDefault(); run(false); };
// Re-run runs the job on screen (its definition as the broker has it), not the form.
$('#rerun').onclick = () => run(true, { onScreen: true });
$('#cancel').onclick = () => cancel();

/** `force` runs again even if a result is cached; `onScreen` runs the definition of the job on
 * screen instead of the form's. */
async function run(force, { onScreen = false } = {}) {
  showError('');
  // The job's status and log take the place of the form where the page is small.
  setEditing(false);
  // A definition or inputs still being translated by the broker are part of this run.
  await Promise.all([definitionReady, metaframeInputsReady]);
  if (onScreen) await job.definitionReady;
  const definition = onScreen && job.definition ? job.definition : definitionFromForm();
  if (!definition.image && !definition.build) {
    showError('give an image (or a Dockerfile to build)');
    return;
  }
  config.queue = $('#queue').value.trim() || config.queue;
  if (conn.open && conn.bound !== config.queue) {
    // Another queue: its socket comes first (a cluster serves each queue from its shard).
    showJob(null);
    runWhenOpen = { force, definition };
    switchQueue(config.queue);
    return;
  }
  if (!conn.open) {
    // The job on screen is no longer the one being asked for.
    showJob(null);
    runWhenOpen = { force, definition };
    showError('waiting for the broker; the job starts once connected');
    return;
  }
  await submit(definition, force);
}

async function submit(definition, force) {
  showError('');
  const data = { queue: config.queue, definition };
  if (config.namespace) data.namespace = config.namespace;
  if (force) data.force = true;
  $('#run').disabled = true;
  try {
    const answer = await conn.request('submit', data);
    const view = answer.data.job;
    tellHost('cq:submitted', { jobId: view.id, outcome: answer.data.outcome });
    showJob(view.id, { view, definition, outcome: answer.data.outcome });
    // A run that waited for the broker (its note opened the folded form) shows its job now.
    setEditing(false);
    if (queue.name !== config.queue) switchQueue(config.queue);
  } catch (err) {
    showError(err.message);
    tellHost('cq:error', { message: err.message });
  } finally {
    $('#run').disabled = false;
  }
}

async function cancel(id = job.id) {
  if (!id) return;
  try {
    const data = { jobId: id };
    if (config.namespace && id === job.id) data.namespace = config.namespace;
    await conn.request('cancel', data);
  } catch (err) {
    showError(err.message);
  }
}

function showError(text) {
  const el = document.querySelector('#form-error');
  if (el) el.textContent = text;
  // Where the form is folded (small layout), an error opens it so it is seen.
  if (text && el && getComputedStyle(el.closest('form')).display === 'none') setEditing(true);
}

/** Says `text` to screen readers (a polite live region; the log itself is not one). */
function announce(text) {
  $('#announce').textContent = text;
}

// ---- the job view --------------------------------------------------------------------------
// The job view is a function of one job id. `showJob` is the only way to change it, and it
// forgets everything of the job before (its view, log, outputs, what the host was told);
// whatever arrives later for another job, or for an earlier showing (`gen`), is dropped.

/**
 * Shows job `id` (or none). `view`, `definition` and `outcome` are what the page already knows
 * (from its own submission); the rest is fetched: the definition, the log so far over HTTP,
 * then the live rest over the socket.
 */
function showJob(id, { view = null, definition = null, outcome = null } = {}) {
  if (job.id && conn.open) conn.send('unwatchJob', { jobId: job.id });
  job.gen++;
  job.id = id;
  job.view = null;
  job.next = 0;
  job.outcome = outcome;
  job.definition = definition;
  job.toldState = null;
  job.toldFinish = null;
  job.loading = Boolean(id);
  job.outputsFor = null;
  log.reset();
  if (config.line && config.line.jobId === id) log.goToLine(config.line.n);
  for (const sel of ['#state', '#phase', '#details', '#job-link']) $(sel).textContent = '';
  $('#state').dataset.state = '';
  $('#state').dataset.reason = '';
  $('#phase-progress').hidden = true;
  $('#outputs').replaceChildren();
  $('#preview').replaceChildren();
  $('#outputs-box').hidden = true;
  document.body.classList.remove('has-outputs');
  $('#status').hidden = !id;
  $('#log-box').hidden = !id;
  $('#cancel').disabled = true;
  $('#rerun').disabled = true;
  $('#sum-cancel').hidden = true;
  $('#sum-run').textContent = 'Run';
  $('#sum-run').disabled = false;
  renderLogTools();
  linkPrefix = null;
  if (!id) return;
  // The hash names the job and its queue, so a link or a reload shows the same job on the same
  // queue (and Run there does not move it to another one). A job opened from the queue table is
  // a new history entry: Back returns to the table.
  writeOwnHash({
    jobId: id, queue: config.queue,
    line: config.line && config.line.jobId === id ? String(config.line.n) : undefined,
  }, false);
  const gen = job.gen;
  job.definitionReady = definition ? Promise.resolve() : fetchDefinition(id, gen);
  if (view) updateJob(view);
  loadLog(id, gen);
}

/** The job's definition, shown in the form (so the form is the job on screen). */
async function fetchDefinition(id, gen) {
  try {
    const res = await fetch(`${apiBase}/j/${id}/definition`, { headers: authHeaders() });
    if (!res.ok) return;
    const definition = await res.json();
    if (gen !== job.gen) return;
    job.definition = definition;
    baseDefinition = definition;
    extraInputs = {};
    uploaded.clear();
    $('#file-list').replaceChildren();
    fillForm();
  } catch {
    // The form keeps what it had; Re-run falls back to it.
  }
}

/** The log so far, over HTTP in pages (a finished job's whole log), then the socket from there. */
async function loadLog(id, gen) {
  let since = 0;
  try {
    for (;;) {
      const res = await fetch(`${apiBase}/j/${id}/logs?since=${since}&limit=10000`, { headers: authHeaders() });
      if (gen !== job.gen) return;
      if (!res.ok) break;
      const page = await res.json();
      if (gen !== job.gen) return;
      appendLogs(page.offset, page.lines, false);
      since = page.next;
      if (page.next >= page.total || !page.lines.length) break;
    }
  } catch {
    // The socket sends whatever HTTP did not.
  }
  if (gen !== job.gen) return;
  job.loading = false;
  if (conn.open) conn.send('watchJob', { jobId: id, since: job.next });
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

function formatDuration(ms) {
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.floor(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function plural(n, one, many = `${one}s`) {
  return `${n.toLocaleString('en')} ${n === 1 ? one : many}`;
}

/** A state as a label: the reason for a finished job. */
function stateLabel(view) {
  if (view.state !== 'finished') return view.state;
  return { timedOut: 'timed out', workerLost: 'worker lost' }[view.reason] || view.reason;
}

/** Read links by job id (`{query, expires}` promises): with a token, output URLs carry a
 * signed, expiring link to the one job instead of the token (see docs/http-api.md). URLs
 * handed to another origin (the host, a metapage) always carry one: the broker answers them
 * to any origin. */
const readLinks = new Map();

async function readLink(id, always = false) {
  if (!token && !always) return null;
  const cached = readLinks.get(id);
  if (cached) {
    const link = await cached;
    if (link && link.expires - Date.now() / 1000 > 60) return link.query;
  }
  const made = fetch(`${apiBase}/j/${id}/link`, { method: 'POST', headers: authHeaders() })
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`))))
    .catch((e) => { showError(`cannot make a link to the outputs: ${e.message}`); return null; });
  readLinks.set(id, made);
  const link = await made;
  return link && link.query;
}

function outputUrl(id, path, query) {
  const encoded = path.split('/').map(encodeURIComponent).join('/');
  return `${apiBase}/j/${id}/outputs/${encoded}${query ? `?${query}` : ''}`;
}

function updateJob(view) {
  if (view.id !== job.id) return;
  // Views of one showing only move forward (a re-run starts a new showing).
  if (job.view && view.version < job.view.version) return;
  // A new attempt (the job was handed back or its worker lost) starts its log again: the
  // viewer draws a separator before its first line. Log lines do not carry their attempt, so
  // this is seen only while the page watches the job.
  if (job.view && view.attempt > job.view.attempt && job.next > 0 && !job.loading) log.markAttempt(job.next, view.attempt);
  job.view = view;
  // The job's own queue is the form's: a job opened by a link runs again where it ran.
  if (view.queue && view.queue !== config.queue) {
    config.queue = view.queue;
    $('#queue').value = view.queue;
    switchQueue(view.queue);
    writeOwnHash({ queue: view.queue }, false);
  }
  renderStatus();
  const live = view.state !== 'finished';
  const progress = view.progress;
  const told = `${view.state}|${view.reason || ''}|${progress ? progress.phase : ''}|${view.attempt}`;
  if (told !== job.toldState) {
    const stateChanged = !job.toldState || job.toldState.split('|').slice(0, 2).join('|') !== `${view.state}|${view.reason || ''}`;
    job.toldState = told;
    tellHost('cq:state', {
      jobId: view.id, state: view.state, reason: view.reason || null, exitCode: view.exitCode ?? null,
      phase: progress ? progress.phase : null, attempt: view.attempt, worker: view.worker || null,
    });
    if (stateChanged) announce(`job ${view.id.slice(0, 12)} ${stateLabel(view)}`);
  }
  renderOutputs(view);
  // Exactly one `cq:finished` per finish of the job on screen (a cached result included).
  const finish = view.finishedAt || view.version;
  if (!live && job.toldFinish !== finish) {
    job.toldFinish = finish;
    const gen = job.gen;
    readLink(view.id, true).then((query) => {
      if (gen !== job.gen) return;
      tellHost('cq:finished', {
        jobId: view.id, reason: view.reason, exitCode: view.exitCode ?? null, message: view.message || null,
        cached: job.outcome === 'cached',
        outputs: (view.outputs || []).map((o) => ({ ...o, url: new URL(outputUrl(view.id, o.path, query), location.href).href })),
      });
    });
    sendMetaframeOutputs(view);
  }
}

/** The job's header: state, phase, details; durations tick (see the timer below). */
function renderStatus() {
  const view = job.view;
  if (!view) return;
  const state = $('#state');
  state.dataset.state = view.state;
  state.dataset.reason = view.reason || '';
  state.textContent = stateLabel(view);
  const progress = view.progress;
  const live = view.state !== 'finished';
  // The phase, unless it only repeats the state ("running · running").
  const phase = live && progress && !(progress.phase === view.state && !progress.message)
    ? `${progress.phase}${progress.message ? `: ${progress.message}` : ''}` : '';
  $('#phase').textContent = phase;
  const bar = $('#phase-progress');
  if (live && progress && progress.total) {
    bar.hidden = false; bar.max = progress.total; bar.value = progress.current || 0;
  } else bar.hidden = true;
  const parts = [];
  if (job.outcome === 'cached') parts.push('cached result');
  if (view.state === 'queued' && view.waiting) parts.push(`waiting: ${view.waiting}`);
  if (view.exitCode !== undefined && view.exitCode !== null) parts.push(`exit code ${view.exitCode}`);
  if (view.attempt > 1) parts.push(`attempt ${view.attempt}`);
  if (view.worker) parts.push(`on ${view.worker}`);
  if (view.startedAt) parts.push(formatDuration((view.finishedAt || Date.now()) - view.startedAt));
  // The message, unless it only repeats the exit code ("exited with code 3").
  const exitSaid = view.exitCode !== undefined && view.exitCode !== null;
  if (view.message && view.reason !== 'succeeded' && !(exitSaid && /^exited with (exit )?code -?\d+$/i.test(view.message.trim()))) {
    parts.push(view.message);
  }
  $('#details').textContent = parts.join(' · ');
  const link = $('#job-link');
  link.textContent = view.id.slice(0, 12);
  link.href = `${apiBase}/j/${view.id}`;
  $('#cancel').disabled = !live;
  $('#rerun').disabled = live;
  $('#sum-cancel').hidden = !live;
  $('#sum-run').textContent = live ? 'Run' : 'Re-run';
  $('#sum-run').disabled = live;
}

async function renderOutputs(view) {
  const outputs = view.outputs || [];
  const key = `${view.id}|${view.version}`;
  if (job.outputsFor === key) return;
  job.outputsFor = key;
  const query = outputs.length ? await readLink(view.id) : null;
  if (job.view !== view) return;
  $('#outputs-box').hidden = outputs.length === 0;
  // The log leaves room for the outputs below it (style.css).
  document.body.classList.toggle('has-outputs', outputs.length > 0);
  const list = $('#outputs');
  list.replaceChildren(...outputs.map((o) => {
    const li = document.createElement('li');
    const a = document.createElement('a');
    a.href = outputUrl(view.id, o.path, query);
    a.textContent = o.path;
    a.download = o.path.split('/').pop();
    a.className = 'output-link';
    const size = document.createElement('span');
    size.className = 'size';
    size.textContent = formatBytes(o.size);
    const show = document.createElement('button');
    show.type = 'button';
    show.textContent = 'preview';
    show.setAttribute('aria-label', `preview ${o.path}`);
    show.onclick = () => preview(o);
    li.append(a, size, ' ', show);
    return li;
  }));
}

const TEXT = /\.(txt|log|csv|tsv|json|md|yaml|yml|xml|html|py|r|sh|toml|ini|out|err)$/i;
const IMAGE = /\.(png|jpe?g|gif|svg|webp)$/i;
/** Bytes of an output shown as text. */
const PREVIEW_BYTES = 64 * 1024;

async function preview(o) {
  const box = $('#preview');
  box.replaceChildren();
  const id = job.id;
  // The preview says which file it shows, and comes into view (it is below the log).
  const title = document.createElement('h3');
  title.className = 'preview-title mono';
  title.textContent = o.path;
  box.append(title);
  const body = document.createElement('div');
  box.append(body);
  const shown = () => box.scrollIntoView({ block: 'nearest' });
  const url = outputUrl(id, o.path, await readLink(id));
  if (IMAGE.test(o.path)) {
    const img = document.createElement('img');
    img.src = url;
    img.alt = o.path;
    img.onload = shown;
    body.append(img);
    shown();
    return;
  }
  const res = await fetch(url, { headers: { range: `bytes=0-${PREVIEW_BYTES - 1}` } });
  const bytes = new Uint8Array(await res.arrayBuffer());
  if (id !== job.id) return;
  // Text is what decodes as UTF-8 without NULs (a cut at the end of the range may split a
  // character: that tail is allowed).
  let text = null;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(0, o.size > PREVIEW_BYTES ? Math.max(0, bytes.length - 3) : bytes.length));
  } catch { text = null; }
  if (text === null || text.includes('\0') || (!TEXT.test(o.path) && !text.length && o.size)) {
    body.textContent = 'binary file: no preview; download it instead';
    shown();
    return;
  }
  const pre = document.createElement('pre');
  pre.textContent = o.size > PREVIEW_BYTES ? `${text}\n… (the first ${formatBytes(PREVIEW_BYTES)} of ${formatBytes(o.size)})` : text;
  body.append(pre);
  shown();
}

// ---- logs ----------------------------------------------------------------------------------

const log = new LogView($('#log'), { onChange: () => renderLogTools() });
/** The hash up to the line, for links to lines of the job on screen. */
let linkPrefix = null;
// A link to a line opens this job on this queue at that line (and runs nothing).
log.linkFor = (n) => {
  if (linkPrefix === null) {
    const params = new URLSearchParams();
    params.set('queue', hashConfig.params.get('queue') || config.queue);
    if (job.id) params.set('jobId', job.id);
    linkPrefix = `#${params}&line=`;
  }
  return `${linkPrefix}${n}`;
};
log.onLineLink = (n) => {
  config.line = { jobId: job.id, n };
  // A metapage keeps the hash for itself.
  if (!metaframe.framed) history.replaceState(null, '', log.linkFor(n));
};
test.log = log;

/** Lines from the broker at `offset`; `live` lines (from the socket) are timed for tests. */
function appendLogs(offset, lines, live = true) {
  // Lines the page already has (a resend after a reconnect) are skipped; the broker never
  // leaves a gap for a watcher that asked from the right offset.
  const skip = job.next - offset;
  if (skip < 0) {
    conn.send('watchJob', { jobId: job.id, since: job.next });
    return;
  }
  const fresh = skip ? lines.slice(skip) : lines;
  if (!fresh.length) return;
  job.next += fresh.length;
  if (live && test.lineDelays.length < 10000) {
    const now = Date.now();
    for (const line of fresh) if (test.lineDelays.length < 10000) test.lineDelays.push(now - line.time);
  }
  log.append(fresh);
  renderLogToolsSoon();
}

let toolsScheduled = false;
function renderLogToolsSoon() {
  if (toolsScheduled) return;
  toolsScheduled = true;
  requestAnimationFrame(() => { toolsScheduled = false; renderLogTools(); });
}

function renderLogTools() {
  $('#log-count').textContent = plural(log.length, 'line');
  const follow = $('#log-follow');
  follow.setAttribute('aria-pressed', String(log.follow));
  const n = log.matches.length;
  $('#log-matches').textContent = log.query ? `${log.current === -1 ? '–' : log.current + 1} of ${plural(n, 'match', 'matches')}` : '';
}

// Searching a long log takes a while (about 250 ms for a million lines): wait for a pause in
// the typing.
let searchTimer = null;
$('#log-search').addEventListener('input', (e) => {
  clearTimeout(searchTimer);
  // After the pause, the first match is shown (as GitHub's and GitLab's log search do).
  searchTimer = setTimeout(() => {
    if (log.search(e.target.value)) log.step(1);
    renderLogTools();
  }, log.length > 100000 ? 250 : 50);
});
$('#log-search').addEventListener('keydown', (e) => {
  if (e.key !== 'Enter') return;
  e.preventDefault();
  clearTimeout(searchTimer);
  if (log.query !== e.target.value.toLowerCase()) log.search(e.target.value);
  log.step(e.shiftKey ? -1 : 1);
  renderLogTools();
});
function stepSearch(dir) {
  clearTimeout(searchTimer);
  const q = $('#log-search').value;
  if (log.query !== q.toLowerCase()) log.search(q);
  log.step(dir);
  renderLogTools();
}
$('#log-next').onclick = () => stepSearch(1);
$('#log-prev').onclick = () => stepSearch(-1);
$('#log-follow').onclick = () => log.setFollow(!log.follow);
$('#log-end').onclick = () => log.setFollow(true);
$('#log-times').onchange = (e) => log.setTimestamps(e.target.checked);

function logBlobUrl(ansi) {
  return URL.createObjectURL(new Blob([log.text({ ansi })], { type: 'text/plain;charset=utf-8' }));
}
for (const [sel, ansi] of [['#log-download', false], ['#log-download-ansi', true]]) {
  $(sel).onclick = (e) => {
    const a = e.currentTarget;
    a.href = logBlobUrl(ansi);
    a.download = `${job.id ? job.id.slice(0, 12) : 'job'}${ansi ? '.ansi' : ''}.log`;
  };
}
$('#log-raw').onclick = (e) => { e.currentTarget.href = logBlobUrl(false); };

// ---- the queue view ------------------------------------------------------------------------

/** Jobs per page of the queue table. */
const PAGE_SIZE = 50;
const queueView = { filter: 'all', page: 0 };
/** Definitions of the queue's jobs (for their image and command), by id. */
const definitions = new Map();

function switchQueue(name) {
  if (queue.name === name) return;
  queue.name = name;
  queue.jobs = new Map();
  queue.workers = [];
  queueView.page = 0;
  queueRows.clear();
  // A new socket for the new queue: the page's subscriptions are made again once it opens.
  conn.rebind();
  renderQueue();
}

/** A job of the queue changed state, so a worker's used slots did. The broker sends
 * `queueWorkers` when `busy` changes; an older one does not, so without one shortly the page
 * asks for the queue again (`watchQueue` answers a fresh snapshot, workers included), at most
 * about once a second and only while the table is on screen. */
function workersMayHaveChanged() {
  if (queue.refreshWorkers || $('#view-queue').hidden) return;
  queue.refreshWorkers = setTimeout(() => {
    queue.refreshWorkers = null;
    if (conn.open && !$('#view-queue').hidden) conn.send('watchQueue', { queue: queue.name });
  }, 1000);
}

let queueScheduled = false;
function renderQueueSoon() {
  if (queueScheduled) return;
  queueScheduled = true;
  setTimeout(() => { queueScheduled = false; renderQueue(); }, 100);
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = String(text);
  if (cls) td.className = cls;
  return td;
}

const FILTERS = {
  all: () => true,
  active: (j) => j.state !== 'finished',
  succeeded: (j) => j.reason === 'succeeded',
  failed: (j) => j.state === 'finished' && !['succeeded', 'cancelled'].includes(j.reason),
  cancelled: (j) => j.reason === 'cancelled',
};

function badge(view) {
  const span = document.createElement('span');
  span.className = 'state';
  span.dataset.state = view.state;
  span.dataset.reason = view.reason || '';
  span.textContent = stateLabel(view);
  return span;
}

function describe(id) {
  const d = definitions.get(id);
  if (d === undefined) {
    definitions.set(id, null);
    fetch(`${apiBase}/j/${id}/definition`, { headers: authHeaders() })
      .then((r) => (r.ok ? r.json() : null))
      .then((def) => { definitions.set(id, def || {}); renderQueueSoon(); }, () => definitions.set(id, {}));
    return '…';
  }
  if (!d) return '…';
  const what = d.image || (d.build ? 'built image' : '');
  const command = Array.isArray(d.command) ? shellQuote(d.command) : (d.command || '');
  return command ? `${what} · ${command}` : what;
}

/** Opens a job of the queue table: a new history entry, so Back returns to the table. */
function openJob(id) {
  // The entry the table was on stays as it is; the job's is a new one.
  writeOwnHash({ view: undefined, jobId: id, queue: queue.name, line: undefined }, true);
  config.queue = queue.name;
  $('#queue').value = queue.name;
  document.body.classList.add('from-queue');
  showView('job');
  if (id !== job.id) showJob(id);
}

/** The page's own URL for a job of the watched queue. */
function jobHref(id) {
  const params = new URLSearchParams();
  params.set('queue', queue.name);
  params.set('jobId', id);
  return `${location.pathname}${location.search}#${params}`;
}

function jobDuration(j) {
  return j.startedAt ? formatDuration((j.finishedAt || Date.now()) - j.startedAt) : '';
}

/** Drawn rows of the queue table by job id: `{key, tr}`. */
const queueRows = new Map();

function jobRow(j) {
  const tr = document.createElement('tr');
  tr.dataset.id = j.id;
  if (j.id === job.id) tr.className = 'current';
  const idCell = document.createElement('td');
  // A real link (open it in a new tab, copy it); a plain click opens the job in place.
  const open = document.createElement('a');
  open.className = 'mono job-open';
  open.href = jobHref(j.id);
  open.textContent = j.id.slice(0, 12);
  open.setAttribute('aria-label', `show job ${j.id.slice(0, 12)}`);
  open.onclick = (e) => {
    if (e.button !== 0 || e.ctrlKey || e.metaKey || e.shiftKey || e.altKey) return;
    e.preventDefault();
    openJob(j.id);
  };
  idCell.append(open);
  const stateCell = document.createElement('td');
  stateCell.append(badge(j));
  const when = new Date(j.submittedAt).toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
  const actions = document.createElement('td');
  if (j.state !== 'finished') {
    const stop = document.createElement('button');
    stop.type = 'button';
    stop.textContent = 'Cancel';
    stop.setAttribute('aria-label', `cancel job ${j.id.slice(0, 12)}`);
    stop.onclick = () => cancel(j.id);
    actions.append(stop);
  }
  const what = cell(describe(j.id), 'mono what');
  what.title = what.textContent;
  tr.append(idCell, what, stateCell, cell(when, 'when'), cell(jobDuration(j), 'duration'), cell(j.worker || '', 'worker'), actions);
  return tr;
}

function renderQueue() {
  $('#queue-name').textContent = queue.name;
  $('#hint-queue').textContent = queue.name;
  const connected = queue.workers.filter((w) => w.connected);
  $('#no-worker').hidden = connected.length > 0;
  const all = [...queue.jobs.values()];
  const jobs = all.filter(FILTERS[queueView.filter] || FILTERS.all).sort((a, b) => b.submittedAt - a.submittedAt);
  const pages = Math.max(1, Math.ceil(jobs.length / PAGE_SIZE));
  queueView.page = Math.min(queueView.page, pages - 1);
  const shown = jobs.slice(queueView.page * PAGE_SIZE, (queueView.page + 1) * PAGE_SIZE);
  $('#jobs-empty').hidden = jobs.length > 0;
  $('#jobs-empty').textContent = all.length ? 'No jobs in this state.' : `No jobs yet on queue ${queue.name}.`;
  $('#jobs').hidden = jobs.length === 0;
  $('#jobs-pages').textContent = jobs.length
    ? `${queueView.page * PAGE_SIZE + 1}–${queueView.page * PAGE_SIZE + shown.length} of ${jobs.length.toLocaleString('en')}` : '';
  $('#jobs-prev').disabled = queueView.page === 0;
  $('#jobs-next').disabled = queueView.page >= pages - 1;
  // Rows are kept while what they show of their job is unchanged (not its version, which a log
  // line bumps), so the row under the pointer stays the same element; only the running
  // durations tick (in place, see the timer below).
  const rows = shown.map((j) => {
    const key = [j.state, stateLabel(j), j.reason, j.worker, j.submittedAt, j.startedAt, j.finishedAt, j.id === job.id]
      .map((v) => v ?? '').join('|');
    const kept = queueRows.get(j.id);
    if (kept && kept.key === key) {
      // A description that arrived since is written into the kept row.
      const what = kept.tr.querySelector('td.what');
      const text = describe(j.id);
      if (what.textContent !== text) { what.textContent = text; what.title = text; }
      return kept.tr;
    }
    const tr = jobRow(j);
    queueRows.set(j.id, { key, tr });
    return tr;
  });
  const tbody = $('#jobs tbody');
  rows.forEach((tr, i) => { if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); });
  while (tbody.children.length > rows.length) tbody.lastElementChild.remove();
  for (const id of queueRows.keys()) if (!queue.jobs.has(id)) queueRows.delete(id);
  $('#workers tbody').replaceChildren(...queue.workers.map((w) => {
    const tr = document.createElement('tr');
    tr.append(cell(`${w.id}${w.draining ? ' (draining)' : ''}${w.connected ? '' : ' (away)'}`), cell(`${w.busy} / ${w.slots}`),
      cell(Math.max(0, w.slots - w.busy)), cell(w.gpus), cell((w.tags || []).join(', ')));
    return tr;
  }));
}

$('#jobs-filter').onchange = (e) => { queueView.filter = e.target.value; queueView.page = 0; renderQueue(); };
$('#jobs-prev').onclick = () => { queueView.page = Math.max(0, queueView.page - 1); renderQueue(); };
$('#jobs-next').onclick = () => { queueView.page += 1; renderQueue(); };

// Durations tick while a job runs, in the header and in the queue table.
setInterval(() => {
  if (job.view && job.view.state !== 'finished') renderStatus();
  if (!$('#view-queue').hidden) {
    for (const tr of $('#jobs tbody').children) {
      const j = queue.jobs.get(tr.dataset.id);
      if (j && j.startedAt && !j.finishedAt) tr.querySelector('td.duration').textContent = jobDuration(j);
    }
  }
}, 1000);

// ---- views ---------------------------------------------------------------------------------

/** Writes `updates` into the page's own hash (cq's format, not inside a metapage, which keeps
 * the hash for itself); `push` makes it a new history entry. */
function writeOwnHash(updates, push) {
  if (hashConfig.format !== 'cq' || metaframe.framed) return;
  const next = writeHash(location.hash, updates);
  if (next === location.hash) return;
  if (push) history.pushState(null, '', next);
  else history.replaceState(null, '', next);
}

function showView(name, { push = false } = {}) {
  const view = name === 'queue' ? 'queue' : 'job';
  for (const b of document.querySelectorAll('.tab')) b.setAttribute('aria-pressed', String(b.dataset.view === view));
  $('#view-job').hidden = view !== 'job';
  $('#view-queue').hidden = view !== 'queue';
  document.body.dataset.view = view;
  writeOwnHash({ view: view === 'queue' ? 'queue' : undefined }, push);
  if (view === 'queue') renderQueue();
}
for (const b of document.querySelectorAll('.tab')) {
  b.onclick = () => { if (b.getAttribute('aria-pressed') !== 'true') showView(b.dataset.view, { push: true }); };
}

// The form folds into a summary line where the page is small (see style.css); "edit" opens it.
function setEditing(on) {
  document.body.classList.toggle('editing', on);
  $('#edit-toggle').setAttribute('aria-expanded', String(on));
  $('#edit-toggle').textContent = on ? 'done' : 'edit';
}
$('#edit-toggle').onclick = () => setEditing(!document.body.classList.contains('editing'));
// In the small layout Run (Re-run for a finished job on screen) and Cancel sit next to the
// summary, so the job can be run and stopped without opening the form over the log.
$('#sum-run').onclick = () => {
  if (job.view && job.view.state === 'finished') run(true, { onScreen: true });
  else run(false);
};
$('#sum-cancel').onclick = () => cancel();
// Where the tabs are hidden (small layout), a job opened from the queue has a way back to it.
$('#to-queue').onclick = () => showView('queue', { push: true });

function renderSummary() {
  const d = definitionFromForm();
  const command = Array.isArray(d.command) ? shellQuote(d.command) : (d.command || '');
  $('#summary-text').textContent = d.image || d.build ? `${d.image || 'built image'}${command ? ` · ${command}` : ''}` : 'no job set';
}
$('#job-form').addEventListener('input', renderSummary);

// A link to another job or line of this page, followed in place.
// Back and Forward, and links within the page, move between the views and jobs the hash names.
function followHash() {
  let next;
  try { next = readHash(location.hash); } catch (e) { showError(e.message); return; }
  const view = next.view === 'queue' ? 'queue' : 'job';
  if ($(`#view-${view}`).hidden) showView(view);
  if (next.line) config.line = { jobId: next.jobId || job.id, n: next.line };
  if (next.jobId && next.jobId !== job.id) {
    if (next.params.get('queue') && !/^https?:/.test(next.queue)) config.queue = next.queue;
    showJob(next.jobId);
  } else if (next.line) log.goToLine(next.line);
}
window.addEventListener('hashchange', followHash);
window.addEventListener('popstate', followHash);

// ---- the metapage ----------------------------------------------------------------------------
// The page is also a metaframe (metaframe.js): inputs from the metapage become job inputs, the
// finished job's outputs go back as outputs, and edits of the job are saved in the hash.

const metaframe = new Metaframe({
  targetOrigin: config.hostOrigin,
  // The same rule as for the cq:* messages: only origins the broker allows.
  accept: (origin) => allowedOrigins.then((allowed) => {
    if (allowed.has(origin)) return true;
    console.warn(`cq: ignoring the metapage on ${origin}: not an origin this broker allows (--allow-origin)`);
    test.ignoredOrigins.push(origin);
    return false;
  }),
  debug: hashConfig.debug,
  onConnected() {
    // Without a namespace of its own, a frame's runs supersede only each other.
    if (!config.namespace) config.namespace = `frame-${crypto.getRandomValues(new Uint32Array(2)).join('')}`;
    metaframeConnected();
  },
  onInputs: (changed, all, initial) => { metaframeInputsReady = takeMetaframeInputs(changed, all, initial); },
});
let metaframeConnected;
const connected = new Promise((resolve) => { metaframeConnected = resolve; });
/** In the reference's format a framed page is a metaframe: autostart waits for its inputs. */
const autostartGate = metaframe.framed && hashConfig.format === 'reference' ? connected : Promise.resolve();
let metaframeInputsReady = Promise.resolve();
/** Names of the inputs that came from the metapage. */
let metaframeInputNames = new Set();
let inputsSeq = 0;
let outputsSentFor = null;

/** Tries of a translation that met a network error. */
const TRANSLATE_TRIES = 5;

/** Reference-format definitions become cq's through the broker (protocol::reference). A
 * network error is retried with backoff: a browser does not retry a POST whose reused
 * connection the server closed, and translating has no side effects. */
async function translateReference(definition) {
  let res;
  for (let attempt = 1; ; attempt++) {
    try {
      res = await fetch(`${apiBase}/reference/translate`, {
        method: 'POST', headers: { 'content-type': 'application/json', ...authHeaders() }, body: JSON.stringify({ definition }),
      });
      break;
    } catch (err) {
      if (attempt >= TRANSLATE_TRIES) throw new Error(`cannot reach the broker to read the job (${err.message})`);
      await new Promise((resolve) => { setTimeout(resolve, 250 * 2 ** attempt); });
    }
  }
  const body = await res.json();
  if (!res.ok) throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
  return body;
}

function reportError(err) {
  showError(err.message);
  tellHost('cq:error', { message: err.message });
}

async function takeMetaframeInputs(changed, all, initial) {
  const seq = ++inputsSeq;
  try {
    if (config.allowSetJob && changed.job) {
      const t = await translateReference(referenceDefinition(hashConfig, changed.job));
      baseDefinition = t.definition;
      fillForm();
    }
    const refs = {};
    for (const [name, v] of Object.entries(all)) {
      const ref = name === 'job' ? null : inputToDataRef(v);
      if (ref) refs[name] = ref;
    }
    // Only the inputs are translated here; the image is a placeholder the translation needs.
    const inputs = Object.keys(refs).length
      ? (await translateReference({ image: 'busybox', inputs: refs })).definition.inputs : {};
    if (seq !== inputsSeq) return;
    for (const name of metaframeInputNames) delete extraInputs[name];
    metaframeInputNames = new Set(Object.keys(inputs));
    extraInputs = { ...extraInputs, ...inputs };
    renderTextInputs();
  } catch (err) {
    reportError(err);
    return;
  }
  // Every change of the inputs runs again, superseding the run before it in the namespace. The
  // first inputs belong to the autostart run, which waits for them.
  if (config.autostart && !initial && seq === inputsSeq) run(false);
}

/** Outputs of a finished job as the reference's page sends them: URLs (or the contents, with
 * `resolverefs`), plus `job/result.json` with `allowsetjob`. */
async function sendMetaframeOutputs(view) {
  if (!metaframe.ready || outputsSentFor === view.id) return;
  if (!['succeeded', 'failed', 'timedOut'].includes(view.reason)) return;
  outputsSentFor = view.id;
  const outputs = {};
  for (const o of view.outputs || []) {
    // A read link: the metapage may hand the URL to a frame on another origin.
    const url = new URL(outputUrl(view.id, o.path, await readLink(view.id, true)), location.href).href;
    outputs[o.path] = config.resolveRefs && o.size <= RESOLVE_MAX ? await fetchOutput(url, o.path)
      : { type: 'url', value: url, hash: o.sha256 };
  }
  if (config.allowSetJob) {
    const lines = (stream) => log.linesOf(stream);
    outputs['job/result.json'] = {
      stdout: lines('stdout'), stderr: lines('stderr'), statusCode: view.exitCode ?? null,
      error: view.reason === 'succeeded' ? null : (view.message || view.reason), isTimedOut: view.reason === 'timedOut',
      duration: view.startedAt && view.finishedAt ? view.finishedAt - view.startedAt : null,
      url: new URL(`${apiBase}/j/${view.id}`, location.href).href,
    };
  }
  if (job.id === view.id) metaframe.setOutputs(outputs);
}

/** Largest output whose contents `resolverefs` sends; bigger ones go as URLs. */
const RESOLVE_MAX = 8 << 20;

async function fetchOutput(url, path) {
  const res = await fetch(url);
  const bytes = new Uint8Array(await res.arrayBuffer());
  try {
    const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    return path.endsWith('.json') ? JSON.parse(text) : text;
  } catch {
    return { binary: bytes, mime: res.headers.get('content-type') || 'application/octet-stream' };
  }
}

// The user edited the job: keep it in the hash (as cq's format) so the metapage saves it.
$('#job-form').addEventListener('change', () => {
  if (!metaframe.ready) return;
  const definition = definitionFromForm();
  if (definition.inputs) {
    for (const name of metaframeInputNames) delete definition.inputs[name];
    if (!Object.keys(definition.inputs).length) delete definition.inputs;
  }
  const updates = { job: definition, jobformat: hashConfig.format === 'reference' ? 'cq' : undefined };
  history.replaceState(null, '', writeHash(location.hash, updates));
  metaframe.hashChanged();
});

/** A reference-format `job` in the hash is translated before anything runs. */
const definitionReady = hashConfig.jobFormat === 'reference' && (hashConfig.job || hashConfig.inputs)
  ? translateReference(referenceDefinition(hashConfig)).then((t) => {
    baseDefinition = t.definition;
    if (t.namespace && !config.namespace) config.namespace = t.namespace;
    fillForm();
  }, reportError)
  : Promise.resolve();
if (hashError) showError(hashError);
metaframe.start();
window.cq.metaframe = metaframe;

fillForm();
showView(config.view);
renderQueue();
if (hashConfig.jobId) showJob(hashConfig.jobId);
tellHost('cq:ready', {});
