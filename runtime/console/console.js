// The Sluice console: live figures from GET /api/overview and the SSE stream
// GET /api/events, and a SQL workbench over POST /api/query. Plain JS, no build step;
// charts by uPlot (vendored, MIT).
'use strict';

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v; else if (k === 'text') e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
};

// --- formatting ---------------------------------------------------------------
const num = (v, digits = 1) => {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(digits) + 'G';
  if (a >= 1e6) return (v / 1e6).toFixed(digits) + 'M';
  if (a >= 1e4) return (v / 1e3).toFixed(digits) + 'k';
  if (a >= 100 || Number.isInteger(v)) return Math.round(v).toLocaleString();
  return v.toFixed(digits);
};
const bytes = (v) => {
  if (v === null || v === undefined) return '–';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return (i ? v.toFixed(1) : Math.round(v)) + ' ' + units[i];
};
const ago = (ms, now) => {
  if (!ms) return '–';
  const s = Math.max(0, (now - ms) / 1000);
  if (s < 1) return 'now';
  if (s < 90) return Math.round(s) + ' s ago';
  if (s < 5400) return Math.round(s / 60) + ' min ago';
  return Math.round(s / 3600) + ' h ago';
};
const lagText = (v, unit) => (v === null || v === undefined ? '–'
  : unit === 'bytes' ? bytes(v) : unit === 'ms' ? `${num(v / 1000)} s` : `${num(v)} ${unit}`);
const duration = (s) => {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
};

// --- the API, with a token when the server wants one ---------------------------
function headers() {
  const token = sessionStorage.getItem('sluice-token');
  return token ? { authorization: `Bearer ${token}` } : {};
}
async function api(path, init = {}) {
  const r = await fetch(path, { ...init, headers: { ...(init.headers || {}), ...headers() } });
  if (r.status === 401) $('login').hidden = false;
  return r;
}
$('login').onsubmit = (e) => {
  e.preventDefault();
  sessionStorage.setItem('sluice-token', $('token').value.trim());
  $('login').hidden = true;
  start();
};

// --- theme ------------------------------------------------------------------------
function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  localStorage.setItem('sluice-theme', theme);
  redrawCharts();
}
$('theme').onclick = () => applyTheme(document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark');
document.documentElement.dataset.theme = localStorage.getItem('sluice-theme')
  || (matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light');
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

// --- state -----------------------------------------------------------------------
const state = {
  series: null,      // columns as /api/overview gives them
  latest: null,      // the newest point
  shape: null,       // the pipeline as configured
  started: 0,
  paused: false,
  rangeS: 900,
  firingSince: {},   // alert_id -> {rule, key, value, since}
};

// --- tiles ----------------------------------------------------------------------
const TILES = [
  { id: 'events_in', label: 'events in/s', value: (p) => p.events_in, fmt: num },
  { id: 'rows_committed', label: 'rows committed/s', value: (p) => p.rows_committed, fmt: num },
  { id: 'dead_letters', label: 'dead letters/s', value: (p) => p.dead_letters, fmt: num, bad: (v) => v > 0 },
  { id: 'limited', label: 'shed or limited/s', value: (p) => p.limited, fmt: num, bad: (v) => v > 0 },
  { id: 'lag', label: 'largest source lag', value: (p) => (p.lag ? p.lag.value : null),
    fmt: (v, p) => (p && p.lag ? `${lagText(v, p.lag.unit)} (${p.lag.source})` : 'none'),
    bad: (v, p) => p.lag && v > ({ bytes: 1e6, records: 1e4, ms: 60e3 }[p.lag.unit] ?? Infinity) },
  { id: 'freshness_s', label: 'lake freshness', value: (p) => p.freshness_s, fmt: (v) => `${num(v)} s`, bad: (v) => v > 60 },
  { id: 'firing', label: 'alerts firing', value: (p) => p.firing, fmt: num, bad: (v) => v > 0 },
];
function buildTiles() {
  const box = $('tiles');
  box.textContent = '';
  for (const t of TILES) {
    box.append(el('div', { class: 'tile', id: `tile-${t.id}`, 'data-tile': t.id },
      el('div', { class: 'label', text: t.label }),
      el('div', { class: 'value', text: '–' }),
      sparkline([])));
  }
}
function sparkline(values) {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 100 28');
  svg.setAttribute('preserveAspectRatio', 'none');
  const line = document.createElementNS(ns, 'polyline');
  svg.append(line);
  drawSpark(svg, values);
  return svg;
}
function drawSpark(svg, values) {
  const vs = values.slice(-120).map((v) => v ?? 0);
  const max = Math.max(1e-9, ...vs);
  const pts = vs.map((v, i) => `${(i / Math.max(1, vs.length - 1)) * 100},${27 - (v / max) * 25}`);
  svg.firstChild.setAttribute('points', pts.join(' '));
}
function renderTiles() {
  const p = state.latest;
  if (!p) return;
  for (const t of TILES) {
    const tile = $(`tile-${t.id}`);
    const v = t.value(p);
    tile.querySelector('.value').textContent = t.fmt(v, p);
    tile.classList.toggle('bad', Boolean(t.bad && v !== null && t.bad(v, p)));
    const col = t.id === 'lag' ? state.series.lag : state.series[t.id];
    drawSpark(tile.querySelector('svg'), col || []);
  }
}

// --- the throughput chart -------------------------------------------------------------
let throughput = null;
const PALETTE = ['#1f6feb', '#bf3989', '#1a7f37', '#9a6700', '#8250df', '#cf222e', '#0969da', '#57606a'];
function chartWidth(id) { return Math.max(200, $(id).clientWidth || 600); }
function axisStyle() {
  const stroke = css('--muted'), grid = css('--line');
  return { stroke, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
}
function drawThroughput() {
  const s = state.series;
  if (!s) return;
  const names = Object.keys(s.sources);
  const data = [s.t, ...names.map((n) => s.sources[n])];
  const key = names.join('\u0000');
  if (!throughput || throughput.key !== key) {
    if (throughput) throughput.destroy();
    const opts = {
      width: chartWidth('throughput'), height: 220,
      series: [{}, ...names.map((n, i) => ({ label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, value: (u, v) => num(v) }))],
      axes: [axisStyle(), { ...axisStyle(), values: (u, vals) => vals.map((v) => num(v)) }],
      scales: { x: { time: true } },
      legend: { live: true },
    };
    throughput = new uPlot(opts, data, $('throughput'));
    throughput.key = key;
    if (!performance.getEntriesByName('sluice-first-chart').length) performance.mark('sluice-first-chart');
  } else {
    throughput.setData(data);
  }
}
function redrawCharts() {
  if (throughput) { throughput.destroy(); throughput = null; }
  drawThroughput();
  if (lastResult) drawResultChart(lastResult);
}
addEventListener('resize', () => {
  if (throughput) throughput.setSize({ width: chartWidth('throughput'), height: 220 });
  if (resultChart) resultChart.setSize({ width: chartWidth('result-chart'), height: 240 });
});

// --- tables of sources, pipeline, lake, alerts, dead letters ---------------------------------
function fillTable(id, rows) {
  const body = $(id).querySelector('tbody');
  body.textContent = '';
  for (const cells of rows) {
    const tr = el('tr');
    for (const c of cells) {
      const td = el('td', { text: c.text ?? c, class: c.class || (typeof c === 'string' ? '' : 'num') });
      tr.append(td);
    }
    body.append(tr);
  }
}
function renderSources(p, now) {
  fillTable('sources', Object.entries(p.sources).map(([name, s]) => [
    { text: name, class: '' }, { text: s.kind, class: '' },
    { text: s.error ? `retrying since ${new Date(s.error_since_ms).toLocaleTimeString()}: ${s.error}` : s.connected === false ? 'disconnected' : 'up',
      class: s.error || s.connected === false ? 'bad' : '' },
    { text: num(s.events) },
    { text: `${bytes(s.bytes)}/s` },
    { text: lagText(s.lag, s.lag_unit) },
    { text: num(s.dead_letters), class: s.dead_letters > 0 ? 'num bad' : 'num' },
    { text: num(s.limited), class: s.limited > 0 ? 'num bad' : 'num' },
    { text: ago(s.last_event_ms, now), class: '' },
  ]));
}
function badge(fill) {
  const level = fill >= 0.8 ? ['HIGH', 'bad'] : fill >= 0.4 ? ['MEDIUM', 'warn'] : ['LOW', 'ok'];
  return el('span', { class: `badge ${level[1]}`, text: `queue ${level[0]}`, title: `${Math.round(fill * 100)} % full` });
}
// A stage's share of each second, as Flink's web UI grades it: over 10 % MEDIUM,
// over 50 % HIGH. `what` is "busy" (working) or "backpressure" (waiting for the queue).
function stageBadge(what, ratio) {
  const r = ratio || 0;
  const level = r > 0.5 ? ['HIGH', 'bad'] : r > 0.1 ? ['MEDIUM', 'warn'] : ['LOW', 'ok'];
  return el('span', { class: `badge ${level[1]}`, 'data-level': level[0], text: `${what} ${level[0]}`, title: `${Math.round(r * 100)} % of each second` });
}
function stage(key, text, badge) {
  return el('span', { class: 'stage', 'data-stage': key }, el('span', { text }), badge);
}
function renderPipeline(p) {
  const box = $('pipeline');
  box.textContent = '';
  const shape = state.shape || { sources: [], streams: [], functions: [], windows: [], alerts: [] };
  const pl = p.pipeline;
  box.append(el('div', { class: 'row' }, badge(pl.queue_fill),
    el('span', { class: 'muted', text: `${num(pl.queue_batches)} batches, ${bytes(pl.queue_bytes)} queued · lake backlog ${bytes(pl.backlog_bytes)}${pl.held ? ' (holding sources)' : ''} · late ${num(pl.late_rows)}/s · limit hold ${num(pl.limit_hold, 2)} s/s` })));
  const streams = shape.streams.length ? shape.streams : [...new Set(shape.sources.map((s) => s.stream))];
  const downstream = (input) => [
    // `stage` last: a window's own `kind` (tumbling, sliding, session) must not hide it.
    ...shape.functions.filter((f) => f.input === input).map((f) => ({ ...f, stage: 'function' })),
    ...shape.windows.filter((w) => w.input === input).map((w) => ({ ...w, stage: 'window' })),
    ...shape.alerts.filter((a) => a.input === input).map((a) => ({ ...a, stage: 'alert' })),
  ];
  for (const stream of streams) {
    const sources = shape.sources.filter((s) => s.stream === stream).map((s) => s.name);
    const inRate = sources.reduce((a, n) => a + (p.sources[n] ? p.sources[n].events : 0), 0);
    const stages = el('div', { class: 'stages' });
    const waited = Math.max(0, ...sources.map((n) => (p.sources[n] ? p.sources[n].backpressure : 0)));
    stages.append(stage(`decode:${stream}`, `decode ${sources.join(', ') || 'http'}: ${num(inRate)}/s in`, stageBadge('backpressure', waited)));
    const table = p.tables[stream];
    stages.append(stage(`lake:${stream}`, `lake ${stream}: ${num(table ? table.rows_avg : 0)}/s`, stageBadge('busy', p.busy[`lake:${stream}`])));
    const box2 = el('div', { class: 'stream' }, el('strong', { text: stream }), stages);
    const queue = downstream(stream);
    for (let i = 0; i < queue.length; i++) {
      const s = queue[i];
      let text = `${s.stage} ${s.name}`;
      if (s.stage === 'function') {
        const f = p.functions[s.name] || { rows_in: 0, rows_out: 0 };
        text += `: ${num(f.rows_in)}/s in, ${num(f.rows_out)}/s out`;
        queue.push(...downstream(s.output).filter((d) => !queue.includes(d)));
      } else if (s.stage === 'window') {
        const w = p.windows[s.name] || {};
        const out = p.tables[s.name];
        text += `: ${num(out ? out.rows_avg : 0)}/s out, watermark ${w.watermark_lag_s === null || w.watermark_lag_s === undefined ? '–' : num(w.watermark_lag_s) + ' s'} behind, state ${bytes(w.state_bytes)}`;
        if (w.refused > 0) text += `, refused ${num(w.refused)}/s`;
      } else {
        text += `: ${p.alerts[s.name] || 0} firing`;
        if (s.notify && s.notify.length) text += ` → ${s.notify.join(', ')}`;
      }
      box2.append(el('div', { class: 'stages' }, el('span', { class: 'stage', text: `from ${s.input}` }),
        stage(`${s.stage}:${s.name}`, text, stageBadge('busy', p.busy[`${s.stage}:${s.name}`]))));
    }
    box.append(box2);
  }
  const notifiers = Object.entries(p.notifiers);
  if (notifiers.length) {
    box.append(el('div', { class: 'stages' }, ...notifiers.map(([name, n]) => el('span', {
      class: `stage${n.breaker_open || n.dropped > 0 ? ' bad' : ''}`, 'data-notifier': name,
      text: `notifier ${name}: ${num(n.sent)}/s sent${n.failed ? `, ${num(n.failed)}/s failed` : ''}${n.dropped ? `, ${num(n.dropped)}/s dropped` : ''}, ${num(n.queue_depth)} queued${n.breaker_open ? ', breaker open' : ''}`,
    }))));
  }
}
function renderLake(p, now) {
  const c = p.checkpoint;
  $('checkpoint').textContent = c.last_ms
    ? `last checkpoint ${ago(c.last_ms, now)}, took ${num(c.last_seconds, 2)} s, state ${bytes(c.last_state_bytes)} · ${c.total} checkpoints, ${c.failures} failed`
    : `no checkpoint yet · ${c.failures} failed`;
  fillTable('tables', Object.entries(p.tables).map(([name, t]) => [
    { text: name, class: '' }, { text: num(t.rows_avg) }, { text: num(t.files) }, { text: bytes(t.bytes) },
    { text: num(t.version) }, { text: ago(t.last_commit_ms, now), class: '' },
  ]));
}
function renderAlerts(p) {
  const box = $('firing');
  box.textContent = '';
  const rules = Object.entries(p.alerts);
  if (!rules.length) { box.append(el('p', { class: 'muted', text: 'no alert rules' })); return; }
  const conditions = Object.fromEntries((state.shape ? state.shape.alerts : []).map((a) => [a.name, a.condition]));
  const table = el('table', {}, el('thead', {}, el('tr', {}, ...['rule', 'firing', 'threshold', 'keys'].map((h) => el('th', { text: h })))));
  const body = el('tbody');
  for (const [rule, firing] of rules) {
    const keys = Object.values(state.firingSince).filter((f) => f.rule === rule)
      .map((f) => `${f.key} = ${num(f.value)} since ${new Date(f.since).toLocaleTimeString()}`);
    body.append(el('tr', {}, el('td', { text: rule }), el('td', { text: String(firing), class: firing ? 'num bad' : 'num' }),
      el('td', { text: conditions[rule] || '–' }), el('td', { text: keys.slice(0, 3).join('; ') + (keys.length > 3 ? ' …' : '') })));
  }
  table.append(body);
  box.append(el('div', { class: 'scroll' }, table));
}
function renderReasons(p) {
  const box = $('reasons');
  box.textContent = '';
  const entries = Object.entries(p.dead_letter_totals);
  if (!entries.length) { box.append(el('p', { class: 'muted', text: 'none since the service started' })); return; }
  box.append(el('div', { class: 'row' }, ...entries.map(([r, n]) =>
    el('span', { class: 'badge bad', 'data-reason': r, text: `${r}: ${num(n, 0)} (${num(p.dead_letter_reasons[r] || 0)}/s)` }))));
}
function prepend(list, item, max = 50) {
  list.prepend(item);
  while (list.children.length > max) list.lastChild.remove();
}
function onAlert(row) {
  const at = row.at || row.fired_at || Date.now();
  if (row.event === 'fire') state.firingSince[row.alert_id] = { rule: row.rule, key: row.key, value: row.value, since: row.fired_at || at };
  else if (row.event === 'resolve') delete state.firingSince[row.alert_id];
  prepend($('transitions'), el('li', { 'data-event': row.event },
    el('strong', { text: `${row.event} ` }), `${row.rule} ${row.key}`,
    el('span', { class: 'muted', text: ` value ${num(row.value)} at ${new Date(at).toLocaleTimeString()}` })));
  if (state.latest) renderAlerts(state.latest);
}
function onDeadLetter(row) {
  prepend($('dead'), el('li', { 'data-reason': row.reason },
    el('strong', { text: row.reason }), ` ${row.stream} from ${row._source || '?'}: ${row.detail} `,
    el('code', { text: row.payload })));
}

// --- the live view: the overview, then the event stream ------------------------------
function render() {
  const p = state.latest;
  if (!p || state.paused) return;
  performance.mark('sluice-render-start');
  const now = p.t;
  renderTiles();
  drawThroughput();
  renderSources(p, now);
  renderPipeline(p);
  renderLake(p, now);
  renderAlerts(p);
  renderReasons(p);
  $('uptime').textContent = `up ${duration((now - state.started) / 1000)}`;
  // How long a second's update takes (the browser tests report it).
  performance.measure('sluice-render', 'sluice-render-start');
  performance.clearMarks('sluice-render-start');
  if (performance.getEntriesByName('sluice-render').length > 600) performance.clearMeasures('sluice-render');
}
function appendPoint(p) {
  const s = state.series;
  s.t.push(p.t / 1000);
  for (const k of ['events_in', 'rows_committed', 'dead_letters', 'limited', 'freshness_s']) s[k].push(p[k]);
  s.lag.push(p.lag ? p.lag.value : null);
  s.firing.push(p.firing);
  for (const name of Object.keys(p.sources)) if (!s.sources[name]) s.sources[name] = s.t.map(() => 0);
  for (const [name, col] of Object.entries(s.sources)) col.push(p.sources[name] ? p.sources[name].events : 0);
  const from = s.t[s.t.length - 1] - state.rangeS;
  let cut = 0;
  while (cut < s.t.length && s.t[cut] <= from) cut++;
  if (cut) {
    for (const k of Object.keys(s)) if (Array.isArray(s[k])) s[k].splice(0, cut);
    for (const col of Object.values(s.sources)) col.splice(0, cut);
  }
}
async function loadOverview() {
  const r = await api(`/api/overview?range=${$('range').value}`);
  if (!r.ok) throw new Error(`overview: HTTP ${r.status}`);
  const o = await r.json();
  state.series = o.series;
  state.latest = o.latest;
  state.shape = o.shape;
  state.started = o.started_ms;
  state.rangeS = o.range_s;
  $('version').textContent = `v${o.version}`;
  render();
  if (o.latest && o.latest.firing > 0) loadFiring();
}
// The keys firing now, with their value and since when, from the alerts table (the
// event stream only brings transitions from now on).
async function loadFiring() {
  const result = await runSql(`SELECT alert_id, rule, key, value, CAST(fired_at AS VARCHAR) AS fired_at FROM alerts
    WHERE event = 'fire' AND alert_id NOT IN (SELECT alert_id FROM alerts WHERE event = 'resolve')
    ORDER BY fired_at DESC LIMIT 200`).catch(() => ({}));
  for (const r of result.rows || []) {
    state.firingSince[r.alert_id] ??= { rule: r.rule, key: r.key, value: r.value, since: Date.parse(r.fired_at) };
  }
  if (state.latest) renderAlerts(state.latest);
}
async function checkHealth() {
  try {
    const r = await fetch('/health');
    $('health').textContent = r.ok ? 'healthy' : `health ${r.status}`;
    $('health').className = `badge ${r.ok ? 'ok' : 'bad'}`;
  } catch {
    $('health').textContent = 'unreachable';
    $('health').className = 'badge bad';
  }
}
function setLive(s) {
  const live = $('live');
  live.dataset.state = s;
  live.textContent = s;
}

// The event stream is read with fetch, not EventSource: EventSource cannot send the
// Authorization header that a server with tokens wants.
let streamAbort = null;
async function follow() {
  if (streamAbort) streamAbort.abort();
  const abort = new AbortController();
  streamAbort = abort;
  let wait = 1000;
  while (!abort.signal.aborted) {
    try {
      if (!state.series) await loadOverview();
      const r = await fetch('/api/events', { headers: headers(), signal: abort.signal });
      if (r.status === 401) { $('login').hidden = false; setLive('needs token'); return; }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      setLive(state.paused ? 'paused' : 'live');
      wait = 1000;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let name = 'message', data = '';
          for (const line of block.split('\n')) {
            if (line.startsWith('event:')) name = line.slice(6).trim();
            else if (line.startsWith('data:')) data += line.slice(5).trim();
          }
          if (data) dispatch(name, JSON.parse(data));
        }
      }
    } catch (e) {
      if (abort.signal.aborted) return;
      console.info('event stream:', e.message);
    }
    // The stream ended (a restart, the network): reload the overview, so the charts
    // have no hole, and follow again.
    setLive('reconnecting');
    checkHealth();
    await new Promise((res) => setTimeout(res, wait));
    wait = Math.min(wait * 2, 10000);
    state.series = null;
  }
}
function dispatch(name, data) {
  if (name === 'metrics') {
    if (state.latest && data.t <= state.latest.t) return;
    appendPoint(data);
    state.latest = data;
    render();
  } else if (name === 'alert') onAlert(data);
  else if (name === 'dead_letter') onDeadLetter(data);
}
$('pause').onclick = () => {
  state.paused = !state.paused;
  $('pause').setAttribute('aria-pressed', String(state.paused));
  $('pause').textContent = state.paused ? 'Resume' : 'Pause';
  setLive(state.paused ? 'paused' : 'live');
  render();
};
$('range').onchange = () => { state.series = null; loadOverview().catch(() => {}); };

// --- the SQL workbench -------------------------------------------------------------
let lastResult = null;
let resultChart = null;
async function loadSchema() {
  const r = await api('/api/tables');
  const box = $('schema');
  if (!r.ok) { box.textContent = (await r.json().catch(() => ({}))).error || `HTTP ${r.status}`; return; }
  const { tables } = await r.json();
  box.textContent = tables.length ? '' : 'no tables yet';
  for (const t of tables) {
    const list = el('ul');
    const details = el('details', { 'data-table': t }, el('summary', { text: t }), list);
    details.ontoggle = async () => {
      // Columns once loaded stay; an error is shown and tried again on the next open.
      if (!details.open || list.querySelector('li:not(.error)')) return;
      list.textContent = '';
      const r = await api(`/api/tables/${encodeURIComponent(t)}`).catch((e) => ({ ok: false, status: e.message, json: async () => ({}) }));
      const body = await r.json().catch(() => ({}));
      if (!r.ok) { list.append(el('li', { class: 'error', text: body.error || `HTTP ${r.status}` })); return; }
      for (const c of body.columns) list.append(el('li', { text: `${c.name} ${c.type}` }));
    };
    summaryClick(details, t);
    box.append(details);
  }
}
function summaryClick(details, table) {
  details.querySelector('summary').ondblclick = () => {
    $('sql').value = `SELECT * FROM "${table}" ORDER BY _ingest_time DESC LIMIT 50`;
    run();
  };
}
async function runSql(sql, format = 'json') {
  const started = performance.now();
  const r = await api(`/api/query${format === 'csv' ? '?format=csv' : ''}`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ sql }),
  });
  const ms = performance.now() - started;
  if (!r.ok) {
    const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
    return { error: body.error || `HTTP ${r.status}`, ms };
  }
  return format === 'csv' ? { csv: await r.blob(), ms } : { rows: await r.json(), ms };
}
function remember(sql) {
  const list = JSON.parse(localStorage.getItem('sluice-history') || '[]').filter((s) => s !== sql);
  list.unshift(sql);
  localStorage.setItem('sluice-history', JSON.stringify(list.slice(0, 20)));
  showHistory();
}
function showHistory() {
  const select = $('history');
  select.length = 1;
  for (const sql of JSON.parse(localStorage.getItem('sluice-history') || '[]')) {
    select.append(el('option', { value: sql, text: sql.replace(/\s+/g, ' ').slice(0, 80) }));
  }
}
$('history').onchange = () => { if ($('history').value) $('sql').value = $('history').value; $('history').value = ''; };
async function run() {
  const sql = $('sql').value;
  $('status').textContent = 'running…';
  $('error').textContent = '';
  const result = await runSql(sql);
  if (result.error) {
    $('status').textContent = `failed after ${Math.round(result.ms)} ms`;
    $('error').textContent = result.error;
    return;
  }
  remember(sql);
  $('status').textContent = `${result.rows.length} rows in ${Math.round(result.ms)} ms`;
  showResult(result.rows);
}
function showResult(rows) {
  lastResult = rows;
  const table = $('result');
  table.textContent = '';
  if (!rows.length) { drawResultChart(rows); return; }
  const cols = Object.keys(rows[0]);
  table.append(el('thead', {}, el('tr', {}, ...cols.map((c) => el('th', { text: c })))));
  const body = el('tbody');
  for (const row of rows.slice(0, 1000)) {
    body.append(el('tr', {}, ...cols.map((c) => {
      const v = row[c];
      return el('td', { text: v === null || v === undefined ? 'NULL' : typeof v === 'object' ? JSON.stringify(v) : String(v), class: typeof v === 'number' ? 'num' : '' });
    })));
  }
  table.append(body);
  drawResultChart(rows);
}
const isTime = (v) => typeof v === 'string' && /^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}/.test(v) && !Number.isNaN(Date.parse(v));
// What the result looks like: a time column and numbers (lines), or a text column and
// numbers (bars); null for anything else.
function chartKind(rows) {
  if (rows.length < 2) return null;
  const cols = Object.keys(rows[0]);
  const numeric = cols.filter((c) => rows.every((r) => r[c] === null || typeof r[c] === 'number'));
  if (!numeric.length) return null;
  const time = cols.find((c) => !numeric.includes(c) && rows.every((r) => r[c] === null || isTime(r[c])));
  if (time) return { kind: 'lines', x: time, ys: numeric };
  const text = cols.find((c) => !numeric.includes(c) && rows.every((r) => typeof r[c] === 'string'));
  if (text && rows.length <= 100) return { kind: 'bars', x: text, ys: numeric.slice(0, 3) };
  return null;
}
function drawResultChart(rows) {
  const box = $('result-chart');
  if (resultChart) { resultChart.destroy(); resultChart = null; }
  box.textContent = '';
  box.dataset.chart = 'none';
  const what = chartKind(rows);
  if (!what) return;
  box.dataset.chart = what.kind;
  let data, xAxis, scales, seriesOpts;
  if (what.kind === 'lines') {
    const sorted = [...rows].sort((a, b) => Date.parse(a[what.x]) - Date.parse(b[what.x]));
    data = [sorted.map((r) => Date.parse(r[what.x]) / 1000), ...what.ys.map((c) => sorted.map((r) => r[c]))];
    scales = { x: { time: true } };
    xAxis = axisStyle();
    seriesOpts = what.ys.map((c, i) => ({ label: c, stroke: PALETTE[i % PALETTE.length], width: 1.5 }));
  } else {
    const labels = rows.map((r) => r[what.x]);
    data = [rows.map((_, i) => i), ...what.ys.map((c) => rows.map((r) => r[c]))];
    // Bars start at zero.
    scales = { x: { time: false, range: [-0.5, rows.length - 0.5] }, y: { range: (u, min, max) => [Math.min(0, min), Math.max(0, max) * 1.05 || 1] } };
    xAxis = { ...axisStyle(), values: (u, vals) => vals.map((v) => labels[v] ?? ''), incrs: [1], rotate: -45, size: 60 };
    const bars = uPlot.paths.bars({ size: [0.8 / what.ys.length, 100] });
    seriesOpts = what.ys.map((c, i) => ({ label: c, fill: PALETTE[i % PALETTE.length], stroke: PALETTE[i % PALETTE.length], paths: bars, points: { show: false } }));
  }
  resultChart = new uPlot({
    width: chartWidth('result-chart'), height: 240, scales,
    series: [{ label: what.x }, ...seriesOpts],
    axes: [xAxis, { ...axisStyle(), values: (u, vals) => vals.map((v) => num(v)) }],
  }, data, box);
}
$('run').onclick = run;
$('sql').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); }
});
$('csv').onclick = async () => {
  $('error').textContent = '';
  const result = await runSql($('sql').value, 'csv');
  if (result.error) { $('error').textContent = result.error; return; }
  const a = el('a', { href: URL.createObjectURL(result.csv), download: 'sluice-result.csv' });
  document.body.append(a);
  a.click();
  a.remove();
};

// --- start -----------------------------------------------------------------------
function start() {
  buildTiles();
  showHistory();
  checkHealth();
  loadSchema().catch((e) => { $('schema').textContent = e.message; });
  follow();
}
start();
