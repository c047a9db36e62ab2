// Drives the evmesh console in headless Chromium (Debian's /usr/bin/chromium) with
// playwright-core, for examples/shop/tests/console.rs, which starts the node, fills
// it, and answers this script's requests on stdin:
//
//   node console.cjs pages|auth
//
// Environment: CONSOLE_URL (the node's HTTP listener), and for `pages`
// CORRELATION_ID (the shop's workflow), GROUP (a group with one dead letter),
// DIFF_TYPE (a type at 1.0.0 and 2.0.0, the second deleting a field); for `auth`
// TOKEN. With SHOTS=DIR, each page is saved at a desktop and a phone width.
//
// Protocol: this script prints `publish TYPE`; the test publishes an event of TYPE
// and answers `published ID`. Exit status 0: every check held.
'use strict';

const { chromium } = require('playwright-core');
const readline = require('readline');
const path = require('path');

const base = process.env.CONSOLE_URL;
const scenario = process.argv[2];
const shots = process.env.SHOTS || '';
const WAIT = 20000;

const answers = [];
const waiting = [];
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (waiting.length) waiting.shift()(line);
  else answers.push(line);
});
function answer() {
  return answers.length ? Promise.resolve(answers.shift()) : new Promise((resolve) => waiting.push(resolve));
}

async function publish(type, large) {
  console.log('publish ' + type + (large ? ' large' : ''));
  const line = await answer();
  const id = line.replace(/^published /, '');
  if (!id || id === line) throw new Error('the test answered ' + JSON.stringify(line));
  return id;
}

function check(condition, what) {
  if (!condition) throw new Error('check failed: ' + what);
  console.log('ok: ' + what);
}

async function text(page, selector) {
  const el = page.locator(selector).first();
  await el.waitFor({ timeout: WAIT });
  return (await el.innerText()).trim();
}

async function shot(page, name) {
  if (!shots) return;
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: path.join(shots, name + '.png'), fullPage: true });
}

async function launch() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
}

// Fails on anything the page reports as broken, and on any request off the node.
function watch(page, label) {
  page.on('pageerror', (e) => {
    console.error(`${label}: page error: ${e.message}`);
    process.exitCode = 1;
  });
  page.on('console', (m) => {
    if (m.type() === 'error' && !/the server responded with a status of (401|403|404)/.test(m.text())) {
      console.error(`${label}: console error: ${m.text()}`);
      process.exitCode = 1;
    }
  });
  page.on('request', (r) => {
    if (!r.url().startsWith(base) && !r.url().startsWith('data:')) {
      console.error(`${label}: a request off the node: ${r.url()}`);
      process.exitCode = 1;
    }
  });
}

// What the page showed when a check failed, for the log.
let current = null;

async function pages(browser) {
  const correlation = process.env.CORRELATION_ID;
  const group = process.env.GROUP;
  const diffType = process.env.DIFF_TYPE;
  const desktop = await browser.newContext({ viewport: { width: 1280, height: 860 }, timezoneId: 'Asia/Tokyo', colorScheme: 'light' });
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2, timezoneId: 'America/New_York', colorScheme: 'dark' });
  const page = await desktop.newPage();
  current = page;
  const small = await phone.newPage();
  watch(page, 'desktop');
  watch(small, 'phone');
  const both = async (url, ready, name) => {
    await page.goto(base + url);
    await page.locator(ready).first().waitFor({ timeout: WAIT });
    await shot(page, name + '-desktop');
    if (shots) {
      await small.goto(base + url);
      await small.locator(ready).first().waitFor({ timeout: WAIT });
      await shot(small, name + '-phone');
    }
  };

  // Schemas: every type with its versions.
  await both('/', '#schemas', 'schemas');
  const types = await page.locator('#schemas tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.type));
  for (const t of ['shop.order.placed', 'shop.payment.succeeded', 'shop.inventory.reserved', 'shop.shipment.scheduled', diffType]) {
    check(types.includes(t), `/schemas lists ${t}`);
  }
  const versions = await text(page, `#schemas tr[data-type="${diffType}"] .versions`);
  check(versions.includes('1.0.0') && versions.includes('2.0.0'), `${diffType} shows versions 1.0.0 and 2.0.0`);
  const title = await page.locator('#schemas time').first().getAttribute('title');
  check(title.includes('Asia/Tokyo'), 'times are in the viewer\'s zone, the exact timestamp on hover: ' + title);

  // A schema's diff: the deleted field is MAJOR, with its rule and path.
  await both(`/schemas/${diffType}?diff=1.0.0..2.0.0`, '#verdict', 'schema-diff');
  const verdict = page.locator('#verdict');
  check((await verdict.getAttribute('data-required')) === 'MAJOR', 'the diff 1.0.0..2.0.0 needs MAJOR');
  check((await verdict.getAttribute('data-declared')) === 'MAJOR', 'the step 1.0.0 -> 2.0.0 declares MAJOR');
  const changes = await page.locator('#changes tbody tr').evaluateAll((rows) => rows.map((r) => r.innerText));
  check(changes.some((c) => /MAJOR/.test(c) && /ItemChanged\.name/.test(c)), 'the deletion of ItemChanged.name is a MAJOR change: ' + JSON.stringify(changes));
  check(/^-\s+string name = 2;$/m.test(await text(page, 'pre.diff')), 'the source diff shows the deleted line');
  await page.locator('details[data-version="1.0.0"] summary').click();
  const source = await text(page, 'details[data-version="1.0.0"] pre.proto');
  check(source.includes('message ItemChanged {') && source.includes('string name = 2;'), 'version 1.0.0 shows its .proto source');
  // The compare form navigates to a shareable URL.
  await page.selectOption('#diff-from', '1.0.0');
  await page.selectOption('#diff-to', '1.0.0');
  await page.locator('#diff-form button').click();
  await page.waitForURL(/diff=1\.0\.0\.\.1\.0\.0/, { timeout: WAIT });
  check(true, 'the compare form gives the diff a URL of its own');

  // Groups, refreshing by themselves.
  await both('/groups', '#groups', 'groups');
  const groups = await page.locator('#groups tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.group));
  for (const g of ['payment', 'inventory', 'shipping', 'order-status', group]) check(groups.includes(g), `/groups lists ${g}`);
  check((await text(page, `#groups tr[data-group="${group}"] td[data-field="dead_letters"]`)) === '2', `${group} has two dead letters`);
  check((await text(page, `#groups tr[data-group="${group}"] td[data-field="members"]`)) === '1', `${group} has one member`);
  await page.locator(`#groups tr[data-group="${group}"] a`).first().click();
  await page.waitForURL(base + '/groups/' + group, { timeout: WAIT });
  await page.locator('#group-facts').waitFor({ timeout: WAIT });
  await shot(page, 'group-desktop');
  if (shots) {
    await small.goto(base + '/groups/' + group);
    await small.locator('#group-facts').waitFor({ timeout: WAIT });
    await shot(small, 'group-phone');
  }
  check((await text(page, '#group-facts dd[data-fact="Dead letters"]')) === '2', 'the group page shows its dead letters');
  // A seek, after a confirmation.
  await page.selectOption('#seek-to', 'latest');
  await page.locator('#seek-to ~ button').click();
  await page.locator('dialog#confirm').waitFor({ state: 'visible', timeout: WAIT });
  check((await page.locator('dialog#confirm').innerText()).includes(`Move ${group} to latest?`), 'seeking asks first');
  await page.locator('#confirm-ok').click();
  check((await text(page, '#seek-result')).startsWith('Moved: the ack floor is now #'), 'the group moved to the head of the log');

  // The nodes of the mesh: this one alone, with the groups it owns.
  await both('/nodes', '#nodes', 'nodes');
  const nodes = await page.locator('#nodes tbody tr').evaluateAll((rows) => rows.map((r) => r.innerText));
  check(nodes.length === 1 && nodes[0].includes('this node') && nodes[0].includes(group), 'the nodes page shows this node and the groups it serves: ' + JSON.stringify(nodes));

  // A chain: the shop's four events in causal order, as a timeline and a tree.
  await both('/chains/' + encodeURIComponent(correlation), '#timeline .row', 'chain');
  const rows = await page.locator('#timeline .row').evaluateAll((rs) => rs.map((r) => [r.dataset.type, Number(r.dataset.depth)]));
  check(JSON.stringify(rows) === JSON.stringify([
    ['shop.order.placed', 0], ['shop.payment.succeeded', 1], ['shop.inventory.reserved', 2], ['shop.shipment.scheduled', 3],
  ]), 'the timeline shows the four events in causal order, each under its cause: ' + JSON.stringify(rows));
  const nested = await page.locator('#tree li[data-type="shop.shipment.scheduled"]').evaluate((li) => {
    let depth = 0;
    for (let el = li.parentElement; el && el.id !== 'tree'; el = el.parentElement) if (el.tagName === 'LI') depth++;
    return depth;
  });
  check(nested === 3, 'the tree nests the shipment three causes deep');
  // Keyboard: a row takes focus and opens with Enter.
  await page.locator('#timeline .row').first().focus();
  await page.keyboard.press('Enter');
  const detail = await text(page, '#chain-detail');
  check(detail.includes('"order_id": "o-1"') && detail.includes('shop.order.placed'), 'an event opens to its envelope and payload');
  await shot(page, 'chain-open-desktop');

  // The tail: an event published after the page opened shows up, payload as JSON.
  await page.goto(base + '/tail?pattern=shop.order.>');
  if (shots) await small.goto(base + '/tail?pattern=shop.order.>');
  await page.locator('#tail-status[data-state="listening"]').waitFor({ timeout: WAIT });
  if (shots) await small.locator('#tail-status[data-state="listening"]').waitFor({ timeout: WAIT });
  const id = await publish('shop.order.placed');
  const item = page.locator(`#tail-events li[data-id="${id}"]`);
  await item.waitFor({ timeout: WAIT });
  await item.locator('summary .seq').click();
  const shown = await item.innerText();
  check(shown.includes('"customer": "grace"') && shown.includes('"total_cents": "1234"'), 'the tail shows the event published after it opened, payload through its schema');
  const link = await item.locator('a[href^="/chains/"]').getAttribute('href');
  check(link === '/chains/' + id, 'a tailed event links to its chain');
  // Paused, it holds what arrives; resumed, it shows it.
  await page.locator('#tail-pause').click();
  const held = await publish('shop.order.placed', true);
  await page.waitForFunction(() => /1 held/.test(document.getElementById('tail-counts').textContent), null, { timeout: WAIT });
  check(await page.locator(`#tail-events li[data-id="${held}"]`).count() === 0, 'a paused tail does not show new events');
  await page.locator('#tail-pause').click();
  const heldItem = page.locator(`#tail-events li[data-id="${held}"]`);
  await heldItem.waitFor({ timeout: WAIT });
  check(true, 'resumed, the tail shows what it held');
  await heldItem.locator('summary .seq').click();
  const large = heldItem.locator('details.large');
  check(await large.count() === 1 && !(await large.evaluate((d) => d.open)), 'a large payload starts collapsed');
  check((await large.locator('summary').innerText()).includes('characters'), 'a collapsed payload says how large it is');
  await shot(page, 'tail-desktop');
  if (shots) {
    await small.locator(`#tail-events li[data-id="${held}"]`).waitFor({ timeout: WAIT });
    await shot(small, 'tail-phone');
  }

  // Dead letters: redriven from the page, after a confirmation.
  await both(`/groups/${group}/dead-letters`, '#dead-letters', 'dead-letters');
  const reason = await text(page, '#dead-letters tbody tr td.reason');
  check(reason === 'the audit store is down', 'the dead letter shows its last reason');
  const sequences = await page.locator('#dead-letters tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.sequence));
  check(sequences.length === 2, 'both dead letters are listed');
  // Purge the second one, after a confirmation.
  await page.locator(`#dead-letters tr[data-sequence="${sequences[1]}"] button.danger`).click();
  await page.locator('dialog#confirm').waitFor({ state: 'visible', timeout: WAIT });
  check((await page.locator('dialog#confirm').innerText()).includes('Purge 1 dead letter?'), 'purging asks first');
  await page.locator('#confirm-ok').click();
  await page.locator(`#dead-letters tr[data-sequence="${sequences[1]}"]`).waitFor({ state: 'detached', timeout: WAIT });
  check((await text(page, '#dlq-result')).includes('Purged: 1'), 'the page says one dead letter was purged');
  await page.locator('#redrive-all').click();
  const dialog = page.locator('dialog#confirm');
  await dialog.waitFor({ state: 'visible', timeout: WAIT });
  check((await dialog.innerText()).includes('Redrive all of audit'), 'redriving asks first');
  await page.locator('#confirm-ok').click();
  await page.locator('#no-dead-letters').waitFor({ timeout: WAIT });
  check((await text(page, '#dlq-result')).includes('Redriven: 1'), 'the page says one dead letter was redriven');

  // Theme: the toggle switches to dark.
  const theme = () => page.evaluate(() => document.documentElement.dataset.theme);
  check((await theme()) === 'light', 'auto follows the system (light here)');
  await page.locator('#theme').click();
  check((await theme()) === 'dark', 'the theme toggle goes to dark');
  await page.locator('#theme').click();
  check((await theme()) === 'light', 'and then to light');
  await small.goto(base + '/groups');
  await small.locator('#groups').waitFor({ timeout: WAIT });
  check((await small.evaluate(() => document.documentElement.dataset.theme)) === 'dark', 'auto follows a dark system');
  // An unknown page says so.
  await page.goto(base + '/chains/no-such-workflow');
  check((await text(page, '[role="alert"]')).includes('NOT_FOUND'), 'an unknown chain says NOT_FOUND');
  await desktop.close();
  await phone.close();
}

async function auth(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  watch(page, 'auth');
  await page.goto(base + '/groups');
  const dialog = page.locator('dialog#login');
  await dialog.waitFor({ state: 'visible', timeout: WAIT });
  check(true, 'the console asks for a token');
  // The page refreshes by itself meanwhile: it asks once, not again.
  await page.waitForTimeout(2500);
  await page.fill('#login-token', 'evm_not-a-token-of-anyone');
  await page.locator('#login-form button[value="ok"]').click();
  await page.locator('#login-error:not([hidden])').waitFor({ timeout: WAIT });
  check((await text(page, '#login-error')).includes('refused'), 'a wrong token is refused, and the console asks again');
  await page.fill('#login-token', process.env.TOKEN);
  await page.locator('#login-form button[value="ok"]').click();
  await page.getByText('No durable group yet').waitFor({ timeout: WAIT });
  check(await page.locator('#token').isVisible(), 'with the token, the groups page shows, and the token can be forgotten');
  await page.goto(base + '/schemas');
  const refusal = await text(page, '[role="alert"]');
  check(refusal.includes('PERMISSION_DENIED') && refusal.includes('oncall'), 'the principal\'s rights hold: no registry access, so no schemas: ' + refusal);
  await page.goto(base + '/tail?pattern=orders.>');
  await page.locator('#tail-status[data-state="failed"]').waitFor({ timeout: WAIT });
  check((await text(page, '#tail-status')).includes('PERMISSION_DENIED'), 'a tail beyond the principal\'s subscribe rights is refused');
  await context.close();
}

(async () => {
  const browser = await launch();
  try {
    if (scenario === 'pages') await pages(browser);
    else if (scenario === 'auth') await auth(browser);
    else throw new Error('no scenario ' + scenario);
  } catch (error) {
    console.error(error.stack || String(error));
    if (current) {
      const shown = await current.evaluate(() => location.href + '\n' + document.getElementById('main').innerText).catch(() => '');
      console.error('the page showed: ' + shown);
    }
    process.exitCode = 1;
  } finally {
    await browser.close();
    process.stdin.destroy();
  }
})();
