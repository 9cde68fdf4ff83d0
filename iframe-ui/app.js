// Lists the broker's queues and refreshes the table every few seconds.
const rows = document.querySelector('#queues tbody');
const conn = document.querySelector('#conn');
const token = new URLSearchParams(location.hash.slice(1)).get('token');

function cell(text) {
  const td = document.createElement('td');
  td.textContent = String(text);
  return td;
}

async function refresh() {
  try {
    const headers = token ? { authorization: `Bearer ${token}` } : {};
    const res = await fetch('/q', { headers });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const { queues } = await res.json();
    rows.replaceChildren(...queues.map((q) => {
      const tr = document.createElement('tr');
      for (const v of [q.queue, q.queued, q.assigned, q.running, q.finished, q.workers, q.freeSlots]) tr.append(cell(v));
      return tr;
    }));
    conn.textContent = 'connected';
  } catch (e) {
    conn.textContent = `cannot reach the broker (${e.message})`;
  }
}

refresh();
setInterval(refresh, 3000);
