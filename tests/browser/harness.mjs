// What the browser tests share: the environment tests/e2e/console.rs passes
// (SLUICE_URL, SLUICE_MQTT_PORT, SLUICE_DATA_DIR, SLUICE_LOADTEST, SLUICE_SHOTS;
// SLUICE_CHROMIUM defaults to /usr/bin/chromium), Debian's Chromium launched through
// playwright-core (installed by scripts/test.sh, found through NODE_PATH), a page whose
// console errors are collected, and the load tester as a child process.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');

export const env = (name) => {
  const v = process.env[name];
  assert.ok(v, `${name} is not set: run this through tests/e2e/console.rs`);
  return v;
};

/// Chromium and one page of `viewport`. `problems` collects console errors, page
/// errors and failed requests, but those `expected(message, url)` allows.
export async function open({ viewport = { width: 1400, height: 1000 }, expected = () => false } = {}) {
  const browser = await chromium.launch({
    executablePath: process.env.SLUICE_CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-quic', '--no-first-run'],
  });
  const context = await browser.newContext({ acceptDownloads: true, viewport });
  const page = await context.newPage();
  const problems = [];
  page.on('console', (m) => {
    if (m.type() === 'error' && !expected(m.text(), m.location().url)) {
      problems.push(`console: ${m.text()} (${m.location().url})`);
    }
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('requestfailed', (r) => {
    // The event stream is aborted on purpose when the page reloads the overview.
    if (!r.url().endsWith('/api/events')) problems.push(`request failed: ${r.url()}`);
  });
  return { browser, page, problems };
}

/// `sluice-loadtest telemetry` against the service's broker with `args`, for the test.
export function load(args) {
  return spawn(env('SLUICE_LOADTEST'), ['telemetry', '--target', `mqtt://127.0.0.1:${env('SLUICE_MQTT_PORT')}`,
    '--duration', '600s', ...args], { stdio: ['ignore', 'ignore', 'inherit'] });
}

/// Saves a full-page screenshot as SLUICE_SHOTS/<name>.png.
export function shot(page, name) {
  const dir = env('SLUICE_SHOTS');
  fs.mkdirSync(dir, { recursive: true });
  return page.screenshot({ path: path.join(dir, `${name}.png`), fullPage: true });
}
