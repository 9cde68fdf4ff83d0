// The page as a metaframe: the metapage library's JSON-RPC 2.0 protocol over postMessage with the
// parent metapage. The frame asks to be set up (SetupIframeClientRequest), the parent answers
// with its id, its version and the current inputs (SetupIframeServerResponse), the frame
// acknowledges with the version both will speak (SetupIframeServerResponseAck); then the parent
// sends InputsUpdate and the frame sends OutputsUpdate and HashParamsUpdate. Versions "1" and "2"
// differ in how binary values travel: "1" as `{_s: true, _c: "Blob", value: <base64>}`, "2" as
// data URLs; both are read whatever was negotiated. See docs/embedding.md.

/** The newest protocol version this page speaks. */
export const METAFRAME_VERSION = '2';

/** The version to speak with a parent of version `parent`: ours, or "1" for older parents
 * ("0.x" and "1"), whose libraries know only the older encoding of binary values. */
export function negotiate(parent) {
  const major = parseFloat(String(parent || '0'));
  return major >= 2 ? '2' : '1';
}

export class Metaframe {
  /** `onInputs(changed, all, initial)` is called with the inputs that arrived (decoded), all of
   * them, and whether they came with the setup (before `onConnected`) or later. */
  constructor({ onInputs, onConnected, accept = async () => true, targetOrigin = '*', debug = false }) {
    this.onInputs = onInputs;
    this.accept = accept;
    this.onConnected = onConnected || (() => {});
    this.targetOrigin = targetOrigin;
    this.debug = debug;
    this.id = window.name;
    this.parentId = undefined;
    this.version = undefined;
    this.inputs = {};
    this.outputs = {};
    this.sent = 0;
    this.ready = false;
    this.framed = window.parent !== window;
  }

  /** Starts the handshake; does nothing outside an iframe. */
  start() {
    if (!this.framed) return;
    window.addEventListener('message', (ev) => this.onMessage(ev));
    this.send('SetupIframeClientRequest', { version: METAFRAME_VERSION });
  }

  send(method, params) {
    const msg = { jsonrpc: '2.0', id: ++this.sent, method, params, iframeId: this.id, parentId: this.parentId };
    if (this.debug) console.log('metaframe →', msg);
    window.parent.postMessage(msg, this.targetOrigin);
  }

  async onMessage(ev) {
    if (ev.source !== window.parent) return;
    const msg = ev.data;
    if (!msg || typeof msg !== 'object' || msg.jsonrpc !== '2.0') return;
    // Only a metapage on an origin the broker allows may set inputs (and so run jobs); once set
    // up, everything goes to that origin only.
    if (!(await this.accept(ev.origin))) return;
    if (this.ready && ev.origin !== this.targetOrigin && this.targetOrigin !== '*') return;
    if (this.debug) console.log('metaframe ←', msg);
    // Like the library: only the setup may come before we know our parent, and later messages
    // must name this frame and its parent.
    if (msg.method !== 'SetupIframeServerResponse' && (msg.parentId !== this.parentId || msg.iframeId !== this.id)) return;
    switch (msg.method) {
      case 'SetupIframeServerResponse': {
        if (this.ready) return;
        const p = msg.params || {};
        this.parentId = p.parentId;
        this.targetOrigin = ev.origin;
        if (p.iframeId) this.id = p.iframeId;
        this.version = negotiate(p.version);
        this.ready = true;
        this.send('SetupIframeServerResponseAck', { version: this.version });
        const initial = decodeInputs((p.state && p.state.inputs) || {});
        Object.assign(this.inputs, initial);
        if (Object.keys(initial).length) this.onInputs(initial, this.inputs, true);
        this.onConnected(this.version);
        // Outputs set before the parent answered.
        if (Object.keys(this.outputs).length) this.send('OutputsUpdate', this.encode(this.outputs));
        break;
      }
      case 'InputsUpdate': {
        if (!this.ready) return;
        const changed = decodeInputs((msg.params && msg.params.inputs) || {});
        for (const [k, v] of Object.entries(changed)) {
          if (v === undefined) delete this.inputs[k]; else this.inputs[k] = v;
        }
        this.onInputs(changed, this.inputs, false);
        break;
      }
      default:
        break;
    }
  }

  /** Sends outputs: `{name: value}` where a value is JSON, text, or `{binary: Uint8Array, mime}`. */
  setOutputs(outputs) {
    Object.assign(this.outputs, outputs);
    if (this.ready) this.send('OutputsUpdate', this.encode(outputs));
  }

  /** Tells the parent our hash changed, so the metapage saves it. */
  hashChanged() {
    if (this.ready) this.send('HashParamsUpdate', { hash: window.location.hash, metaframe: this.id });
  }

  encode(outputs) {
    const out = {};
    for (const [k, v] of Object.entries(outputs)) {
      if (v && v.binary instanceof Uint8Array) {
        const b64 = bytesToBase64(v.binary);
        const mime = v.mime || 'application/octet-stream';
        out[k] = this.version === '1'
          ? { _s: true, _c: 'Blob', value: b64, size: v.binary.length, fileType: mime }
          : `data:${mime};blob=true;base64,${b64}`;
      } else {
        out[k] = v;
      }
    }
    return out;
  }
}

/** Inputs as they arrive, with binary values (either version's encoding) turned into
 * `{binary: Uint8Array, mime}`. Everything else is left as it is. */
export function decodeInputs(inputs) {
  const out = {};
  for (const [k, v] of Object.entries(inputs)) out[k] = decodeValue(v);
  return out;
}

function decodeValue(v) {
  if (typeof v === 'string' && v.startsWith('data:')) {
    const comma = v.indexOf(',');
    const head = v.slice(5, comma);
    if (comma > 0 && head.split(';').includes('base64')) {
      return { binary: base64ToBytes(v.slice(comma + 1)), mime: head.split(';')[0] || 'application/octet-stream' };
    }
    return v;
  }
  if (v && typeof v === 'object') {
    if (v._s === true && v._c && typeof v.value === 'string') return { binary: base64ToBytes(v.value), mime: v.fileType };
    if (v.ref === 'base64' && v.c && typeof v.value === 'string') return { binary: base64ToBytes(v.value), mime: v.fileType };
  }
  return v;
}

const REF_TYPES = new Set(['utf8', 'base64', 'json', 'url', 'key']);

/** A metaframe input as a reference-format data ref, as the reference's page makes it: text and
 * numbers become utf8, binary base64, data refs pass through, other objects json; `null` and
 * `undefined` are no input. */
export function inputToDataRef(v) {
  if (v === undefined || v === null) return null;
  if (v && v.binary instanceof Uint8Array) return { type: 'base64', value: bytesToBase64(v.binary) };
  if (typeof v === 'string') return { type: 'utf8', value: v };
  if (typeof v === 'number' || typeof v === 'boolean') return { type: 'utf8', value: String(v) };
  if (typeof v === 'object' && !Array.isArray(v) && 'value' in v && REF_TYPES.has(v.type) && Object.keys(v).every((k) => ['value', 'type', 'hash'].includes(k))) return v;
  return { type: 'json', value: v };
}

export function bytesToBase64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function base64ToBytes(b64) {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}
