// The evmesh console: one script, no framework, no build step. Every page is drawn
// from the node's own API (the JSON mapping of its gRPC services at /api/...), with
// the rights of the token given, if the node asks for one.
'use strict';

// ---------------------------------------------------------------- the node's API

class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const TOKEN_KEY = 'evmesh.token';

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

function headers() {
  const h = { 'content-type': 'application/json' };
  if (token()) h.authorization = 'Bearer ' + token();
  return h;
}

async function failure(response) {
  let body = {};
  try {
    body = await response.json();
  } catch (_) {
    body = { code: 'HTTP_' + response.status, message: response.statusText };
  }
  return new ApiError(body.code || 'UNKNOWN', body.message || 'the node answered ' + response.status);
}

// Calls a unary method, e.g. api('evmesh.v1.Mesh/ListGroups', {}). Asks for a token
// when the node wants one, then tries again.
async function api(method, body) {
  for (;;) {
    const response = await fetch('/api/' + method, {
      method: 'POST',
      headers: headers(),
      body: JSON.stringify(body || {}),
    });
    if (response.ok) return response.json();
    const error = await failure(response);
    if (error.code === 'UNAUTHENTICATED' && (await login(error.message))) continue;
    throw error;
  }
}

// Every page of a paged list method.
async function all(method, request, items, next) {
  const out = [];
  let page = await api(method, request);
  for (;;) {
    const got = page[items] || [];
    out.push(...got);
    if (!page.more || got.length === 0) return out;
    page = await api(method, Object.assign({}, request, next(got[got.length - 1])));
  }
}

// Asks for a token once, however many calls were refused meanwhile (a page that
// refreshes by itself asks again while the dialog is open).
function login(reason) {
  if (!login.pending) {
    login.pending = ask(reason).finally(() => {
      login.pending = null;
    });
  }
  return login.pending;
}

function ask(reason) {
  const dialog = document.getElementById('login');
  const input = document.getElementById('login-token');
  const error = document.getElementById('login-error');
  input.value = '';
  error.hidden = !token();
  error.textContent = token() ? 'The node refused that token: ' + reason : '';
  return new Promise((resolve) => {
    dialog.onclose = () => {
      if (dialog.returnValue === 'ok' && input.value.trim()) {
        sessionStorage.setItem(TOKEN_KEY, input.value.trim());
        document.getElementById('token').hidden = false;
        resolve(true);
      } else {
        resolve(false);
      }
    };
    dialog.showModal();
    input.focus();
  });
}

// ---------------------------------------------------------------- building pages

// h('a', {href: '/x', class: 'y'}, 'text', child...): an element; strings are text,
// never markup.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const svgNS = 'http://www.w3.org/2000/svg';
function s(tag, attrs, ...children) {
  const el = document.createElementNS(svgNS, tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

const main = () => document.getElementById('main');

function render(...children) {
  const m = main();
  m.replaceChildren();
  append(m, children);
}

function title(text) {
  document.title = text + ' · evmesh';
}

function showError(error, where) {
  const box = h('div', { class: 'error', role: 'alert' },
    h('strong', {}, error.code ? error.code + ': ' : 'Error: '), error.message || String(error));
  if (where) where.replaceChildren(box);
  else render(box);
}

function toast(text) {
  const t = document.getElementById('toast');
  t.textContent = text;
  t.classList.add('shown');
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove('shown'), 4000);
}

// A time in the viewer's zone; the exact timestamp, and the zone, on hover.
function when(iso) {
  if (!iso) return h('span', { class: 'muted' }, '—');
  const d = new Date(iso);
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  return h('time', { datetime: iso, title: iso + ' (UTC) · ' + d.toString() + ' · ' + zone },
    d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' }));
}

function number(v) {
  return Number(v || 0).toLocaleString();
}

// "30s", "1.5s" (proto3 JSON durations) as people read them.
function seconds(duration) {
  return parseFloat(String(duration || '0s').replace(/s$/, '')) || 0;
}

function age(duration) {
  const total = seconds(duration);
  if (total === 0) return '—';
  if (total < 1) return Math.round(total * 1000) + ' ms';
  if (total < 120) return total.toFixed(1) + ' s';
  if (total < 7200) return Math.round(total / 60) + ' min';
  return (total / 3600).toFixed(1) + ' h';
}

// JSON, collapsed when it is large.
function json(value, openBelow = 400) {
  const text = JSON.stringify(value, null, 2);
  const pre = h('pre', { class: 'json' }, text);
  if (text.length <= openBelow) return pre;
  const lines = text.split('\n').length;
  return h('details', { class: 'large' },
    h('summary', {}, `payload: ${lines} lines, ${text.length.toLocaleString()} characters`), pre);
}

function chainLink(correlationId) {
  if (!correlationId) return h('span', { class: 'muted' }, '—');
  return h('a', { href: '/chains/' + encodeURIComponent(correlationId), class: 'mono', title: 'The workflow ' + correlationId }, short(correlationId));
}

function short(id) {
  return id.length > 14 ? id.slice(0, 8) + '…' + id.slice(-4) : id;
}

// A table; at a phone's width each row shows as a card, each cell with its header.
function table(headers, rows, attrs) {
  for (const row of rows) {
    [...row.children].forEach((cell, i) => {
      if (headers[i]) cell.dataset.label = headers[i];
    });
  }
  return h('div', { class: 'scroll' },
    h('table', Object.assign({ class: 'cards' }, attrs || {}),
      h('thead', {}, h('tr', {}, headers.map((x) => h('th', { scope: 'col' }, x)))),
      h('tbody', {}, rows)));
}

function confirmAction(text, button) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = text;
  document.getElementById('confirm-ok').textContent = button;
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.onclose = () => resolve(dialog.returnValue === 'ok');
    dialog.showModal();
  });
}

// ---------------------------------------------------------------- routing

let leave = () => {};

// Runs `f` every `ms` while the page shows and the tab is visible.
function every(ms, f) {
  const timer = setInterval(() => {
    if (!document.hidden) f();
  }, ms);
  const previous = leave;
  leave = () => {
    clearInterval(timer);
    previous();
  };
}

async function route() {
  leave();
  leave = () => {};
  const path = decodeURIComponent(location.pathname).replace(/\/+$/, '') || '/';
  const params = new URLSearchParams(location.search);
  const parts = path.split('/').filter(Boolean);
  const section = parts[0] || 'schemas';
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.section === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  try {
    if (parts.length === 0 || (parts[0] === 'schemas' && parts.length === 1)) await schemasPage();
    else if (parts[0] === 'schemas') await schemaPage(parts.slice(1).join('/'), params);
    else if (parts[0] === 'tail') tailPage(params);
    else if (parts[0] === 'groups' && parts.length === 1) await groupsPage();
    else if (parts[0] === 'groups' && parts[parts.length - 1] === 'dead-letters') await deadLettersPage(parts.slice(1, -1).join('/'));
    else if (parts[0] === 'groups') await groupPage(parts.slice(1).join('/'));
    else if (parts[0] === 'chains' && parts.length > 1) await chainPage(parts.slice(1).join('/'));
    else if (parts[0] === 'nodes' && parts.length === 1) await nodesPage();
    else render(h('h1', {}, 'Not found'), h('p', {}, 'No page at ' + path + '.'));
  } catch (error) {
    showError(error);
  }
}

function go(url, replace) {
  if (replace) history.replaceState(null, '', url);
  else history.pushState(null, '', url);
  route();
}

document.addEventListener('click', (event) => {
  const a = event.target.closest('a[href]');
  if (!a || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith('/api/') || a.target) return;
  event.preventDefault();
  if (url.pathname === location.pathname && url.search === location.search) {
    if (url.hash) location.hash = url.hash;
    return;
  }
  go(url.pathname + url.search);
});

window.addEventListener('popstate', route);

// ---------------------------------------------------------------- schemas

async function schemasPage() {
  title('Schemas');
  const schemas = await all('evmesh.v1.SchemaRegistry/ListSchemas', {}, 'schemas', (last) => ({ after_type: last.type }));
  const byType = new Map();
  for (const schema of schemas) {
    if (!byType.has(schema.type)) byType.set(schema.type, []);
    byType.get(schema.type).push(schema);
  }
  const rows = [...byType].map(([type, versions]) => {
    const latest = versions[versions.length - 1];
    return h('tr', { dataset: { type } },
      h('td', {}, h('a', { href: '/schemas/' + encodeURIComponent(type) }, type)),
      h('td', { class: 'versions' }, h('span', { class: 'tags' }, versions.map((v) => h('a', { href: `/schemas/${encodeURIComponent(type)}?version=${v.version}`, class: 'tag' }, v.version)))),
      h('td', { class: 'mono' }, latest.message_name),
      h('td', {}, when(latest.registered_at)));
  });
  render(
    h('h1', {}, 'Schemas'),
    h('p', { class: 'muted' }, `${byType.size} event types, ${schemas.length} versions.`),
    byType.size === 0
      ? h('p', {}, 'No schema is registered yet: ', h('code', {}, 'evmesh schema register FILE.proto --type TYPE --message MESSAGE'), '.')
      : table(['Event type', 'Versions', 'Payload message', 'Latest registered'], rows, { id: 'schemas' }));
}

async function schemaPage(type, params) {
  title(type);
  const versions = await all('evmesh.v1.SchemaRegistry/ListSchemas', { type }, 'schemas', (last) => ({ after_type: last.type }));
  if (versions.length === 0) throw new ApiError('NOT_FOUND', `no schema is registered for type ${type}`);
  const names = versions.map((v) => v.version);
  const [from, to] = (params.get('diff') || '').split('..');
  const focus = params.get('version');
  const diffBox = h('section', { id: 'diff', 'aria-labelledby': 'diff-title' });
  const pick = (id, label, chosen) => h('label', {}, label + ' ',
    h('select', { id }, names.map((n) => h('option', { value: n, selected: n === chosen }, n))));
  const defaultFrom = from || names[Math.max(0, names.length - 2)];
  const defaultTo = to || names[names.length - 1];
  const rows = versions.map((v) => {
    const source = h('div', { class: 'source' });
    const details = h('details', { open: v.version === focus, dataset: { version: v.version } },
      h('summary', {}, h('strong', {}, v.version), ' · ', h('span', { class: 'mono' }, v.message_name), ' · registered ', when(v.registered_at)),
      source);
    const load = async () => {
      if (source.dataset.loaded) return;
      source.dataset.loaded = '1';
      try {
        const schema = await api('evmesh.v1.SchemaRegistry/GetSchema', { type, version: v.version });
        source.replaceChildren(...(schema.files || []).map((f) =>
          h('figure', {}, h('figcaption', { class: 'mono' }, f.name), h('pre', { class: 'proto' }, f.source))));
      } catch (error) {
        showError(error, source);
      }
    };
    details.addEventListener('toggle', () => details.open && load());
    if (details.open) load();
    return details;
  });
  render(
    h('p', { class: 'crumbs' }, h('a', { href: '/schemas' }, 'Schemas'), ' / '),
    h('h1', { class: 'mono' }, type),
    h('section', { 'aria-labelledby': 'versions-title' }, h('h2', { id: 'versions-title' }, 'Versions'), rows),
    h('section', {},
      h('h2', { id: 'diff-title' }, 'Compare two versions'),
      names.length < 2
        ? h('p', { class: 'muted' }, 'One version only: nothing to compare yet.')
        : h('form', {
          class: 'inline', id: 'diff-form', onsubmit: (event) => {
            event.preventDefault();
            const a = document.getElementById('diff-from').value;
            const b = document.getElementById('diff-to').value;
            go(`/schemas/${encodeURIComponent(type)}?diff=${a}..${b}`);
          },
        }, pick('diff-from', 'From', defaultFrom), pick('diff-to', 'to', defaultTo), h('button', { type: 'submit' }, 'Compare')),
      diffBox));
  if (names.length >= 2) await showDiff(type, defaultFrom, defaultTo, diffBox);
  if (params.get('diff')) diffBox.scrollIntoView();
}

const BUMP = { BUMP_NONE: 'NONE', BUMP_PATCH: 'PATCH', BUMP_MINOR: 'MINOR', BUMP_MAJOR: 'MAJOR' };

async function showDiff(type, from, to, box) {
  if (from === to) {
    box.replaceChildren(h('p', { class: 'muted' }, 'The same version on both sides.'));
    return;
  }
  try {
    const [older, newer] = semverLess(from, to) ? [from, to] : [to, from];
    const verdict = await api('evmesh.v1.SchemaRegistry/CompareSchemas', { type, from_version: older, to_version: newer });
    const need = BUMP[verdict.required_bump] || verdict.required_bump;
    const declared = BUMP[verdict.declared_bump] || verdict.declared_bump;
    const changes = verdict.changes.map((c) => h('tr', { dataset: { rule: c.rule } },
      h('td', {}, h('span', { class: 'bump ' + (BUMP[c.needs] || '').toLowerCase() }, BUMP[c.needs] || c.needs)),
      h('td', { class: 'mono' }, c.rule),
      h('td', { class: 'mono' }, c.path),
      h('td', {}, c.message)));
    const texts = await Promise.all([older, newer].map((v) =>
      api('evmesh.v1.SchemaRegistry/GetSchema', { type, version: v }).then((schema) => (schema.files || [])[0] || { name: '', source: '' })));
    box.replaceChildren();
    append(box, [
      h('div', { class: 'verdict ' + (verdict.compatible ? 'ok' : 'bad'), id: 'verdict', dataset: { required: need, declared } },
        h('span', {}, `${older} → ${newer}: `),
        h('span', {}, 'the changes need '), h('span', { class: 'bump ' + need.toLowerCase() }, need),
        h('span', {}, '; the step declares '), h('span', { class: 'bump ' + declared.toLowerCase() }, declared),
        h('strong', {}, verdict.compatible ? ' — allowed' : ' — not allowed: the version is too small for its changes')),
      verdict.changes.length === 0
        ? h('p', { class: 'muted' }, 'No change that the checker sees.')
        : table(['Needs', 'Rule', 'Path', 'Change'], changes, { id: 'changes' }),
      verdict.omitted_changes ? h('p', { class: 'muted' }, `and ${verdict.omitted_changes} more changes.`) : null,
      h('h3', {}, 'Source'),
      lineDiff(texts[0].source, texts[1].source, `${texts[0].name} ${older}`, `${texts[1].name} ${newer}`)]);
  } catch (error) {
    showError(error, box);
  }
}

function semverLess(a, b) {
  const parse = (v) => v.split(/[.+-]/).slice(0, 3).map(Number);
  const [x, y] = [parse(a), parse(b)];
  for (let i = 0; i < 3; i++) if (x[i] !== y[i]) return x[i] < y[i];
  return a < b;
}

// A unified line diff of two texts (a longest common subsequence of lines).
function lineDiff(a, b, nameA, nameB) {
  const x = a.split('\n');
  const y = b.split('\n');
  if (x.length * y.length > 4_000_000) return h('p', { class: 'muted' }, 'The files are too large to diff here.');
  const n = x.length;
  const m = y.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = x[i] === y[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const lines = [];
  let i = 0;
  let j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && x[i] === y[j]) {
      lines.push(h('span', { class: 'same' }, '  ' + x[i] + '\n'));
      i++;
      j++;
    } else if (j < m && (i === n || lcs[i][j + 1] >= lcs[i + 1][j])) {
      lines.push(h('ins', {}, '+ ' + y[j] + '\n'));
      j++;
    } else {
      lines.push(h('del', {}, '- ' + x[i] + '\n'));
      i++;
    }
  }
  return h('figure', {}, h('figcaption', { class: 'mono' }, `--- ${nameA}   +++ ${nameB}`), h('pre', { class: 'diff' }, lines));
}

// ---------------------------------------------------------------- tail

const TAIL_ROWS = 500;

function tailPage(params) {
  title('Tail');
  const patterns = params.getAll('pattern');
  const input = h('input', { id: 'tail-patterns', value: patterns.join(' ') || 'shop.>', placeholder: 'shop.> orders.*.created@^1', spellcheck: 'false', 'aria-describedby': 'tail-help' });
  const status = h('p', { id: 'tail-status', class: 'muted', dataset: { state: 'stopped' }, 'aria-live': 'polite' }, 'Not listening.');
  const counts = h('p', { id: 'tail-counts', class: 'muted' });
  const list = h('ol', { id: 'tail-events', class: 'events', reversed: true });
  const pause = h('button', { type: 'button', id: 'tail-pause', disabled: true }, 'Pause');
  const state = { received: 0, dropped: 0, held: [], heldDropped: 0, paused: false, abort: null };
  const showCounts = () => {
    counts.textContent = `${number(state.received)} received · ${number(state.dropped)} dropped by the node for this page being slow` +
      (state.paused ? ` · paused: ${number(state.held.length)} held, ${number(state.heldDropped)} dropped` : '');
  };
  const show = (delivery) => {
    list.prepend(eventItem(delivery.event, delivery.sequence));
    while (list.children.length > TAIL_ROWS) list.lastChild.remove();
  };
  const stop = () => {
    if (state.abort) state.abort.abort();
    state.abort = null;
  };
  const start = async () => {
    stop();
    const wanted = input.value.split(/[\s,]+/).filter(Boolean);
    if (wanted.length === 0) {
      status.textContent = 'Type at least one pattern, e.g. shop.>';
      return;
    }
    history.replaceState(null, '', '/tail?' + wanted.map((p) => 'pattern=' + encodeURIComponent(p)).join('&'));
    const abort = new AbortController();
    state.abort = abort;
    status.dataset.state = 'opening';
    status.textContent = 'Opening…';
    pause.disabled = false;
    try {
      let response;
      for (;;) {
        response = await fetch('/api/evmesh.v1.Mesh/Subscribe', {
          method: 'POST',
          headers: headers(),
          body: JSON.stringify({ open: { patterns: wanted, auto_ack: true, start: { latest: {} } } }),
          signal: abort.signal,
        });
        if (response.ok) break;
        const error = await failure(response);
        if (error.code === 'UNAUTHENTICATED' && (await login(error.message))) continue;
        throw error;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf('\n')) >= 0) {
          const line = JSON.parse(buffer.slice(0, newline));
          buffer = buffer.slice(newline + 1);
          if (line.subscribed) {
            status.dataset.state = 'listening';
            status.textContent = 'Listening for ' + wanted.join(', ') + ' (events from now on).';
          } else if (line.delivery) {
            state.received++;
            if (!state.paused) show(line.delivery);
            else if (state.held.length < TAIL_ROWS) state.held.push(line.delivery);
            else state.heldDropped++;
          } else if (line.dropped !== undefined) {
            state.dropped = Number(line.dropped);
          } else if (line.error) {
            throw new ApiError(line.error.code, line.error.message);
          }
        }
        showCounts();
      }
      status.dataset.state = 'stopped';
      status.textContent = 'The node ended the tail.';
    } catch (error) {
      if (abort.signal.aborted) {
        status.dataset.state = 'stopped';
        status.textContent = 'Stopped.';
      } else {
        status.dataset.state = 'failed';
        showError(error, status);
      }
    }
    pause.disabled = true;
  };
  pause.addEventListener('click', () => {
    state.paused = !state.paused;
    pause.textContent = state.paused ? 'Resume' : 'Pause';
    pause.setAttribute('aria-pressed', String(state.paused));
    if (!state.paused) {
      state.held.forEach(show);
      state.held = [];
      state.heldDropped = 0;
    }
    showCounts();
  });
  render(
    h('h1', {}, 'Tail'),
    h('form', {
      class: 'inline', id: 'tail-form', onsubmit: (event) => {
        event.preventDefault();
        start();
      },
    },
    h('label', { for: 'tail-patterns' }, 'Patterns'), input,
    h('button', { type: 'submit', class: 'primary' }, 'Listen'),
    h('button', { type: 'button', onclick: () => stop() }, 'Stop'),
    pause,
    h('button', { type: 'button', onclick: () => list.replaceChildren() }, 'Clear')),
    h('p', { id: 'tail-help', class: 'muted small' }, '* matches one token, > the rest; @^1 asks for schema versions. Payloads show as JSON through their schema. A page that cannot keep up drops events (and counts them) rather than slow the node.'),
    status, counts, list);
  showCounts();
  leave = stop;
  if (patterns.length) start();
}

// One event: its envelope in a line, its payload and the rest on opening.
function eventItem(event, sequence, extra) {
  return h('li', { class: 'event', dataset: { id: event.id, type: event.type } },
    h('details', {},
      h('summary', {},
        h('span', { class: 'seq mono' }, '#' + sequence), ' ',
        h('strong', { class: 'mono' }, event.type), ' ',
        h('span', { class: 'muted' }, 'from ', event.source || '—'), ' ',
        when(event.occurred_at), ' ',
        h('span', { class: 'muted' }, 'chain '), chainLink(event.correlation_id),
        extra || null),
      envelope(event)));
}

function envelope(event) {
  const fields = [
    ['id', event.id], ['type', event.type], ['schema_version', event.schema_version],
    ['source', event.source], ['aggregate_id', event.aggregate_id],
    ['correlation_id', event.correlation_id], ['causation_id', event.causation_id],
  ];
  return h('div', { class: 'envelope' },
    h('dl', {}, fields.map(([k, v]) => [h('dt', {}, k), h('dd', { class: 'mono' }, v || '—')]),
      h('dt', {}, 'occurred_at'), h('dd', {}, when(event.occurred_at)),
      Object.keys(event.headers || {}).length ? [h('dt', {}, 'headers'), h('dd', {}, json(event.headers))] : null),
    h('div', { class: 'payload' }, h('h4', {}, 'Payload'), json(event.payload)));
}

// ---------------------------------------------------------------- groups

async function listGroups() {
  return all('evmesh.v1.Mesh/ListGroups', {}, 'groups', (last) => ({ after_group: last.name }));
}

async function groupsPage() {
  title('Groups');
  const body = h('div', {});
  const updated = h('p', { class: 'muted small', 'aria-live': 'off' });
  const draw = async () => {
    try {
      const groups = await listGroups();
      const rows = groups.map((g) => h('tr', { dataset: { group: g.name } },
        h('td', {}, h('a', { href: '/groups/' + encodeURIComponent(g.name) }, g.name)),
        h('td', {}, h('span', { class: 'tags' }, g.patterns.map((p) => h('span', { class: 'tag' }, p)))),
        h('td', { class: 'num', dataset: { field: 'lag' } }, number(g.lag)),
        h('td', { class: 'num', dataset: { field: 'pending' } }, number(g.pending)),
        h('td', { class: 'num', dataset: { field: 'dead_letters' } }, Number(g.dead_letters) > 0
          ? h('a', { href: `/groups/${encodeURIComponent(g.name)}/dead-letters`, class: 'warn' }, number(g.dead_letters))
          : '0'),
        h('td', { class: 'num', dataset: { field: 'members' } }, number(g.members)),
        h('td', { class: 'num', dataset: { field: 'oldest' } }, age(g.oldest_unacked_age))));
      body.replaceChildren(groups.length === 0
        ? h('p', {}, 'No durable group yet: a subscriber with a group name makes one.')
        : table(['Group', 'Patterns', 'Lag', 'Pending', 'Dead letters', 'Members', 'Oldest unacked'], rows, { id: 'groups' }));
      updated.textContent = 'Updated ' + new Date().toLocaleTimeString() + ' · refreshes every 2 s';
    } catch (error) {
      showError(error, body);
    }
  };
  render(h('h1', {}, 'Groups'), updated, body);
  every(2000, draw);
  await draw();
}

async function findGroup(name) {
  const groups = await listGroups();
  const group = groups.find((g) => g.name === name);
  if (!group) throw new ApiError('NOT_FOUND', `no group ${name} (or not one you may see)`);
  return group;
}

async function groupPage(name) {
  title(name);
  const detail = h('div', {});
  const result = h('div', { id: 'seek-result' });
  const draw = async () => {
    try {
      const g = await findGroup(name);
      const rows = [
        ['Patterns', h('span', { class: 'mono' }, g.patterns.join(' '))],
        ['Lag', number(g.lag)], ['Pending', number(g.pending)],
        ['Dead letters', h('a', { href: `/groups/${encodeURIComponent(name)}/dead-letters` }, number(g.dead_letters))],
        ['Members', number(g.members)], ['Oldest unacked', age(g.oldest_unacked_age)],
        ['Ack floor', '#' + g.ack_floor], ['Head of the log', '#' + g.head_sequence],
        ['Ack timeout', age(g.ack_timeout)], ['Max deliveries', g.max_deliveries],
        ['Skipped by retention', number(g.skipped)],
      ];
      detail.replaceChildren(h('dl', { class: 'facts', id: 'group-facts' }, rows.map(([k, v]) => [h('dt', {}, k), h('dd', { dataset: { fact: k } }, v)])));
    } catch (error) {
      showError(error, detail);
    }
  };
  const where = h('select', { id: 'seek-to' }, ['earliest', 'latest', 'sequence', 'time'].map((v) => h('option', { value: v }, v)));
  const value = h('input', { id: 'seek-value', placeholder: 'a sequence, or a time like 2026-12-06T10:00:00Z', disabled: true });
  where.addEventListener('change', () => {
    value.disabled = !['sequence', 'time'].includes(where.value);
  });
  const seek = async (event) => {
    event.preventDefault();
    let position;
    if (where.value === 'earliest') position = { earliest: {} };
    else if (where.value === 'latest') position = { latest: {} };
    else if (where.value === 'sequence') position = { sequence: value.value.trim() };
    else {
      const t = new Date(value.value.trim());
      if (isNaN(t)) return showError(new ApiError('INVALID_ARGUMENT', 'not a time: ' + value.value), result);
      position = { time: t.toISOString() };
    }
    const target = where.value + (value.disabled ? '' : ' ' + value.value.trim());
    if (!(await confirmAction(`Move ${name} to ${target}? Deliveries in flight are forgotten; events before it are skipped, or after it delivered again.`, 'Seek'))) return;
    try {
      const answer = await api('evmesh.v1.Mesh/SeekGroup', { group: name, position });
      result.replaceChildren(h('p', { class: 'ok' }, `Moved: the ack floor is now #${answer.group.ack_floor}, lag ${number(answer.group.lag)}.`));
      draw();
    } catch (error) {
      showError(error, result);
    }
  };
  render(
    h('p', { class: 'crumbs' }, h('a', { href: '/groups' }, 'Groups'), ' / '),
    h('h1', {}, name), detail,
    h('h2', {}, 'Seek'),
    h('form', { class: 'inline', onsubmit: seek }, h('label', { for: 'seek-to' }, 'Move to'), where, value, h('button', { type: 'submit' }, 'Seek…')),
    result);
  every(2000, draw);
  await draw();
}

async function deadLettersPage(name) {
  title(name + ' · dead letters');
  const body = h('div', {});
  const result = h('div', { id: 'dlq-result', 'aria-live': 'polite' });
  const draw = async () => {
    const letters = await all('evmesh.v1.Mesh/ListDeadLetters', { group: name }, 'dead_letters', (last) => ({ after_sequence: last.sequence }));
    const selected = new Set();
    const act = async (action, sequences) => {
      const what = sequences.length ? `${sequences.length} dead letter${sequences.length > 1 ? 's' : ''}` : `all of ${name}'s dead letters`;
      const text = action === 'Redrive'
        ? `Redrive ${what}? Each goes back to ${name} for delivery, at attempt 1.`
        : `Purge ${what}? They are deleted for good.`;
      if (!(await confirmAction(text, action))) return;
      try {
        const method = action === 'Redrive' ? 'RedriveDeadLetters' : 'PurgeDeadLetters';
        const answer = await api('evmesh.v1.Mesh/' + method, { group: name, sequences });
        const n = answer.redriven !== undefined ? answer.redriven : answer.purged;
        result.replaceChildren(h('p', { class: 'ok' }, `${action === 'Redrive' ? 'Redriven' : 'Purged'}: ${number(n)}.`));
        toast(`${action === 'Redrive' ? 'Redriven' : 'Purged'}: ${number(n)}`);
        await draw();
      } catch (error) {
        showError(error, result);
      }
    };
    const rows = letters.map((d) => {
      const box = h('input', { type: 'checkbox', 'aria-label': 'Select #' + d.sequence });
      box.addEventListener('change', () => (box.checked ? selected.add(d.sequence) : selected.delete(d.sequence)));
      const event = d.event;
      return h('tr', { dataset: { sequence: d.sequence } },
        h('td', {}, box),
        h('td', { class: 'mono' }, '#' + d.sequence),
        h('td', { class: 'num' }, d.attempts),
        h('td', { class: 'reason' }, d.reason || h('span', { class: 'muted' }, 'no reason given')),
        h('td', {}, when(d.dead_at)),
        h('td', {}, d.event_deleted || !event
          ? h('span', { class: 'warn' }, 'the event is gone: retention deleted it')
          : [h('div', {}, h('strong', { class: 'mono' }, event.type), ' ', h('span', { class: 'muted' }, 'chain '), chainLink(event.correlation_id)),
            h('details', {}, h('summary', {}, 'envelope and payload'), envelope(event))]),
        h('td', {}, h('button', { type: 'button', onclick: () => act('Redrive', [d.sequence]) }, 'Redrive'), ' ',
          h('button', { type: 'button', class: 'danger', onclick: () => act('Purge', [d.sequence]) }, 'Purge')));
    });
    body.replaceChildren(
      h('div', { class: 'actions' },
        h('button', { type: 'button', disabled: !letters.length, onclick: () => act('Redrive', [...selected]), id: 'redrive-selected' }, 'Redrive selected'),
        h('button', { type: 'button', disabled: !letters.length, onclick: () => act('Purge', [...selected]), class: 'danger' }, 'Purge selected'),
        h('button', { type: 'button', disabled: !letters.length, onclick: () => act('Redrive', []), id: 'redrive-all' }, 'Redrive all'),
        h('button', { type: 'button', disabled: !letters.length, onclick: () => act('Purge', []), class: 'danger', id: 'purge-all' }, 'Purge all')),
      letters.length === 0
        ? h('p', { id: 'no-dead-letters' }, 'No dead letters.')
        : table(['', 'Sequence', 'Attempts', 'Last reason', 'Dead since', 'Event', ''], rows, { id: 'dead-letters' }));
  };
  render(
    h('p', { class: 'crumbs' }, h('a', { href: '/groups' }, 'Groups'), ' / ', h('a', { href: '/groups/' + encodeURIComponent(name) }, name), ' / '),
    h('h1', {}, 'Dead letters of ', name), result, body);
  await draw();
}

// ---------------------------------------------------------------- nodes

async function nodesPage() {
  title('Nodes');
  const body = h('div', {});
  const draw = async () => {
    try {
      const answer = await api('evmesh.v1.Mesh/ListNodes', {});
      const rows = answer.nodes.map((n) => h('tr', { dataset: { node: n.name } },
        h('td', {}, h('strong', {}, n.name), n.this_node ? h('span', { class: 'muted' }, ' (this node)') : null),
        h('td', { class: 'mono' }, n.address),
        h('td', {}, when(n.started_at)),
        h('td', {}, when(n.seen_at)),
        h('td', {}, h('span', { class: 'tags' }, n.groups.map((g) => h('a', {
          href: '/groups/' + encodeURIComponent(g.name),
          class: 'tag',
          title: (g.owner ? 'owned here: its dispatcher runs on this node; ' : '') + `${g.members} member(s) joined here`,
        }, g.name + (g.owner ? ' ★' : '')))))));
      body.replaceChildren(table(['Node', 'Address', 'Started', 'Last seen', 'Groups (★ owned here)'], rows, { id: 'nodes' }));
    } catch (error) {
      showError(error, body);
    }
  };
  render(h('h1', {}, 'Nodes'),
    h('p', { class: 'muted small' }, 'The nodes on this storage that announced themselves in the last 10 s; refreshes every 2 s.'),
    body);
  every(2000, draw);
  await draw();
}

// ---------------------------------------------------------------- chains

async function chainPage(correlationId) {
  title('Chain ' + short(correlationId));
  const events = await all('evmesh.v1.Mesh/GetChain', { correlation_id: correlationId }, 'events', (last) => ({ after_sequence: last.sequence }));
  if (events.length === 0) throw new ApiError('NOT_FOUND', `no events with correlation id ${correlationId} (or none you may read)`);
  // The causation tree: an event whose cause is in the chain hangs under it.
  const byId = new Map(events.map((c) => [c.event.id, { chain: c, children: [], depth: 0 }]));
  const roots = [];
  for (const node of byId.values()) {
    const parent = byId.get(node.chain.event.causation_id);
    if (parent && parent !== node) parent.children.push(node);
    else roots.push(node);
  }
  const ordered = [];
  const walk = (node, depth) => {
    node.depth = depth;
    ordered.push(node);
    node.children.sort((a, b) => Number(a.chain.sequence) - Number(b.chain.sequence)).forEach((c) => walk(c, depth + 1));
  };
  roots.sort((a, b) => Number(a.chain.sequence) - Number(b.chain.sequence)).forEach((r) => walk(r, 0));
  const time = (node) => new Date(node.chain.event.occurred_at || 0).getTime();
  const times = ordered.map(time);
  const start = Math.min(...times);
  const span = Math.max(1, Math.max(...times) - start);
  const parents = new Map();
  for (const node of ordered) for (const child of node.children) parents.set(child, node);

  const detail = h('div', { id: 'chain-detail' });
  const open = (node, row) => {
    for (const r of document.querySelectorAll('.waterfall .row[aria-expanded="true"]')) r.setAttribute('aria-expanded', 'false');
    row.setAttribute('aria-expanded', 'true');
    const e = node.chain.event;
    detail.replaceChildren(h('h3', {}, '#' + node.chain.sequence + ' ', h('span', { class: 'mono' }, e.type)), envelope(e));
  };
  const rows = ordered.map((node) => {
    const e = node.chain.event;
    const parent = parents.get(node);
    const at = (time(node) - start) / span;
    const from = parent ? (time(parent) - start) / span : at;
    const bar = h('span', { class: 'bar', title: parent ? `${time(node) - time(parent)} ms after its cause` : 'the start of the workflow' });
    bar.style.left = (Math.min(from, at) * 100).toFixed(3) + '%';
    bar.style.width = (Math.abs(at - from) * 100).toFixed(3) + '%';
    const dot = h('span', { class: 'dot' });
    dot.style.left = (at * 100).toFixed(3) + '%';
    const label = h('span', { class: 'label' },
      h('strong', { class: 'mono' }, e.type), ' ', h('span', { class: 'muted' }, e.source || '—'));
    label.style.paddingLeft = (node.depth * 1.1).toFixed(1) + 'em';
    const row = h('button', { type: 'button', class: 'row', 'aria-expanded': 'false', dataset: { type: e.type, id: e.id, depth: node.depth } },
      label,
      h('span', { class: 'track' }, bar, dot),
      h('span', { class: 'offset mono' }, '+' + (time(node) - start) + ' ms'));
    row.addEventListener('click', () => open(node, row));
    return row;
  });
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => {
    const t = h('span', { class: 'tick' }, Math.round(f * span) + ' ms');
    t.style.left = (f * 100) + '%';
    return t;
  });
  const tree = (nodes) => h('ul', {}, nodes.map((node) => {
    const e = node.chain.event;
    return h('li', { dataset: { type: e.type } },
      h('a', { href: '#', onclick: (event) => {
        event.preventDefault();
        const row = document.querySelector(`.waterfall .row[data-id="${CSS.escape(e.id)}"]`);
        open(node, row);
        row.focus();
      } }, h('span', { class: 'seq mono' }, '#' + node.chain.sequence), ' ', h('strong', { class: 'mono' }, e.type)),
      ' ', h('span', { class: 'muted' }, e.source || '—'), ' ', when(e.occurred_at),
      node.children.length ? tree(node.children) : null);
  }));
  render(
    h('p', { class: 'crumbs' }, 'Chain'),
    h('h1', { class: 'mono break' }, correlationId),
    h('p', { class: 'muted' }, `${events.length} events, ${span} ms from the first to the last, started `, when(ordered[0].chain.event.occurred_at), '.'),
    h('section', { 'aria-labelledby': 'timeline-title' },
      h('h2', { id: 'timeline-title' }, 'Timeline'),
      h('div', { class: 'waterfall', id: 'timeline' },
        h('div', { class: 'axis', 'aria-hidden': 'true' }, h('span', { class: 'label' }), h('span', { class: 'track' }, ticks), h('span', { class: 'offset' })),
        rows)),
    detail,
    h('section', { 'aria-labelledby': 'tree-title' }, h('h2', { id: 'tree-title' }, 'Causation tree'), h('div', { class: 'tree', id: 'tree' }, tree(roots))));
}

// ---------------------------------------------------------------- the frame

const THEMES = ['auto', 'dark', 'light'];

const systemDark = window.matchMedia('(prefers-color-scheme: dark)');

// `theme`: auto (the system's, followed as it changes), dark or light.
function applyTheme(theme) {
  const dark = theme === 'dark' || (theme === 'auto' && systemDark.matches);
  document.documentElement.dataset.theme = dark ? 'dark' : 'light';
  const button = document.getElementById('theme');
  if (!button) return;
  button.textContent = 'Theme: ' + theme;
  button.title = theme === 'auto' ? 'Theme: follows the system' : 'Theme: ' + theme;
}

const chosenTheme = () => localStorage.getItem('evmesh.theme') || 'auto';
applyTheme(chosenTheme());
systemDark.addEventListener('change', () => applyTheme(chosenTheme()));

document.addEventListener('DOMContentLoaded', () => {
  applyTheme(chosenTheme());
  document.getElementById('theme').addEventListener('click', () => {
    const now = chosenTheme();
    const next = THEMES[(THEMES.indexOf(now) + 1) % THEMES.length];
    localStorage.setItem('evmesh.theme', next);
    applyTheme(next);
  });
  const tokenButton = document.getElementById('token');
  tokenButton.hidden = !token();
  tokenButton.addEventListener('click', async () => {
    sessionStorage.removeItem(TOKEN_KEY);
    tokenButton.hidden = true;
    route();
  });
  tokenButton.title = 'Forget the token and ask again';
  document.getElementById('lookup').addEventListener('submit', (event) => {
    event.preventDefault();
    const id = document.getElementById('lookup-id').value.trim();
    if (id) go('/chains/' + encodeURIComponent(id));
  });
  // "/" goes to the chain lookup, as in many consoles.
  document.addEventListener('keydown', (event) => {
    if (event.key === '/' && !['INPUT', 'SELECT', 'TEXTAREA'].includes(document.activeElement.tagName)) {
      event.preventDefault();
      document.getElementById('lookup-id').focus();
    }
  });
  route();
});
