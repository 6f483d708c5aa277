// A real browser walk through the device page, for tests/test_web.py:
// Debian's /usr/bin/chromium driven by playwright-core (no browser download).
//   node browser.mjs BASE_URL FIRST_PASSWORD NEW_PASSWORD OUT_DIR
// Prints one JSON line with what it saw; screenshots go to OUT_DIR.
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const [base, firstPassword, newPassword, outDir] = process.argv.slice(2);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "thox-chromium-"));
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const result = { console_errors: [], steps: [] };
const step = (s) => result.steps.push(s);

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1200, height: 900 },
  timeout: 60000,
});
try {
  context.setDefaultTimeout(20000);
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (m) => { if (m.type() === "error") result.console_errors.push(m.text()); });
  page.on("pageerror", (e) => result.console_errors.push(String(e)));
  page.on("dialog", (d) => d.accept());

  await page.goto(base + "/");
  result.title = await page.title();
  result.health = (await page.textContent('[data-field="status"]')).trim();
  result.base_url_shown = (await page.textContent("#base-url")).trim();
  result.models_shown = await page.locator('[data-list="models"] td.mono').allTextContents();
  result.pulls_shown = await page.locator('[data-list="pulls"] .pull').allTextContents();
  result.key_visible_anonymous = await page.locator("#key").count();
  // the snippet tabs work (JS loaded under the CSP)
  await page.click('[data-tab="curl"]');
  result.curl_visible = await page.isVisible('[data-panel="curl"]');
  result.python_hidden = !(await page.isVisible('[data-panel="python"]'));
  result.curl_snippet = await page.textContent("#code-curl");
  step("index");

  await page.click("header >> text=Sign in");
  await page.waitForURL(/\/login$/);
  await page.fill("#password", firstPassword);
  await Promise.all([page.waitForURL(/\/password$/), page.click("#signin")]);
  result.must_change_url = page.url();
  await page.screenshot({ path: path.join(outDir, "web-password.png") });
  step("signed in, must change");

  await page.fill("#new_password", newPassword);
  await page.fill("#confirm_password", newPassword);
  await Promise.all([page.waitForURL((u) => u.pathname === "/"), page.click("#save_password")]);
  result.flash_after_change = (await page.textContent(".flash")).trim();
  step("password changed");

  const key1 = (await page.textContent("#key")).trim();
  result.key_before = key1;
  await page.click('[data-copy="#key"]');
  await page.waitForFunction(() => document.querySelector('[data-copy="#key"]').textContent === "Copied");
  result.clipboard = await page.evaluate(() => navigator.clipboard.readText());
  result.document_cookie = await page.evaluate(() => document.cookie);
  result.cookies = (await context.cookies()).map((c) => ({ name: c.name, httpOnly: c.httpOnly, sameSite: c.sameSite, path: c.path, secure: c.secure }));
  step("key read and copied");

  await Promise.all([page.waitForURL((u) => u.pathname === "/"), page.click("#rotate")]);
  await page.waitForSelector(".flash.ok");
  result.key_after = (await page.textContent("#key")).trim();
  result.flash_after_rotate = (await page.textContent(".flash.ok")).trim();
  result.url_after_rotate = page.url();
  step("rotated");

  // a live status refresh happens without errors
  await page.waitForTimeout(3500);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: path.join(outDir, "web-screenshot.png"), fullPage: true });
  result.history = await page.evaluate(() => performance.getEntriesByType("navigation").map((e) => e.name));

  // sign out: the key disappears
  await Promise.all([page.waitForURL((u) => u.pathname === "/"), page.click("header >> text=Sign out")]);
  result.key_visible_after_signout = await page.locator("#key").count();
  step("signed out");
} catch (e) {
  result.error = String(e && e.stack || e);
} finally {
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
