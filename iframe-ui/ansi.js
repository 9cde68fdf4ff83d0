// ANSI escape sequences (SGR colours and styles) to DOM nodes; other control sequences are
// dropped. Text is always inserted as text, never as HTML.

const BASIC = ['#484f58', '#ff7b72', '#3fb950', '#d29922', '#58a6ff', '#bc8cff', '#39c5cf', '#b1bac4'];
const BRIGHT = ['#6e7681', '#ffa198', '#56d364', '#e3b341', '#79c0ff', '#d2a8ff', '#56d4dd', '#ffffff'];
/** The log's background (style.css `--bg-code`); text colours are kept readable on it. */
const BACKGROUND = [0x0d, 0x11, 0x17];
/** The least contrast ratio of text on the log background (WCAG AA for normal text). */
const MIN_CONTRAST = 4.5;

function rgbOf(css) {
  if (css.startsWith('#')) return [1, 3, 5].map((i) => parseInt(css.slice(i, i + 2), 16));
  return css.match(/\d+/g).map(Number);
}

function luminance([r, g, b]) {
  const lin = (c) => { const v = c / 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
}

export function contrast(a, b) {
  const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
  return (hi + 0.05) / (lo + 0.05);
}

const readableCache = new Map();
/** `css` as a colour, lightened towards white until it reads on the log background. */
export function readable(css) {
  let out = readableCache.get(css);
  if (out) return out;
  let rgb = rgbOf(css);
  const [r0, g0, b0] = rgb;
  for (let t = 0.05; contrast(rgb, BACKGROUND) < MIN_CONTRAST && t <= 1; t += 0.05) {
    rgb = [r0, g0, b0].map((c) => Math.round(c + (255 - c) * t));
  }
  out = `rgb(${rgb.join(',')})`;
  readableCache.set(css, out);
  return out;
}

function color256(n) {
  if (n < 8) return BASIC[n];
  if (n < 16) return BRIGHT[n - 8];
  if (n < 232) {
    const v = n - 16;
    const c = (x) => [0, 95, 135, 175, 215, 255][x];
    return `rgb(${c(Math.floor(v / 36))},${c(Math.floor(v / 6) % 6)},${c(v % 6)})`;
  }
  const g = 8 + (n - 232) * 10;
  return `rgb(${g},${g},${g})`;
}

/** Style state carried from one chunk of a stream to the next. */
export class AnsiState {
  constructor() { this.reset(); }
  reset() { this.fg = null; this.bg = null; this.bold = false; this.italic = false; this.underline = false; this.dim = false; }
  apply(params) {
    const p = params.length ? params : [0];
    for (let i = 0; i < p.length; i++) {
      const n = p[i];
      if (n === 0) this.reset();
      else if (n === 1) this.bold = true;
      else if (n === 2) this.dim = true;
      else if (n === 3) this.italic = true;
      else if (n === 4) this.underline = true;
      else if (n === 22) { this.bold = false; this.dim = false; }
      else if (n === 23) this.italic = false;
      else if (n === 24) this.underline = false;
      else if (n >= 30 && n <= 37) this.fg = BASIC[n - 30];
      else if (n >= 90 && n <= 97) this.fg = BRIGHT[n - 90];
      else if (n === 39) this.fg = null;
      else if (n >= 40 && n <= 47) this.bg = BASIC[n - 40];
      else if (n >= 100 && n <= 107) this.bg = BRIGHT[n - 100];
      else if (n === 49) this.bg = null;
      else if ((n === 38 || n === 48) && p[i + 1] === 5 && p[i + 2] !== undefined) {
        this[n === 38 ? 'fg' : 'bg'] = color256(p[i + 2]); i += 2;
      } else if ((n === 38 || n === 48) && p[i + 1] === 2 && p[i + 4] !== undefined) {
        this[n === 38 ? 'fg' : 'bg'] = `rgb(${p[i + 2]},${p[i + 3]},${p[i + 4]})`; i += 4;
      }
    }
  }
  clone() {
    const c = new AnsiState();
    Object.assign(c, this);
    return c;
  }
  /** Follows the SGR codes of `text` without drawing it. */
  scan(text) {
    for (const m of text.matchAll(ESCAPES)) if (m[2] === 'm') this.apply(m[1].split(';').filter((x) => x !== '').map(Number));
  }
  styled() { return this.fg || this.bg || this.bold || this.italic || this.underline || this.dim; }
  span(text) {
    const s = document.createElement('span');
    s.textContent = text;
    if (this.fg) s.style.color = readable(this.fg);
    if (this.bg) {
      s.style.background = this.bg;
      if (!this.fg) s.style.color = contrast(rgbOf(this.bg), [0, 0, 0]) > contrast(rgbOf(this.bg), [0xe6, 0xed, 0xf3]) ? '#000' : '#e6edf3';
    }
    if (this.bold) s.style.fontWeight = '700';
    if (this.italic) s.style.fontStyle = 'italic';
    if (this.underline) s.style.textDecoration = 'underline';
    if (this.dim) s.style.opacity = '0.85';
    return s;
  }
}

// CSI sequences, OSC sequences (terminated by BEL or ST) and lone escapes.
const ESCAPES = /\x1b\[([0-9;?]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]?/g;

/** Appends `text` to `parent`, coloured as its SGR codes say. Returns the plain text. */
export function appendAnsi(parent, text, state) {
  let last = 0;
  let plain = '';
  const push = (chunk) => {
    if (!chunk) return;
    plain += chunk;
    parent.append(state.styled() ? state.span(chunk) : document.createTextNode(chunk));
  };
  for (const m of text.matchAll(ESCAPES)) {
    push(text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[2] === 'm') state.apply(m[1].split(';').filter((x) => x !== '').map(Number));
  }
  push(text.slice(last));
  return plain;
}

/** `text` without escape sequences. */
export function stripAnsi(text) {
  return text.replace(ESCAPES, '');
}
