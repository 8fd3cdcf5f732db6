// The console with 10,000 devices publishing and 50 tables in the lake: it stays live,
// lists every table, and reports how long each second's update takes to render.
// Started by tests/e2e/console.rs (`the_console_keeps_up_with_ten_thousand_devices_and_fifty_tables`).
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');

const env = (name) => {
  const v = process.env[name];
  assert.ok(v, `${name} is not set: run this through tests/e2e/console.rs`);
  return v;
};
const URL = env('SLUICE_URL');
const MQTT_PORT = env('SLUICE_MQTT_PORT');
const LOADTEST = env('SLUICE_LOADTEST');
const SHOTS = env('SLUICE_SHOTS');
const TABLES = Number(env('SLUICE_TABLES'));
fs.mkdirSync(SHOTS, { recursive: true });
const WAIT = 120_000;

let browser;
let page;
let load;
const problems = [];

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.SLUICE_CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-quic', '--no-first-run'],
  });
  page = await (await browser.newContext({ viewport: { width: 1400, height: 1000 } })).newPage();
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  load = spawn(LOADTEST, ['telemetry', '--target', `mqtt://127.0.0.1:${MQTT_PORT}`, '--devices', '10000',
    '--rate', '2000', '--duration', '600s', '--connections', '20', '--seed', '11'],
  { stdio: ['ignore', 'ignore', 'inherit'] });
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
  await page.screenshot({ path: path.join(SHOTS, '9-fifty-tables.png'), fullPage: true });
});

test('no console errors', () => {
  assert.deepEqual(problems, []);
});
