// authlink's browser suite: Playwright (playwright-core) driving Debian's chromium against the
// real binary, the way an agency member and their client would use it.
//
//   AUTHLINK_BIN=target/debug/authlink node tests/browser/suite.mjs
//
// It starts `authlink serve` on a random port with a fresh SQLite database and the sandbox
// providers, creates the first admin with `authlink user create --admin` (password on standard
// input), and then, in a real browser: signs in; creates a workspace and a link; opens the link as
// the client in a separate browser context on a 320 px wide phone screen; connects a sandbox TikTok
// account; sees the success page; sees the connection in the dashboard; breaks it through the
// sandbox control API and the health check; sees it marked broken with its repair link; repairs it
// through the same link; invites a member, who joins with an account of their own. It fails on
// any console error, page error, CSP violation or request to another origin. Every page it shows
// is also checked with axe-core against WCAG 2.1 A and AA (contrast, names, labels, landmarks,
// language); a violation fails the suite with its rule, the elements and how to fix them; and no
// page may be wider than its screen.
// Screenshots of each page go to test-artifacts/browser/ (not committed).
//
// Environment: AUTHLINK_BIN (required), AUTHLINK_CHROMIUM (default /usr/bin/chromium),
// AUTHLINK_ARTIFACTS (default <repo>/test-artifacts/browser).

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:http';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import axe from 'axe-core';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..', '..');
const BIN = process.env.AUTHLINK_BIN;
const CHROMIUM = process.env.AUTHLINK_CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = process.env.AUTHLINK_ARTIFACTS || path.join(root, 'test-artifacts', 'browser');
const SUITE_TIMEOUT_MS = 240_000;
const ADMIN_EMAIL = 'admin@example.com';
const ADMIN_PASSWORD = 'correct horse battery staple';
const MEMBER_EMAIL = 'newbie@example.com';
const MEMBER_PASSWORD = 'a password of my own';
const TIKTOK_ACCOUNT = 'sbx-oid-creator-0001';
const TIKTOK_HANDLE = 'sandbox.creator';

if (!BIN) {
  console.error('AUTHLINK_BIN must name the authlink binary (cargo test sets it).');
  process.exit(2);
}

const problems = [];
let step = 0;
const log = (msg) => console.log(`[browser] ${msg}`);

// ---------------------------------------------------------------------------------------------
// The server and the CLI

const dataDir = mkdtempSync(path.join(tmpdir(), 'authlink-browser-'));
const baseEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('AUTHLINK_')));
Object.assign(baseEnv, {
  AUTHLINK_DATABASE_URL: `sqlite://${dataDir}/authlink.db`,
  AUTHLINK_DATA_DIR: dataDir,
  AUTHLINK_MASTER_KEY: randomBytes(32).toString('base64'),
  AUTHLINK_SANDBOX__CONTROL_API: 'true',
  AUTHLINK_PROVIDERS__TIMEOUT_SECS: '5',
  // The agency's logo is served from loopback below.
  AUTHLINK_WEBHOOKS__ALLOW_PRIVATE_TARGETS: 'true',
});

// The agency's own web site, with its logo (a 1×1 PNG): another origin, which only the server
// may fetch from; the browsers must load the logo from authlink.
const LOGO_PNG = Buffer.from(
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==',
  'base64',
);
function startLogoHost() {
  return new Promise((resolve) => {
    const host = createServer((req, res) => {
      if (req.url === '/logo.png') {
        res.writeHead(200, { 'content-type': 'image/png' }).end(LOGO_PNG);
      } else {
        res.writeHead(404).end();
      }
    });
    host.listen(0, '127.0.0.1', () => resolve({ host, url: `http://127.0.0.1:${host.address().port}/logo.png` }));
  });
}

let server;
let serverLog = '';

function startServer() {
  return new Promise((resolve, reject) => {
    const env = { ...baseEnv, AUTHLINK_LISTEN: '127.0.0.1:0', AUTHLINK_LOG_FORMAT: 'json', AUTHLINK_LOG: 'info' };
    server = spawn(BIN, ['serve'], { env, cwd: dataDir, stdio: ['ignore', 'ignore', 'pipe'] });
    const timer = setTimeout(() => reject(new Error(`authlink serve did not start listening:\n${serverLog}`)), 60_000);
    server.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`authlink serve exited (${code}) before listening:\n${serverLog}`));
    });
    createInterface({ input: server.stderr }).on('line', (line) => {
      serverLog += `${line}\n`;
      try {
        const entry = JSON.parse(line);
        if (entry.message === 'authlink listening') {
          clearTimeout(timer);
          resolve(String(entry.public_url).replace(/\/$/, ''));
        }
      } catch {
        // not JSON: keep it in the log
      }
    });
  });
}

function cli(base, args, input) {
  const env = { ...baseEnv, AUTHLINK_PUBLIC_URL: base, AUTHLINK_LOG_FORMAT: 'human', AUTHLINK_LOG: 'warn' };
  const out = spawnSync(BIN, args, { env, cwd: dataDir, input: input ?? '', encoding: 'utf8', timeout: 60_000 });
  if (out.status !== 0) {
    throw new Error(`authlink ${args.join(' ')} failed (${out.status}): ${out.stderr}`);
  }
  return out.stdout;
}

async function sandbox(base, pathname, body) {
  const res = await fetch(`${base}/sandbox/control${pathname}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body ?? {}),
  });
  const text = await res.text();
  assert.ok(res.ok, `sandbox control ${pathname}: ${res.status} ${text}`);
  return JSON.parse(text);
}

// ---------------------------------------------------------------------------------------------
// Watching pages: console errors, page errors, CSP violations, requests to other origins

// Pages whose error status the scenario asks for (each a test of a URL, set before the page is
// asked for): Chromium reports the document's own status as a console error ("Failed to load
// resource"), which is expected there and nowhere else.
const expectedErrorPages = new Set();
const errorStatusExpected = (url) => [...expectedErrorPages].some((expected) => expected(url));

function watch(page, who, base) {
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    if (errorStatusExpected(page.url()) && msg.text().startsWith('Failed to load resource: the server responded')) return;
    problems.push(`${who}: console error on ${page.url()}: ${msg.text()}`);
  });
  page.on('pageerror', (err) => problems.push(`${who}: page error on ${page.url()}: ${err.message}`));
  page.on('request', (req) => {
    const url = req.url();
    if (!url.startsWith(`${base}/`) && !url.startsWith('data:')) {
      problems.push(`${who}: request to another origin: ${url}`);
    }
  });
  page.on('dialog', (dialog) => dialog.accept());
}

async function newContext(browser, base, options) {
  const context = await browser.newContext(options);
  // Report every CSP violation loudly (Chromium also logs them as console errors).
  await context.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => {
      console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || 'inline code'}`);
    });
  });
  context.on('page', (p) => watch(p, options.who, base));
  return context;
}

// The WCAG 2.1 A and AA rules of axe-core, run on the page as it is shown.
const WCAG_TAGS = ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'];
const audited = [];

async function audit(page, name) {
  // Evaluated through the DevTools protocol, which the page's CSP does not govern: the pages keep
  // their policy (no inline script), and axe's own code is not the page's.
  if (!(await page.evaluate(() => typeof window.axe !== 'undefined'))) {
    await page.evaluate(axe.source);
  }
  const result = await page.evaluate(
    (tags) => window.axe.run(document, { runOnly: { type: 'tag', values: tags }, resultTypes: ['violations'] }),
    WCAG_TAGS,
  );
  for (const v of result.violations) {
    const where = v.nodes
      .slice(0, 5)
      .map((n) => `      ${n.target.join(' ')}: ${n.failureSummary.replace(/\s+/g, ' ')}`)
      .join('\n');
    problems.push(`accessibility (${name}, ${page.url()}): ${v.id} [${v.impact}] ${v.help}\n${where}`);
  }
  audited.push(name);
}

async function shot(page, name) {
  // No page scrolls sideways: what is wider than the screen wraps, or scrolls in a region of its
  // own (the dashboard's tables).
  const overflow = await page.evaluate(
    () => document.documentElement.scrollWidth - document.documentElement.clientWidth,
  );
  assert.ok(overflow <= 0, `${name}: the page is ${overflow} px wider than the screen`);
  step += 1;
  const file = path.join(ARTIFACTS, `${String(step).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${path.relative(root, file)}`);
  await audit(page, name);
}

async function expectText(page, text) {
  await page.getByText(text, { exact: false }).first().waitFor({ state: 'visible', timeout: 10_000 });
}

// ---------------------------------------------------------------------------------------------
// The scenario

async function run() {
  rmSync(ARTIFACTS, { recursive: true, force: true });
  mkdirSync(ARTIFACTS, { recursive: true });
  const base = await startServer();
  log(`authlink listening on ${base}`);
  cli(base, ['user', 'create', '--email', ADMIN_EMAIL, '--admin'], `${ADMIN_PASSWORD}\n`);
  log('first admin created with `authlink user create --admin` (password on stdin)');

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  try {
    // The agency member, on a laptop.
    const agency = await newContext(browser, base, {
      who: 'agency',
      viewport: { width: 1280, height: 900 },
      permissions: ['clipboard-read', 'clipboard-write'],
    });
    const dash = await agency.newPage();

    // 1. Sign in: the dashboard sends an anonymous visitor to the sign-in page.
    await dash.goto(`${base}/app`);
    assert.match(dash.url(), /\/app\/login\?next=%2Fapp$/);
    await shot(dash, 'sign-in');
    await dash.getByLabel('Email').fill(ADMIN_EMAIL);
    await dash.getByLabel('Password').fill(ADMIN_PASSWORD);
    await dash.getByRole('button', { name: 'Sign in' }).click();
    await dash.waitForURL(`${base}/app/workspaces`);
    await expectText(dash, 'There is no workspace yet');
    await shot(dash, 'workspaces-empty');
    log('signed in');

    // 2. Create a workspace.
    await dash.getByLabel('Agency name').fill('Acme Social');
    await dash.getByRole('button', { name: 'Create workspace' }).click();
    await dash.waitForURL(`${base}/app/w/acme-social?notice=workspace_created`);
    await expectText(dash, 'Workspace created.');
    await shot(dash, 'overview-new-workspace');
    log('workspace created');

    // 3. Create a link (TikTok only).
    await dash.getByRole('link', { name: 'Create a link' }).click();
    await dash.waitForURL(`${base}/app/w/acme-social/links/new`);
    await dash.getByLabel('Label').fill('Sunny Cafe');
    await dash.getByLabel('Instagram').uncheck();
    await shot(dash, 'link-form');
    await dash.getByRole('button', { name: 'Create link' }).click();
    await dash.waitForURL(/\/app\/w\/acme-social\/links\/[0-9a-f-]{36}\?notice=link_created$/);
    await expectText(dash, 'Link created.');
    const linkUrl = await dash.locator('#link-url').inputValue();
    const linkId = new URL(dash.url()).pathname.split('/').pop();
    assert.match(linkUrl, new RegExp(`^${base}/l/[A-Za-z0-9_-]{43}$`));
    const qrWidth = await dash.locator('.qr img').evaluate((img) => img.complete && img.naturalWidth);
    assert.ok(qrWidth > 0, 'the QR code image loads');
    await dash.getByRole('button', { name: 'Copy link' }).click();
    await expectText(dash, 'Copied.');
    assert.equal(await dash.evaluate(() => navigator.clipboard.readText()), linkUrl, 'the copy button copies the link');
    await shot(dash, 'link-created');
    log('link created, copied, QR code shown');

    // 4. The client opens the link on a phone, in another browser context (no shared cookies):
    // the narrowest phone screen in use, 320 px wide.
    const client = await newContext(browser, base, {
      who: 'client',
      viewport: { width: 320, height: 640 },
      deviceScaleFactor: 2,
      isMobile: true,
      hasTouch: true,
    });
    const phone = await client.newPage();
    await phone.goto(linkUrl);
    await expectText(phone, 'Connect your TikTok account');
    await expectText(phone, 'Sunny Cafe');
    await shot(phone, 'client-landing');
    // First the client says no on the consent screen: a page that says so, and "Try again" back to
    // the same link.
    await phone.getByRole('button', { name: 'Connect TikTok' }).click();
    await phone.waitForURL(/\/sandbox\/tiktok\//);
    const resultPage = (url) => url.startsWith(`${base}/connected/`);
    expectedErrorPages.add(resultPage);
    const denied = phone.waitForResponse((r) => resultPage(r.url()));
    await phone.getByRole('button', { name: 'Deny' }).click();
    assert.equal((await denied).status(), 403, 'a denied consent ends on a 403 page');
    await expectText(phone, 'Connection cancelled');
    await shot(phone, 'client-consent-denied');
    expectedErrorPages.delete(resultPage);
    await phone.getByRole('link', { name: 'Try again' }).click();
    await phone.waitForURL(linkUrl);
    await expectText(phone, 'Connect your TikTok account');
    log('a denied consent ends on its page, and "Try again" leads back to the link');
    await phone.getByRole('button', { name: 'Connect TikTok' }).click();
    await phone.waitForURL(/\/sandbox\/tiktok\//);
    await expectText(phone, 'wants to connect to your');
    await phone.locator(`input[name="account"][value="${TIKTOK_ACCOUNT}"]`).check();
    await shot(phone, 'client-sandbox-consent');
    await phone.getByRole('button', { name: 'Allow' }).click();
    await phone.waitForURL(/\/connected\/[0-9a-f-]{36}$/);
    await expectText(phone, 'Your TikTok account is connected');
    await expectText(phone, `@${TIKTOK_HANDLE}`);
    await shot(phone, 'client-success');
    log('client connected a sandbox TikTok account');

    // 5. The agency sees the connection.
    await dash.goto(`${base}/app/w/acme-social/connections`);
    const row = dash.locator('.item', { hasText: `@${TIKTOK_HANDLE}` });
    await row.locator('.badge.st-active').waitFor();
    await shot(dash, 'connections-list');
    await row.getByRole('link', { name: `@${TIKTOK_HANDLE}` }).click();
    await dash.waitForURL(/\/app\/w\/acme-social\/connections\/[0-9a-f-]{36}$/);
    const connectionId = dash.url().split('/').pop();
    await expectText(dash, 'user.info.basic');
    await shot(dash, 'connection-active');
    log(`the dashboard shows connection ${connectionId}`);

    // 6. Break it: the account removes the app at TikTok; the health check notices.
    await sandbox(base, `/tiktok/accounts/${TIKTOK_ACCOUNT}/revoke`, { reason: 'app_removed' });
    try {
      cli(base, ['connection', 'check', connectionId]);
    } catch (e) {
      log(`connection check reported: ${e.message.split('\n')[0]}`);
    }
    await dash.reload();
    await expectText(dash, 'Broken: needs reconnecting');
    const repairUrl = await dash.locator('#repair-url').inputValue();
    assert.equal(repairUrl, linkUrl, 'the repair link is the link the account came through');
    await dash.getByRole('button', { name: 'Copy repair link' }).click();
    await expectText(dash, 'Copied.');
    await shot(dash, 'connection-broken');
    await dash.goto(`${base}/app/w/acme-social`);
    await expectText(dash, 'These accounts need to be reconnected');
    await shot(dash, 'overview-needs-attention');
    log('the connection is marked broken, with its repair link');

    // 7. The client repairs it through the same link: the landing page offers a reconnect.
    await phone.goto(repairUrl);
    await expectText(phone, 'Needs reconnecting');
    await shot(phone, 'client-landing-broken');
    await phone.getByRole('button', { name: 'Reconnect' }).click();
    await phone.waitForURL(/\/sandbox\/tiktok\//);
    await phone.locator(`input[name="account"][value="${TIKTOK_ACCOUNT}"]`).check();
    await phone.getByRole('button', { name: 'Allow' }).click();
    await phone.waitForURL(/\/connected\/[0-9a-f-]{36}$/);
    await expectText(phone, 'Your TikTok account is reconnected');
    await shot(phone, 'client-reconnected');
    await dash.goto(`${base}/app/w/acme-social/connections/${connectionId}`);
    await dash.locator('.status-line .badge.st-active').waitFor();
    assert.equal(await dash.locator('#repair-url').count(), 0, 'no repair link once repaired');
    await shot(dash, 'connection-repaired');
    log('repaired through the same link');

    // 7b. Limited to the uses it has had, the link only repairs: its page says Reconnect.
    cli(base, ['link', 'update', linkId, '--max-uses', '1']);
    await phone.goto(linkUrl);
    await expectText(phone, 'Reconnect your TikTok account');
    await phone.getByRole('button', { name: 'Reconnect a TikTok account' }).waitFor();
    assert.equal(await phone.getByRole('button', { name: 'Connect TikTok', exact: true }).count(), 0, 'no new connection offered');
    await shot(phone, 'client-landing-used-up');
    cli(base, ['link', 'update', linkId, '--no-max-uses']);
    log('a used-up link offers only to reconnect');

    // 8. Branding: the live preview follows the form, through the script (no inline styles);
    // the logo, once saved, is authlink's copy on the client's page.
    await dash.goto(`${base}/app/w/acme-social/branding`);
    await dash.getByLabel('Name clients see (optional)').fill('Glow Studio');
    await dash.getByLabel('Accent colour (optional)').fill('#ffd400');
    const previewColour = await dash
      .locator('.preview-button')
      .evaluate((el) => getComputedStyle(el).backgroundColor);
    assert.equal(previewColour, 'rgb(255, 212, 0)', 'the preview follows the accent colour');
    await expectText(dash, 'Glow Studio');
    await shot(dash, 'branding-preview');
    const logoHost = await startLogoHost();
    try {
      await dash.getByLabel('Logo URL (optional)').fill(logoHost.url);
      await dash.getByRole('button', { name: 'Save' }).click();
      await dash.waitForURL(/notice=branding_saved$/);
    } finally {
      logoHost.host.close();
    }
    const previewLogo = await dash.locator('.preview-logo').evaluate((img) => img.complete && img.naturalWidth);
    assert.ok(previewLogo > 0, 'the preview shows the saved logo');
    await phone.goto(linkUrl);
    const logo = phone.locator('header.brand img.logo');
    assert.match(await logo.getAttribute('src'), /^\/brand\/[0-9a-f-]{36}\/logo\/[0-9a-f]{64}$/);
    assert.ok(await logo.evaluate((img) => img.complete && img.naturalWidth > 0), 'the client page shows the logo');
    await shot(phone, 'client-landing-logo');
    log('branding preview and save, with a logo shown from authlink itself');

    // 9. Revoke the link, confirming the dialog; the client's link is dead.
    await dash.goto(`${base}/app/w/acme-social/links`);
    await dash.getByRole('button', { name: 'Copy link of Sunny Cafe' }).click();
    await expectText(dash, 'Copied.');
    assert.equal(await dash.evaluate(() => navigator.clipboard.readText()), linkUrl, 'the list copies the link');
    await shot(dash, 'links-list');
    await dash.getByRole('link', { name: 'Sunny Cafe' }).click();
    await dash.getByRole('button', { name: 'Revoke' }).click();
    await dash.waitForURL(/notice=link_revoked$/);
    await expectText(dash, 'Link revoked.');
    await shot(dash, 'link-revoked');
    expectedErrorPages.add((url) => url === linkUrl);
    const gone = await phone.goto(linkUrl);
    assert.equal(gone.status(), 410);
    await shot(phone, 'client-link-revoked');
    expectedErrorPages.add((url) => url === `${base}/l/${'A'.repeat(43)}`);
    const unknown = await phone.goto(`${base}/l/${'A'.repeat(43)}`);
    assert.equal(unknown.status(), 404);
    await shot(phone, 'client-link-unknown');
    log('link revoked after confirmation; the client sees it is no longer valid');

    // 10. Invite a member: the link is shown once and copied; the invitee, in a browser of their
    // own, creates the account with a password of their own and lands in the workspace.
    await dash.goto(`${base}/app/w/acme-social/members`);
    await dash.getByLabel('Email').fill(MEMBER_EMAIL);
    await dash.getByRole('button', { name: 'Invite or save role' }).click();
    await expectText(dash, `Invitation for ${MEMBER_EMAIL}`);
    const inviteUrl = await dash.locator('#invite-url').inputValue();
    assert.match(inviteUrl, new RegExp(`^${base}/app/invite/[A-Za-z0-9_-]{43}$`));
    await dash.getByRole('button', { name: 'Copy link' }).click();
    await expectText(dash, 'Copied.');
    assert.equal(await dash.evaluate(() => navigator.clipboard.readText()), inviteUrl, 'the copy button copies the invitation');
    await shot(dash, 'member-invited');
    const invitee = await newContext(browser, base, { who: 'invitee', viewport: { width: 390, height: 844 }, isMobile: true });
    const joining = await invitee.newPage();
    await joining.goto(inviteUrl);
    await expectText(joining, 'Join Acme Social');
    await expectText(joining, 'Create your account');
    await joining.getByLabel('Password', { exact: true }).fill(MEMBER_PASSWORD);
    await joining.getByLabel('Password again').fill(MEMBER_PASSWORD);
    await shot(joining, 'invitation-create-account');
    await joining.getByRole('button', { name: 'Create account and join' }).click();
    await joining.waitForURL(`${base}/app/w/acme-social?notice=invitation_accepted`);
    await expectText(joining, 'you have joined this workspace');
    await shot(joining, 'invitation-accepted');
    await dash.goto(`${base}/app/w/acme-social/members`);
    await dash.locator('.item', { hasText: MEMBER_EMAIL }).locator('.badge', { hasText: 'member' }).waitFor();
    await invitee.close();
    log('a member invited, and joined with an account of their own');

    // 11. The agency's other pages, as shown (each one checked for accessibility by `shot`).
    await dash.goto(`${base}/app/w/acme-social/api-keys`);
    await dash.getByLabel('Name').fill('Reporting');
    await dash.getByRole('button', { name: 'Create key' }).click();
    await expectText(dash, 'Your new key: copy it now');
    await shot(dash, 'api-key-created');
    for (const [pathname, name] of [
      ['/app/w/acme-social/webhooks', 'webhooks'],
      ['/app/w/acme-social/audit', 'audit-log'],
      ['/app/w/acme-social/connections?status=broken', 'connections-filtered'],
      ['/app/search?q=sunny', 'search'],
      ['/app/account', 'account'],
      ['/app/w/acme-social/no-such-page', 'dashboard-not-found'],
    ]) {
      if (name === 'dashboard-not-found') expectedErrorPages.add((url) => url === `${base}${pathname}`);
      await dash.goto(`${base}${pathname}`);
      await shot(dash, name);
    }
    log('the agency\'s other pages shown');

    // 12. The phone-sized dashboard, and signing out.
    const small = await newContext(browser, base, { who: 'agency-phone', viewport: { width: 390, height: 844 }, isMobile: true });
    const mobile = await small.newPage();
    await mobile.goto(`${base}/app/login`);
    await mobile.getByLabel('Email').fill(ADMIN_EMAIL);
    await mobile.getByLabel('Password').fill(ADMIN_PASSWORD);
    await mobile.getByRole('button', { name: 'Sign in' }).click();
    await mobile.waitForURL(`${base}/app/workspaces`);
    await mobile.goto(`${base}/app/w/acme-social`);
    await shot(mobile, 'dashboard-on-a-phone');
    const overflow = await mobile.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the dashboard fits a phone screen (overflow ${overflow}px)`);
    await mobile.locator('summary', { hasText: ADMIN_EMAIL }).click();
    await mobile.getByRole('button', { name: 'Sign out' }).click();
    await mobile.waitForURL(`${base}/app/login?notice=signed_out`);
    await expectText(mobile, 'You are signed out.');
    log('signed out');

    log(`${audited.length} pages checked with axe-core ${axe.version} (WCAG 2.1 A and AA)`);
    assert.deepEqual(problems, [], 'no console error, CSP violation, cross-origin request or accessibility violation');
  } finally {
    await browser.close();
  }
}

const timeout = setTimeout(() => {
  console.error(`[browser] the suite took longer than ${SUITE_TIMEOUT_MS / 1000} s`);
  server?.kill('SIGKILL');
  process.exit(1);
}, SUITE_TIMEOUT_MS);

let failed = false;
try {
  await run();
  console.log('[browser] 1 passed, 0 failed');
} catch (e) {
  failed = true;
  console.error(`[browser] FAILED: ${e.stack || e}`);
  if (problems.length) console.error(`[browser] problems seen:\n  ${problems.join('\n  ')}`);
  console.error(`[browser] server log (last lines):\n${serverLog.split('\n').slice(-40).join('\n')}`);
} finally {
  clearTimeout(timeout);
  server?.kill('SIGTERM');
  rmSync(dataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
