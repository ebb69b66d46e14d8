// Chromium against a real wsd, for tests/interop.rs: Debian's chromium, headless, driven by
// playwright-core (which downloads no browser).
//
//   node tests/interop/browser.mjs SPEC
//   CHROMIUM=/usr/bin/chromium   the browser
//   INTEROP_NODE_DIR=dir         where playwright-core is installed (default target/interop-node)
//
// SPEC is JSON: {"protocols": [OFFERED, ...], "groups": [{"name": NAME, "page": URL}, ...]}.
// For each group it opens the group's page (tests/interop/www/, served by wsd's static_dir over
// https, or http), whose interop() connects back to wss:// (ws://) + location.host, offering
// the subprotocols (and permessage-deflate, as Chromium always does), echoes text and binary
// messages and closes with 4000. The certificate is not checked (--ignore-certificate-errors).
// Prints one JSON report on stdout: {"client": "chromium VERSION", "runs": [{"group",
// "offer_deflate", "protocol", "extensions", "close_code", "clean", "echoes"}, ...]}; the test
// judges it. Exits 1 on the first step that fails, naming the group and the step.
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const nodeDir = process.env.INTEROP_NODE_DIR || path.join(root, "target/interop-node");
const { chromium } = createRequire(path.join(nodeDir, "package.json"))("playwright-core");
const STEP_TIMEOUT = 20_000; // ms

if (process.argv.length !== 3) {
  console.error("usage: node tests/interop/browser.mjs SPEC");
  process.exit(2);
}
const spec = JSON.parse(process.argv[2]);

let client = "chromium";
let step = "launching Chromium";
let browser;
const said = [];

async function fail(err) {
  console.error(`${client}: ${step}: ${err.message.split("\n")[0]}`);
  for (const line of said) console.error(`  the page said: ${line}`);
  await browser?.close().catch(() => {});
  process.exit(1);
}
// The whole run ends even if something hangs outside Playwright's own timeouts.
setTimeout(() => fail(new Error("no result after 60 s")), 60_000).unref();

try {
  // Playwright adds --headless, --no-sandbox and a new empty profile itself. The rest keep
  // Chromium off the (closed) network, and accept the test's certificate.
  const offline = ["--disable-background-networking", "--disable-component-update", "--disable-sync"];
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    timeout: STEP_TIMEOUT,
    args: ["--no-sandbox", "--disable-gpu", "--no-proxy-server", "--ignore-certificate-errors", ...offline],
  });
  client = `chromium ${browser.version()}`;
  const page = await browser.newPage();
  page.on("pageerror", (e) => said.push(e.message));
  page.on("console", (m) => m.type() === "error" && said.push(m.text()));
  const runs = [];
  for (const group of spec.groups) {
    step = `group ${group.name}: opening ${group.page}`;
    const response = await page.goto(group.page, { timeout: STEP_TIMEOUT });
    if (response?.status() !== 200) throw new Error(`HTTP ${response?.status()}`);
    step = `group ${group.name}`;
    const result = await page.evaluate((protocols) => window.interop(protocols), spec.protocols);
    runs.push({ group: group.name, offer_deflate: true, ...result });
  }
  step = "closing the browser";
  await browser.close();
  console.log(JSON.stringify({ client, runs }));
  process.exit(0);
} catch (err) {
  await fail(err);
}
