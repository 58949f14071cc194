// Screenshot of the demo page in headless Chromium (docs/img/demo.png):
//
//   IRESNETC=target/release/iresnetc node web/test/screenshot.mjs OUT.png BUNDLE...
//
// Serves the bundles with `iresnetc serve`, opens the demo, waits until it has drawn every
// bundle and writes the page's picture to OUT.png.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { chromium } from 'playwright-core';

const [out, ...bundles] = process.argv.slice(2);
if (!out || !bundles.length || !process.env.IRESNETC) {
  console.error('usage: IRESNETC=path/to/iresnetc node web/test/screenshot.mjs OUT.png BUNDLE...');
  process.exit(2);
}
const server = spawn(process.env.IRESNETC, ['serve', ...bundles, '--port', '0'], { stdio: ['ignore', 'pipe', 'inherit'] });
const base = await new Promise((resolve, reject) => {
  let text = '';
  server.stdout.on('data', (d) => {
    text += d;
    const m = text.match(/http:\/\/127\.0\.0\.1:\d+\//);
    if (m) resolve(m[0]);
  });
  server.on('exit', (code) => reject(new Error(`iresnetc serve exited with ${code}`)));
});
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'iresnetc-chromium-'));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1000, height: 560 },
  args: ['--headless=new', '--no-sandbox', '--enable-unsafe-webgpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});
try {
  const page = await browser.newPage();
  await page.goto(base);
  await page.waitForSelector('body[data-done]', { timeout: 600000 });
  const done = await page.getAttribute('body', 'data-done');
  await page.screenshot({ path: out, fullPage: true });
  console.log(`${out}: demo ${done === 'true' ? 'drawn' : 'FAILED'}`);
  if (done !== 'true') process.exitCode = 1;
} finally {
  await browser.close();
  server.kill();
  fs.rmSync(profile, { recursive: true, force: true });
}
