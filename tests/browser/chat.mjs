// The chat page in a real browser: two clients (separate browser contexts, so separate
// WebSockets and likely separate workers) open the page, and each page's WebSocket must have
// agreed to permessage-deflate (the server's group has compression on; Chromium offers it); A
// types a message and presses Enter, and it must appear in B's list (and A's: the chat app
// relays to the sender too); then B answers with the Send button and A must see that. Saves a
// screenshot of B.
//
//   node tests/browser/chat.mjs <page url> <screenshot.png>
//   CHROMIUM=/usr/bin/chromium   the browser (Debian's chromium; playwright-core never downloads one)
//   BROWSER_NODE_DIR=dir         where playwright-core is installed (default target/browser-node)
//
// Run by scripts/browser-test.sh, which installs both and starts wsd. Exits 1 with a message
// saying which step failed (and screenshots of both pages beside the screenshot path).
import { createRequire } from "node:module";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const [url, shot] = process.argv.slice(2);
if (!url || !shot) {
  console.error("usage: node tests/browser/chat.mjs <page url> <screenshot.png>");
  process.exit(2);
}
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const nodeDir = process.env.BROWSER_NODE_DIR || path.join(root, "target/browser-node");
const { chromium } = createRequire(path.join(nodeDir, "package.json"))("playwright-core");

const STEP_TIMEOUT = 20_000; // ms per wait: generous, each wait ends as soon as its condition holds
let step = "launching Chromium";
// The whole run must end even if something hangs outside Playwright's own timeouts.
const watchdog = setTimeout(() => fail(new Error("no result after 60 s")), 60_000);
watchdog.unref();

let browser;
const pages = {};
const problems = [];

async function fail(err) {
  console.error(`browser test FAILED while ${step}: ${err.message.split("\n")[0]}`);
  for (const p of problems) console.error(`  page said: ${p}`);
  const dir = path.dirname(shot);
  for (const [name, page] of Object.entries(pages)) {
    const file = path.join(dir, `failure-${name}.png`);
    await page.screenshot({ path: file, timeout: 5_000 }).then(
      () => console.error(`  screenshot of page ${name}: ${file}`),
      () => {},
    );
  }
  await browser?.close().catch(() => {});
  process.exit(1);
}

/** Waits until `page`'s message list has an item containing `text`. */
function waitForMessage(page, text) {
  return page.waitForFunction(
    (t) => [...document.querySelectorAll("#messages li")].some((li) => li.textContent.includes(t)),
    text,
    { timeout: STEP_TIMEOUT },
  );
}

try {
  mkdirSync(path.dirname(shot), { recursive: true });
  // Playwright gives every launch a new empty profile (--user-data-dir in a temp dir) and adds
  // --headless and --no-sandbox itself; the rest keep Chromium off the (closed) network.
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    timeout: STEP_TIMEOUT,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  for (const name of ["A", "B"]) {
    step = `opening ${url} in page ${name}`;
    const context = await browser.newContext({ viewport: { width: 800, height: 640 } });
    const page = await context.newPage();
    page.on("pageerror", (e) => problems.push(`${name}: ${e.message}`));
    page.on("console", (m) => m.type() === "error" && problems.push(`${name}: ${m.text()}`));
    const response = await page.goto(url, { timeout: STEP_TIMEOUT });
    if (!response?.ok()) throw new Error(`HTTP ${response?.status()} for ${url}`);
    pages[name] = page;
  }
  for (const [name, page] of Object.entries(pages)) {
    step = `waiting for page ${name} to show "connected"`;
    await page.waitForSelector('#status[data-state="open"]', { timeout: STEP_TIMEOUT });
    step = `checking page ${name}'s WebSocket agreed to permessage-deflate`;
    // `ws` is the page's socket (static/chat.js); `extensions` is what the server answered.
    const extensions = await page.evaluate(() => ws.extensions);
    if (!extensions.includes("permessage-deflate")) {
      throw new Error(`ws.extensions is ${JSON.stringify(extensions)}`);
    }
    console.log(`browser test: page ${name}: ws.extensions = ${JSON.stringify(extensions)}`);
  }

  const { A, B } = pages;
  // Long enough to go compressed both ways (over compression_min_size); B's answer is short
  // and goes plain.
  const fromA =
    `hello from A ${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}, ` +
    "with enough words after it to be worth compressing";
  step = "typing in page A and pressing Enter";
  await A.fill("#input", fromA);
  await A.press("#input", "Enter");
  step = `waiting for page B to show "${fromA}"`;
  await waitForMessage(B, fromA);
  step = `waiting for page A to show its own "${fromA}"`;
  await waitForMessage(A, fromA);
  if ((await A.inputValue("#input")) !== "") throw new Error("page A's input was not cleared");

  const fromB = `and hello from B ${Math.random().toString(36).slice(2, 8)}`;
  step = "typing in page B and clicking Send";
  await B.fill("#input", fromB);
  await B.click("#send");
  step = `waiting for page A to show "${fromB}"`;
  await waitForMessage(A, fromB);
  await waitForMessage(B, fromB);

  step = "checking the pages said nothing wrong";
  if (problems.length) throw new Error(`${problems.length} page error(s)`);
  step = `saving the screenshot ${shot}`;
  await B.screenshot({ path: shot });
  await browser.close();
  console.log(`browser test: B saw "${fromA}" from A, A saw "${fromB}" from B`);
  process.exit(0);
} catch (err) {
  await fail(err);
}
