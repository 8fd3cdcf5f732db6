// The console with 10,000 devices publishing and 50 tables in the lake: it stays live,
// lists every table, and reports how long each second's update takes to render.
// Started by tests/e2e/console.rs (`the_console_keeps_up_with_ten_thousand_devices_and_fifty_tables`).
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { env, open, load as startLoad, shot } from './harness.mjs';

const URL = env('SLUICE_URL');
const TABLES = Number(env('SLUICE_TABLES'));
const WAIT = 120_000;

let browser;
let page;
let load;
let problems;

before(async () => {
  ({ browser, page, problems } = await open());
  load = startLoad(['--devices', '10000', '--rate', '2000', '--connections', '20', '--seed', '11']);
});

after(async () => {
  if (load) load.kill('SIGTERM');
  if (browser) await browser.close();
});

test('with 10,000 devices and 50 tables the page stays live and lists every table', async () => {
  await page.goto(URL);
  await page.waitForSelector('#live[data-state="live"]', { timeout: WAIT });
  await page.waitForFunction((n) => document.querySelectorAll('#tables tbody tr').length >= n, TABLES, { timeout: WAIT });
  await page.reload();
  await page.waitForFunction((n) => document.querySelectorAll('#schema details').length >= n, TABLES, { timeout: WAIT });
  await page.waitForSelector('#live[data-state="live"]', { timeout: WAIT });
  // Twenty seconds of updates, then how long each took.
  await page.evaluate(() => performance.clearMeasures('sluice-render'));
  await page.waitForTimeout(20_000);
  const renders = await page.evaluate(() => performance.getEntriesByName('sluice-render').map((e) => e.duration));
  assert.ok(renders.length >= 10, `only ${renders.length} updates in 20 s`);
  renders.sort((a, b) => a - b);
  const at = (q) => renders[Math.min(renders.length - 1, Math.floor(q * renders.length))].toFixed(1);
  const overview = await page.evaluate(async () => (await (await fetch('/api/overview?range=1h')).text()).length);
  console.log(`console with ${TABLES}+ tables and 10,000 devices: ${renders.length} updates in 20 s, render ms p50 ${at(0.5)} max ${at(1)}; /api/overview?range=1h ${overview} bytes`);
  await shot(page, '9-fifty-tables');
});

test('no console errors', () => {
  assert.deepEqual(problems, []);
});
