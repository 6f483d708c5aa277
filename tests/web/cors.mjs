// A page on another origin calls the API with fetch, for tests/test_cors.py:
// Debian's /usr/bin/chromium driven by playwright-core.
//   node cors.mjs PAGE_URL
// The page (served by the test on its own loopback port) runs its calls and
// sets window.result; this prints that as one JSON line.
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const [pageUrl] = process.argv.slice(2);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "thox-cors-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
  timeout: 60000,
});
const consoleLines = [];
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e}`));
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.result !== undefined, null, { timeout: 150000 });
  const result = await page.evaluate(() => window.result);
  result.origin = await page.evaluate(() => location.origin);
  result.console = consoleLines;
  console.log(JSON.stringify(result));
} catch (e) {
  console.log(JSON.stringify({ error: String(e), console: consoleLines }));
} finally {
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
