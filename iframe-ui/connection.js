// One websocket to the broker for everything the page shows: hello, requests with ids, and
// reconnection with capped, jittered backoff. Subscriptions are re-sent by the page after each
// (re)connect, with the offsets it has, so nothing is missed or repeated.

const BACKOFF_MIN = 250;
const BACKOFF_MAX = 10000;

export class Connection {
  constructor({ token, base, queue, onMessage, onState, onOpen }) {
    this.token = token;
    /** Names the queue the socket serves: a broker of a cluster serves it from that queue's shard. */
    this.queue = queue || (() => '');
    /** Another broker's origin (`http(s)://host`), or empty for this page's. */
    this.base = base || '';
    this.onMessage = onMessage;
    this.onState = onState;
    this.onOpen = onOpen;
    this.nextRequest = 1;
    this.pending = new Map();
    this.backoff = BACKOFF_MIN;
    this.open = false;
    this.stopped = false;
    this.connect();
  }

  url() {
    const query = this.bound ? `?queue=${encodeURIComponent(this.bound)}` : '';
    if (this.base) return `${this.base.replace(/^http/, 'ws')}/ws/client${query}`;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${proto}//${location.host}/ws/client${query}`;
  }

  connect() {
    this.onState(this.everOpened ? 'reconnecting' : 'connecting');
    /** The queue this socket is opened for. */
    this.bound = this.queue();
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onopen = () => {
      const hello = { protocol: 1, agent: 'cq-ui' };
      if (this.token) hello.token = this.token;
      ws.send(JSON.stringify({ type: 'hello', data: hello }));
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      if (msg.type === 'welcome') {
        this.open = true;
        this.everOpened = true;
        this.backoff = BACKOFF_MIN;
        this.onState('open');
        this.onOpen();
        return;
      }
      const request = msg.data && msg.data.request;
      if (request !== undefined && this.pending.has(request)) {
        const { resolve, reject } = this.pending.get(request);
        this.pending.delete(request);
        if (msg.type === 'error') reject(new Error(msg.data.message)); else resolve(msg);
      }
      this.onMessage(msg);
    };
    ws.onclose = (ev) => {
      const wasOpen = this.open;
      this.open = false;
      for (const { reject } of this.pending.values()) reject(new Error('the connection to the broker was lost'));
      this.pending.clear();
      if (this.stopped) return;
      if (this.rebinding) {
        this.rebinding = false;
        this.connect();
        return;
      }
      if (this.held) {
        this.onState('reconnecting', 'held');
        return;
      }
      if (ev.code === 4001 || ev.code === 4003) {
        this.onState('unauthorized', ev.reason);
        return;
      }
      const wait = this.backoff / 2 + Math.random() * this.backoff / 2;
      this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX);
      this.onState(wasOpen || this.everOpened ? 'reconnecting' : 'connecting', `retrying in ${Math.round(wait)} ms`);
      setTimeout(() => this.connect(), wait);
    };
  }

  send(type, data) {
    if (!this.open) return false;
    this.ws.send(JSON.stringify({ type, data }));
    return true;
  }

  /** Sends a message that carries a request id; resolves with the broker's answer to it. */
  request(type, data) {
    return new Promise((resolve, reject) => {
      const request = this.nextRequest++;
      if (!this.send(type, { ...data, request })) {
        reject(new Error('not connected to the broker; retrying'));
        return;
      }
      this.pending.set(request, { resolve, reject });
    });
  }

  /** Opens a socket for another queue (the one `queue()` names now), at once. */
  rebind() {
    if (!this.ws || this.ws.readyState === WebSocket.CLOSED) return this.connect();
    this.rebinding = true;
    this.ws.close();
  }

  /** Drops the socket as a network failure would (used by tests and the reconnect demo). */
  drop() {
    if (this.ws) this.ws.close();
  }

  /** Drops the socket and stays away until `release` (tests: "the broker is down"). */
  hold() {
    this.held = true;
    this.drop();
  }

  release() {
    this.held = false;
    this.connect();
  }

  setToken(token) {
    this.token = token;
    this.backoff = BACKOFF_MIN;
    this.connect();
  }
}
