// The log viewer: holds a job's whole log in compact arrays and renders only the rows in view.
//
// Rows have one fixed height, so the scroll height is rows × height (a tall spacer) and the
// rows in view follow from `scrollTop` alone; only those (plus a few above and below) are in the
// DOM, and ANSI escapes are parsed only for them. Appending lines never moves what is in view:
// rows are added below, and only "follow" scrolls. Sections between `::group::name` and
// `::endgroup::` lines fold; folded rows are skipped through an index of the folded ranges.
// Drawing is batched on requestAnimationFrame, so a burst of lines costs one layout.

import { AnsiState, appendAnsi, stripAnsi } from './ansi.js';

const STREAMS = ['stdout', 'stderr', 'system'];
/** Rows rendered above and below the ones in view. */
const OVERSCAN = 10;
/** The tallest scroll height used (browsers cap an element's height: Firefox near 17.9 million
 * pixels); a taller log scrolls proportionally. */
const MAX_SCROLL = 15e6;
const GROUP = /^(?:\x1b\[[0-9;]*m)*::group::(.*)$/;
const ENDGROUP = /^(?:\x1b\[[0-9;]*m)*::endgroup::\s*$/;

function pad(n, w = 2) { return String(n).padStart(w, '0'); }

function clock(ms) {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

export class LogView {
  /** `scroller` is an empty element the viewer fills; `onChange` hears about counts and follow. */
  constructor(scroller, { onChange = () => {} } = {}) {
    this.el = scroller;
    this.onChange = onChange;
    this.spacer = document.createElement('div');
    this.spacer.className = 'log-spacer';
    this.rowsEl = document.createElement('div');
    this.rowsEl.className = 'log-rows';
    this.el.append(this.spacer, this.rowsEl);
    this.rowHeight = 0;
    this.timestamps = false;
    this.drawScheduled = false;
    this.el.addEventListener('scroll', () => this.onScroll(), { passive: true });
    this.el.addEventListener('click', (e) => this.onClick(e));
    if (typeof ResizeObserver === 'function') {
      new ResizeObserver(() => { this.verified = false; this.draw(true); }).observe(this.el);
    }
    this.reset();
  }

  /** Forgets the log: a new job is on screen. */
  reset() {
    this.texts = [];
    this.streams = [];
    this.times = [];
    /** ANSI state at the start of a line, only where it is not the default (line → state). */
    this.ansiAt = new Map();
    this.carry = STREAMS.map(() => new AnsiState());
    /** Sections: {start, end (line of `::endgroup::`, or null while open), name}. */
    this.groups = [];
    this.groupAt = new Map();
    /** Lines that close a section (`::endgroup::`): drawn as the section's end, not as text. */
    this.endAt = new Set();
    /** First lines of a new attempt of the job (line → attempt), drawn with a separator. */
    this.attemptAt = new Map();
    this.folded = new Set();
    this.hidden = [];
    this.follow = true;
    this.highlight = -1;
    this.query = '';
    this.matches = [];
    this.current = -1;
    this.wantLine = 0;
    this.lastScrollTop = 0;
    this.settingScroll = false;
    this.drawn = { first: -1, last: -1, version: -1 };
    this.version = 0;
    this.firstLineAt = null;
    this.rowsEl.replaceChildren();
    this.height = 0;
    this.scrollHeight = 0;
    this.spacer.style.height = '0px';
    this.el.scrollTop = 0;
    this.schedule();
  }

  get length() { return this.texts.length; }

  /** Appends lines `{stream, time, text}`; drawn on the next frame. */
  append(lines) {
    for (const line of lines) {
      const i = this.texts.length;
      const s = Math.max(0, STREAMS.indexOf(line.stream));
      const text = line.text;
      this.texts.push(text);
      this.streams.push(s);
      this.times.push(line.time || 0);
      const carry = this.carry[s];
      if (carry.styled()) this.ansiAt.set(i, carry.clone());
      if (text.indexOf('\x1b') !== -1) carry.scan(text);
      if (text.charCodeAt(0) === 58 || text.charCodeAt(0) === 27) this.section(i, text);
      if (this.query && this.matchesLine(i)) this.matches.push(i);
    }
    if (lines.length) this.schedule();
  }

  /** Says that line `line` (0-based, maybe not here yet) starts attempt `attempt`. */
  markAttempt(line, attempt) {
    this.attemptAt.set(line, attempt);
    this.version++;
    this.schedule();
  }

  section(i, text) {
    const g = GROUP.exec(text.replace(/\n$/, ''));
    const open = this.groups.length && this.groups[this.groups.length - 1].end === null
      ? this.groups[this.groups.length - 1] : null;
    if (g) {
      // Sections do not nest: a new one closes the one before.
      if (open) open.end = i - 1;
      const group = { start: i, end: null, name: stripAnsi(g[1]).trim() };
      this.groups.push(group);
      this.groupAt.set(i, group);
    } else if (ENDGROUP.test(text.replace(/\n$/, '')) && open) {
      open.end = i;
      this.endAt.add(i);
    }
  }

  // ---- rows and lines (rows are what is shown: lines minus folded ones) ----------------------

  /** Rebuilds the index of hidden ranges: [first hidden line, count], sorted. */
  reindex() {
    this.hidden = [];
    for (const g of this.groups) {
      if (!this.folded.has(g.start)) continue;
      const end = g.end === null ? this.texts.length - 1 : g.end;
      if (end > g.start) this.hidden.push([g.start + 1, end - g.start]);
    }
    this.hidden.sort((a, b) => a[0] - b[0]);
  }

  hiddenCount() {
    let n = 0;
    for (const [start, count] of this.hidden) n += Math.min(count, Math.max(0, this.texts.length - start));
    return n;
  }

  rowCount() { return this.texts.length - (this.hidden.length ? this.hiddenCount() : 0); }

  lineOfRow(row) {
    let line = row;
    for (const [start, count] of this.hidden) {
      if (start <= line) line += count; else break;
    }
    return line;
  }

  rowOfLine(line) {
    let row = line;
    for (const [start, count] of this.hidden) {
      if (start > line) break;
      if (line < start + count) return row - (line - start) - 1; // folded: its section's header
      row -= count;
    }
    return row;
  }

  /** Unfolds the section holding `line`, if it is folded. */
  reveal(line) {
    for (const g of this.groups) {
      const end = g.end === null ? Infinity : g.end;
      if (line > g.start && line <= end && this.folded.has(g.start)) {
        this.folded.delete(g.start);
        this.reindex();
      }
    }
  }

  toggleSection(line) {
    if (this.folded.has(line)) this.folded.delete(line); else this.folded.add(line);
    this.reindex();
    this.version++;
    this.draw(true);
  }

  // ---- scrolling --------------------------------------------------------------------------

  measure() {
    if (this.rowHeight) return this.rowHeight;
    const probe = document.createElement('div');
    probe.className = 'log-row';
    probe.textContent = 'x';
    this.rowsEl.append(probe);
    this.rowHeight = probe.getBoundingClientRect().height || 18;
    probe.remove();
    return this.rowHeight;
  }

  /** Scrolls to `top` (clamped to the rows' height, which the spacer makes the scroll
   * height), without reading the layout back. */
  setScroll(top, view = this.el.clientHeight) {
    const max = Math.max(0, this.scrollHeight - view);
    const target = Math.round(Math.max(0, Math.min(top / this.ratio(view), max)));
    if (Math.abs(this.lastScrollTop - target) < 1) return;
    this.settingScroll = true;
    this.el.scrollTop = target;
    this.lastScrollTop = target;
  }

  onScroll() {
    const top = this.el.scrollTop;
    // A scroll the viewer set lands where it was set (or at the end, where the browser clamps
    // it). The reader's own scroll in the same frame is coalesced into the same event: it is
    // told apart by where it landed, so scrolling up while lines stream always stops following.
    const ours = this.settingScroll && (Math.abs(top - this.lastScrollTop) < 1
      || Math.abs(top - (this.el.scrollHeight - this.el.clientHeight)) < 1);
    this.settingScroll = false;
    if (ours) {
      // nothing to decide
    } else if (top < this.lastScrollTop - 1 && this.follow) {
      // The reader scrolled up: stop following, and keep the position from now on.
      this.follow = false;
      this.onChange();
    } else if (!this.follow && this.atEnd()) {
      this.follow = true;
      this.onChange();
    }
    this.lastScrollTop = top;
    this.schedule();
  }

  /** Pixels of the rows per pixel of scrolling: 1 unless the log is taller than MAX_SCROLL. */
  ratio(view) {
    if (this.scrollHeight === this.height || this.scrollHeight <= view) return 1;
    return (this.height - view) / (this.scrollHeight - view);
  }

  atEnd() { return this.el.scrollHeight - this.el.scrollTop - this.el.clientHeight < this.measure(); }

  setFollow(on) {
    this.follow = on;
    if (on) this.setScroll(this.height);
    this.onChange();
    this.schedule();
  }

  /** Scrolls line `n` (1-based) into the middle of the view and highlights it; a line not yet
   * received is shown once it arrives. */
  goToLine(n, { highlight = true } = {}) {
    const line = n - 1;
    if (line < 0) return;
    if (highlight) this.highlight = line;
    this.follow = false;
    if (line >= this.texts.length) {
      this.wantLine = n;
      this.onChange();
      return;
    }
    this.wantLine = 0;
    this.reveal(line);
    this.version++;
    this.draw(true);
    const h = this.measure();
    this.setScroll(this.rowOfLine(line) * h - (this.el.clientHeight - h) / 2);
    this.onChange();
    this.draw(true);
  }

  /** The first line (1-based) whose row is fully in view. */
  topLine() {
    const h = this.measure();
    return this.lineOfRow(Math.ceil((this.el.scrollTop * this.ratio(this.el.clientHeight)) / h)) + 1;
  }

  // ---- search -----------------------------------------------------------------------------

  matchesLine(i) {
    const t = this.texts[i];
    const plain = t.indexOf('\x1b') === -1 ? t : stripAnsi(t);
    return plain.toLowerCase().includes(this.query);
  }

  /** Finds `query` (case-insensitive) in the whole log; returns the number of matching lines. */
  search(query) {
    this.query = query.toLowerCase();
    this.matches = [];
    this.current = -1;
    if (this.query) {
      for (let i = 0; i < this.texts.length; i++) if (this.matchesLine(i)) this.matches.push(i);
    }
    this.version++;
    this.schedule();
    this.onChange();
    return this.matches.length;
  }

  /** Moves to the next (+1) or previous (-1) match; returns its line (1-based) or 0. */
  step(dir) {
    if (!this.matches.length) return 0;
    const n = this.matches.length;
    this.current = this.current === -1 ? (dir > 0 ? 0 : n - 1) : (this.current + dir + n) % n;
    const line = this.matches[this.current] + 1;
    this.goToLine(line);
    return line;
  }

  // ---- text -------------------------------------------------------------------------------

  /** The whole log as text, with or without its ANSI escapes. */
  text({ ansi = false } = {}) {
    return ansi ? this.texts.join('') : this.texts.map((t) => (t.indexOf('\x1b') === -1 ? t : stripAnsi(t))).join('');
  }

  linesOf(stream) {
    const s = STREAMS.indexOf(stream);
    const out = [];
    for (let i = 0; i < this.texts.length; i++) if (this.streams[i] === s) out.push(this.texts[i]);
    return out;
  }

  setTimestamps(on) {
    this.timestamps = on;
    this.el.classList.toggle('with-times', on);
    this.version++;
    this.draw(true);
  }

  // ---- drawing ----------------------------------------------------------------------------

  schedule() {
    if (this.drawScheduled) return;
    this.drawScheduled = true;
    requestAnimationFrame(() => { this.drawScheduled = false; this.draw(); });
  }

  draw(force = false) {
    // Reads first (the layout of the last frame is still valid), then writes: no forced layout.
    const view = this.el.clientHeight;
    const h = this.measure();
    if (this.folded.size) this.reindex();
    const rows = this.rowCount();
    const height = rows * h;
    if (height !== this.height) {
      this.height = height;
      this.scrollHeight = Math.min(height, MAX_SCROLL);
      this.spacer.style.height = `${this.scrollHeight}px`;
    }
    if (this.wantLine && this.wantLine <= this.texts.length) {
      this.goToLine(this.wantLine, { highlight: this.highlight === this.wantLine - 1 });
      return;
    }
    if (this.follow) this.setScroll(height, view);
    const scrolled = this.lastScrollTop;
    const top = scrolled * this.ratio(view);
    const first = Math.max(0, Math.floor(top / h) - OVERSCAN);
    const last = Math.min(rows, Math.ceil((top + (view || h * 20)) / h) + OVERSCAN);
    // Where the first drawn row goes: its own offset, or (scrolling proportionally) the
    // scroll position plus its offset from the top of the view.
    const offset = top === scrolled ? first * h : scrolled - top + first * h;
    const d = this.drawn;
    // Lines appended below the rows in view change nothing drawn: skip the frame.
    if (!force && d.first === first && d.last === last && d.version === this.version && d.offset === offset) return;
    this.drawn = { first, last, version: this.version, offset };
    this.rowsEl.style.transform = `translateY(${offset}px)`;
    // Row elements are reused: rotated when the range moves (so rows still in view keep their
    // content), then refilled only where their line or the view's version changed.
    const rowsEl = this.rowsEl;
    const n = last - first;
    const shift = d.first >= 0 ? first - d.first : 0;
    if (shift > 0 && shift < rowsEl.childElementCount) {
      for (let k = 0; k < shift; k++) rowsEl.append(rowsEl.firstElementChild);
    } else if (shift < 0 && -shift < rowsEl.childElementCount) {
      for (let k = 0; k < -shift; k++) rowsEl.prepend(rowsEl.lastElementChild);
    }
    while (rowsEl.childElementCount > n) rowsEl.lastElementChild.remove();
    while (rowsEl.childElementCount < n) rowsEl.append(this.newRow());
    let el = rowsEl.firstElementChild;
    for (let r = first; r < last; r++, el = el.nextElementSibling) this.fill(el, this.lineOfRow(r));
    if (this.texts.length && this.firstLineAt === null) this.firstLineAt = performance.now();
    // The height measured first may predate the style sheet: check it once against a real row.
    if (!this.verified && this.rowsEl.firstChild) {
      this.verified = true;
      const real = this.rowsEl.firstChild.getBoundingClientRect().height;
      if (real && Math.abs(real - h) > 0.01) {
        this.rowHeight = real;
        this.drawn.version = -1;
        this.schedule();
      }
    }
  }

  newRow() {
    const div = document.createElement('div');
    const ln = document.createElement('a');
    ln.className = 'ln';
    ln.tabIndex = -1;
    const ts = document.createElement('span');
    ts.className = 'ts';
    const tx = document.createElement('span');
    tx.className = 'tx';
    div.append(ln, ts, tx);
    div.cqLine = -1;
    return div;
  }

  /** Shows line `i` in the row element `div`, unless it already does for this version. */
  fill(div, i) {
    if (div.cqLine === i && div.cqVersion === this.version) return;
    div.cqLine = i;
    div.cqVersion = this.version;
    const stream = STREAMS[this.streams[i]];
    let cls = `log-row ${stream}`;
    if (i === this.highlight) cls += ' hl';
    if (this.query && this.matches.length && this.matchesLine(i)) cls += this.matches[this.current] === i ? ' match current' : ' match';
    const group = this.groupAt.get(i);
    if (group) cls += this.folded.has(i) ? ' section folded' : ' section';
    if (this.endAt.has(i)) cls += ' endgroup';
    const attempt = this.attemptAt.get(i);
    if (attempt !== undefined) cls += ' attempt-start';
    div.className = cls;
    div.dataset.line = i + 1;
    const [ln, ts, tx] = div.children;
    if (attempt !== undefined) tx.dataset.attempt = `attempt ${attempt}`;
    else if (tx.dataset.attempt) delete tx.dataset.attempt;
    ln.textContent = i + 1;
    ln.href = this.linkFor(i + 1);
    ts.textContent = this.timestamps && this.times[i] ? clock(this.times[i]) : '';
    if (group) {
      const toggle = document.createElement('button');
      toggle.type = 'button';
      toggle.className = 'fold';
      toggle.dataset.fold = i;
      toggle.setAttribute('aria-expanded', String(!this.folded.has(i)));
      // The section's own lines, without the `::endgroup::` that closes it.
      const inside = group.end === null ? this.texts.length - 1 - i : group.end - i - 1;
      toggle.textContent = `${this.folded.has(i) ? '▸' : '▾'} ${group.name || 'section'}${this.folded.has(i) ? ` (${inside} ${inside === 1 ? 'line' : 'lines'})` : ''}`;
      tx.replaceChildren(toggle);
      return;
    }
    if (this.endAt.has(i)) {
      tx.textContent = '';
      return;
    }
    const text = this.texts[i].replace(/\r?\n$/, '');
    const state = this.ansiAt.get(i);
    if (state || text.indexOf('\x1b') !== -1) {
      tx.replaceChildren();
      appendAnsi(tx, text, state ? state.clone() : new AnsiState());
    } else {
      tx.textContent = text;
    }
  }

  onClick(e) {
    const fold = e.target.closest('button.fold');
    if (fold) {
      this.toggleSection(Number(fold.dataset.fold));
      return;
    }
    const ln = e.target.closest('a.ln');
    if (ln) {
      e.preventDefault();
      const n = Number(ln.textContent);
      this.highlight = n - 1;
      this.version++;
      this.draw(true);
      this.onLineLink(n);
    }
  }

  /** Called with a line number (1-based) whose link was clicked; the page puts it in the hash. */
  onLineLink() {}

  /** The link to line `n` (1-based); the page makes it a link to its job's line. */
  linkFor(n) { return `#line=${n}`; }
}
