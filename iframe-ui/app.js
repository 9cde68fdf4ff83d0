// The cq page: configure and run a job, watch it live (state, phase, logs, outputs), and watch
// a queue. Configuration comes from the URL hash and from the embedding page (postMessage);
// see docs/embedding.md.

import { Connection } from './connection.js';
import { AnsiState, appendAnsi } from './ansi.js';
import { readHash, referenceDefinition, writeHash } from './hashparams.js';
import { Metaframe, inputToDataRef } from './metaframe.js';

const $ = (sel) => document.querySelector(sel);
/** Lines kept in the page; older ones stay downloadable. */
const RENDERED_LINES = 2000;

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

const job = {
  id: hashConfig.jobId,
  view: null,
  lines: [],
  /** Offset of the next log line expected from the broker. */
  next: 0,
  ansi: { stdout: new AnsiState(), stderr: new AnsiState(), system: new AnsiState() },
  reportedFinish: null,
};
const queue = { name: config.queue, jobs: new Map(), workers: [], seq: 0 };
/** Uploaded files: name → {sha256, size}. */
const uploaded = new Map();
const test = { lineDelays: [], dropConnection: () => conn.drop(), job, queue, ignoredOrigins: [] };
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
    if (job.id) conn.send('watchJob', { jobId: job.id, since: job.next });
    if (config.autostart && !job.id && !autostarted) {
      autostarted = true;
      autostartGate.then(() => run(false));
    }
    if (runWhenOpen !== null) {
      const force = runWhenOpen;
      runWhenOpen = null;
      run(force);
    }
  },
  onMessage,
});
let autostarted = false;
/** A run asked for before the connection was up (`force` flag), started once it is. */
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
      if (d.jobId === job.id) appendLogs(d.offset, d.lines);
      break;
    case 'queueSnapshot':
      if (d.queue !== queue.name) break;
      queue.seq = d.seq;
      queue.jobs = new Map(d.jobs.map((j) => [j.id, j]));
      queue.workers = d.workers;
      queue.summary = d.summary;
      renderQueue();
      break;
    case 'queueJob':
      if (d.queue !== queue.name) break;
      queue.jobs.set(d.job.id, d.job);
      renderQueueSoon();
      break;
    case 'queueWorkers':
      if (d.queue !== queue.name) break;
      queue.workers = d.workers;
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
  $('#build-fields').hidden = !d.build;
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
    + '<button type="button" class="ti-remove" title="Remove">✕</button>';
  row.querySelector('.ti-name').value = name;
  row.querySelector('.ti-value').value = value;
  row.querySelector('.ti-remove').onclick = () => row.remove();
  $('#text-inputs').append(row);
}

$('#add-text-input').onclick = () => addTextInputRow();
$('#use-build').onchange = (e) => { $('#build-fields').hidden = !e.target.checked; };

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
        xhr.onload = () => (xhr.status < 300 ? resolve() : reject(new Error(`upload failed: HTTP ${xhr.status} ${xhr.responseText.slice(0, 200)}`)));
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

// ---- run, cancel ---------------------------------------------------------------------------

$('#job-form').onsubmit = (e) => { e.preventDefault(); run(false); };
$('#rerun').onclick = () => run(true);
$('#cancel').onclick = () => cancel();

async function run(force) {
  showError('');
  // A definition or inputs still being translated by the broker are part of this run.
  await Promise.all([definitionReady, metaframeInputsReady]);
  const definition = definitionFromForm();
  if (!definition.image && !definition.build) {
    showError('give an image (or a Dockerfile to build)');
    return;
  }
  config.queue = $('#queue').value.trim() || config.queue;
  if (!conn.open) {
    runWhenOpen = force;
    showError('waiting for the broker; the job starts once connected');
    return;
  }
  const data = { queue: config.queue, definition };
  if (config.namespace) data.namespace = config.namespace;
  if (force) data.force = true;
  $('#run').disabled = true;
  try {
    const answer = await conn.request('submit', data);
    const view = answer.data.job;
    tellHost('cq:submitted', { jobId: view.id, outcome: answer.data.outcome });
    watchJob(view);
    if (queue.name !== config.queue) switchQueue(config.queue);
  } catch (err) {
    showError(err.message);
    tellHost('cq:error', { message: err.message });
  } finally {
    $('#run').disabled = false;
  }
}

async function cancel() {
  if (!job.id) return;
  try {
    const data = { jobId: job.id };
    if (config.namespace) data.namespace = config.namespace;
    await conn.request('cancel', data);
  } catch (err) {
    showError(err.message);
  }
}

function showError(text) {
  const el = document.querySelector('#form-error');
  if (el) el.textContent = text;
}

// ---- the job view --------------------------------------------------------------------------

function watchJob(view) {
  if (job.id && job.id !== view.id) conn.send('unwatchJob', { jobId: job.id });
  const same = job.id === view.id;
  job.id = view.id;
  if (!same) {
    job.lines = [];
    job.next = 0;
    job.reportedFinish = null;
    for (const s of Object.values(job.ansi)) s.reset();
    $('#log').replaceChildren();
    conn.send('watchJob', { jobId: job.id, since: 0 });
  }
  updateJob(view);
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

function formatDuration(ms) {
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** Read links by job id (`{query, expires}` promises): with a token, output URLs carry a
 * signed, expiring link to the one job instead of the token (see docs/http-api.md). */
const readLinks = new Map();

async function readLink(id) {
  if (!token) return null;
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
  if (job.view && view.version < job.view.version) return;
  job.view = view;
  $('#status').hidden = false;
  $('#log-box').hidden = false;
  const state = $('#state');
  state.dataset.state = view.state;
  state.dataset.reason = view.reason || '';
  state.textContent = view.state === 'finished' ? view.reason : view.state;
  const progress = view.progress;
  const live = view.state !== 'finished';
  $('#phase').textContent = live && progress ? `${progress.phase}${progress.message ? `: ${progress.message}` : ''}` : '';
  const bar = $('#phase-progress');
  if (live && progress && progress.total) {
    bar.hidden = false; bar.max = progress.total; bar.value = progress.current || 0;
  } else bar.hidden = true;
  const parts = [];
  if (view.exitCode !== undefined && view.exitCode !== null) parts.push(`exit code ${view.exitCode}`);
  if (view.attempt > 1) parts.push(`attempt ${view.attempt}`);
  if (view.worker) parts.push(`on ${view.worker}`);
  if (view.startedAt) parts.push(formatDuration((view.finishedAt || Date.now()) - view.startedAt));
  if (view.message && view.reason !== 'succeeded') parts.push(view.message);
  $('#details').textContent = parts.join(' · ');
  const link = $('#job-link');
  link.textContent = view.id.slice(0, 12);
  link.href = `/j/${view.id}`;
  $('#cancel').disabled = !live;
  $('#rerun').disabled = live;
  tellHost('cq:state', {
    jobId: view.id, state: view.state, reason: view.reason || null, exitCode: view.exitCode ?? null,
    phase: progress ? progress.phase : null, attempt: view.attempt, worker: view.worker || null,
  });
  renderOutputs(view);
  if (!live && job.reportedFinish !== view.version) {
    job.reportedFinish = view.version;
    readLink(view.id).then((query) => tellHost('cq:finished', {
      jobId: view.id, reason: view.reason, exitCode: view.exitCode ?? null, message: view.message || null,
      outputs: (view.outputs || []).map((o) => ({ ...o, url: new URL(outputUrl(view.id, o.path, query), location.href).href })),
    }));
    sendMetaframeOutputs(view);
  }
}

async function renderOutputs(view) {
  const outputs = view.outputs || [];
  const query = outputs.length ? await readLink(view.id) : null;
  if (job.view !== view) return;
  $('#outputs-box').hidden = outputs.length === 0;
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
    show.onclick = () => preview(o);
    li.append(a, size, ' ', show);
    return li;
  }));
}

const TEXT = /\.(txt|log|csv|tsv|json|md|yaml|yml|xml|html|py|r|sh|toml|ini|out|err)$/i;
const IMAGE = /\.(png|jpe?g|gif|svg|webp)$/i;

async function preview(o) {
  const box = $('#preview');
  box.replaceChildren();
  if (IMAGE.test(o.path)) {
    const img = document.createElement('img');
    img.src = outputUrl(job.id, o.path, await readLink(job.id));
    img.alt = o.path;
    box.append(img);
  } else if (TEXT.test(o.path) || o.size < 64 * 1024) {
    const res = await fetch(outputUrl(job.id, o.path, await readLink(job.id)), { headers: { range: 'bytes=0-65535' } });
    const pre = document.createElement('pre');
    pre.textContent = await res.text();
    box.append(pre);
  } else {
    box.textContent = 'no preview for this file; download it instead';
  }
}

// ---- logs ----------------------------------------------------------------------------------

const logEl = $('#log');
let pendingLines = [];
let drawScheduled = false;

function appendLogs(offset, lines) {
  // Lines the page already has (a resend after a reconnect) are skipped; the broker never
  // leaves a gap for a watcher that asked from the right offset.
  const skip = job.next - offset;
  if (skip < 0) {
    conn.send('watchJob', { jobId: job.id, since: job.next });
    return;
  }
  const fresh = lines.slice(skip);
  if (!fresh.length) return;
  job.next += fresh.length;
  const now = Date.now();
  for (const line of fresh) {
    job.lines.push(line);
    if (test.lineDelays.length < 10000) test.lineDelays.push(now - line.time);
  }
  pendingLines.push(...fresh);
  if (!drawScheduled) {
    drawScheduled = true;
    requestAnimationFrame(drawLogs);
  }
}

function drawLogs() {
  drawScheduled = false;
  const atBottom = logEl.scrollHeight - logEl.scrollTop - logEl.clientHeight < 24;
  const lines = pendingLines.slice(-RENDERED_LINES);
  pendingLines = [];
  const frag = document.createDocumentFragment();
  for (const line of lines) {
    const span = document.createElement('span');
    span.className = `line ${line.stream}`;
    appendAnsi(span, line.text, job.ansi[line.stream] || job.ansi.stdout);
    frag.append(span);
  }
  logEl.append(frag);
  // Keep the page light: only the newest lines stay in the DOM.
  let extra = logEl.childElementCount - RENDERED_LINES;
  if (extra > 0) {
    let cut = logEl.querySelector('.cut');
    while (extra-- > 0) {
      const first = cut ? cut.nextElementSibling : logEl.firstElementChild;
      if (!first) break;
      first.remove();
    }
    if (!cut) {
      cut = document.createElement('span');
      cut.className = 'cut';
      logEl.prepend(cut);
    }
    cut.textContent = `… ${job.lines.length - RENDERED_LINES} earlier lines (download the full log)\n`;
  }
  $('#log-count').textContent = `${job.lines.length} lines`;
  if (atBottom) logEl.scrollTop = logEl.scrollHeight;
}

$('#log-download').onclick = (e) => {
  const text = job.lines.map((l) => l.text).join('');
  const a = e.currentTarget;
  a.href = URL.createObjectURL(new Blob([text], { type: 'text/plain' }));
  a.download = job.id ? `${job.id.slice(0, 12)}.log` : 'job.log';
};

// ---- the queue view ------------------------------------------------------------------------

function switchQueue(name) {
  if (queue.name === name) return;
  conn.send('unwatchQueue', { queue: queue.name });
  queue.name = name;
  queue.jobs = new Map();
  queue.workers = [];
  conn.send('watchQueue', { queue: name });
  renderQueue();
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

function renderQueue() {
  $('#queue-name').textContent = queue.name;
  $('#hint-queue').textContent = queue.name;
  const connected = queue.workers.filter((w) => w.connected);
  $('#no-worker').hidden = connected.length > 0;
  const jobs = [...queue.jobs.values()].sort((a, b) => b.submittedAt - a.submittedAt).slice(0, 200);
  $('#jobs tbody').replaceChildren(...jobs.map((j) => {
    const tr = document.createElement('tr');
    const id = cell(j.id.slice(0, 12), 'mono');
    id.style.cursor = 'pointer';
    id.title = 'show this job';
    id.onclick = () => { watchJob(j); showView('job'); };
    const duration = j.startedAt ? formatDuration((j.finishedAt || Date.now()) - j.startedAt) : '';
    tr.append(id, cell(j.state === 'finished' ? j.reason : j.state), cell(new Date(j.submittedAt).toLocaleTimeString()),
      cell(duration), cell(j.worker || ''));
    return tr;
  }));
  $('#workers tbody').replaceChildren(...queue.workers.map((w) => {
    const tr = document.createElement('tr');
    tr.append(cell(`${w.id}${w.draining ? ' (draining)' : ''}${w.connected ? '' : ' (away)'}`), cell(`${w.busy} / ${w.slots}`),
      cell(Math.max(0, w.slots - w.busy)), cell(w.gpus), cell((w.tags || []).join(', ')));
    return tr;
  }));
}

// ---- views ---------------------------------------------------------------------------------

function showView(name) {
  for (const b of document.querySelectorAll('.tab')) b.setAttribute('aria-pressed', String(b.dataset.view === name));
  $('#view-job').hidden = name !== 'job';
  $('#view-queue').hidden = name !== 'queue';
}
for (const b of document.querySelectorAll('.tab')) b.onclick = () => showView(b.dataset.view);

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
  if (config.autostart && !initial && seq === inputsSeq) {
    if (conn.open) run(false); else runWhenOpen = false;
  }
}

/** Outputs of a finished job as the reference's page sends them: URLs (or the contents, with
 * `resolverefs`), plus `job/result.json` with `allowsetjob`. */
async function sendMetaframeOutputs(view) {
  if (!metaframe.ready || outputsSentFor === view.id) return;
  if (!['succeeded', 'failed', 'timedOut'].includes(view.reason)) return;
  outputsSentFor = view.id;
  const outputs = {};
  for (const o of view.outputs || []) {
    const url = new URL(outputUrl(view.id, o.path, await readLink(view.id)), location.href).href;
    outputs[o.path] = config.resolveRefs && o.size <= RESOLVE_MAX ? await fetchOutput(url, o.path)
      : { type: 'url', value: url, hash: o.sha256 };
  }
  if (config.allowSetJob) {
    const lines = (stream) => job.lines.filter((l) => l.stream === stream).map((l) => l.text);
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
if (job.id) {
  $('#status').hidden = false;
  $('#log-box').hidden = false;
}
tellHost('cq:ready', {});
