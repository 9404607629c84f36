// Drives the web console in Debian's headless Chromium (playwright-core) against a real server
// that server/tests/console.rs started, with `prod` holding some flags and a `vane watch`
// connected to it. Prints one JSON line per step; exits non-zero at the first failure.
// Screenshots of every page go to the directory given (docs/screenshots/, linked from the
// README).
//
//   node check.mjs BASE_URL ADMIN_TOKEN SCREENSHOT_DIR

import { chromium } from "playwright-core";

const [base, token, shots] = process.argv.slice(2);
const step = (name, extra = {}) => console.log(JSON.stringify({ step: name, ...extra }));
const errors = [];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 860 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  // A refused request is logged by the browser as a failed resource: the tests cause some (a
  // wrong token, an invalid rule) on purpose. Anything else logged as an error fails the run.
  page.on("console", (m) => m.type() === "error" && !m.text().startsWith("Failed to load resource") && errors.push(`console: ${m.text()}`));
  page.on("response", (r) => r.status() === 401 && errors.push(`401 from ${r.url()}`));
  page.on("dialog", async (d) => {
    // Deleting an environment asks for its name; everything else is a yes/no confirmation.
    if (d.type() === "prompt") await d.accept(process.env.PROMPT_ANSWER ?? "");
    else await d.accept();
  });
  const shot = (name) => page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  const status = () => page.locator("#status");

  // Sign in, by keyboard: type the token and press Enter.
  await page.goto(base);
  await page.getByLabel("Admin token").waitFor();
  await shot("sign-in");
  await page.keyboard.type(token);
  await page.keyboard.press("Enter");
  await page.getByRole("table", { name: "Environments" }).waitFor();
  await page.locator('tr[data-env="prod"]').waitFor();
  await shot("environments");
  step("signed in");

  // Create a flag with the editor.
  await page.goto(`${base}/#/env/prod/flags/new`);
  await page.getByLabel("Key").fill("checkout");
  await page.getByLabel("Description").fill("The new checkout");
  await page.getByLabel("Tags (comma-separated)").fill("web, payments");
  await page.getByRole("button", { name: "Save flag" }).click();
  await status().filter({ hasText: "saved checkout" }).waitFor();
  await page.goto(`${base}/#/env/prod/flags`);
  await page.locator('tr[data-flag="checkout"]').waitFor();
  await page.getByLabel("Search").fill("payments");
  if ((await page.locator("tbody tr").count()) !== 1) throw new Error("search by tag finds the one flag");
  await page.getByLabel("Search").fill("");
  await shot("flags");
  step("flag created");

  // An invalid rule: its error is shown at the field it concerns.
  await page.goto(`${base}/#/env/prod/flags/checkout`);
  await page.getByRole("button", { name: "Add rule" }).click();
  await page.getByLabel("Operator").selectOption("semver_gt");
  await page.getByLabel("Values, comma-separated").fill("not-a-version");
  await page.getByRole("button", { name: "Save flag" }).click();
  const values = page.getByLabel("Values, comma-separated");
  await page.locator('[aria-invalid="true"]').waitFor();
  if ((await values.getAttribute("aria-invalid")) !== "true") throw new Error("the values field is marked invalid");
  const describedBy = await values.getAttribute("aria-describedby");
  const fieldError = await page.locator(`#${describedBy}`).textContent();
  if (!fieldError.includes("rules[0].clauses[0].values[0]") || !fieldError.includes("semantic version"))
    throw new Error(`the error names the field: ${fieldError}`);
  await shot("invalid-rule");
  step("invalid rule shown at its field", { error: fieldError });
  await page.getByLabel("Values, comma-separated").fill("2.0.0");
  await page.getByRole("button", { name: "Save flag" }).click();
  await status().filter({ hasText: "saved checkout" }).waitFor();

  // The live view, while `vane watch` is connected: toggle and see its ack counted.
  const live = await context.newPage();
  live.on("pageerror", (e) => errors.push(`live page error: ${e.message}`));
  await live.goto(`${base}/#/env/prod/live`);
  await live.locator("#session-count").filter({ hasText: /^[1-9]/ }).waitFor();
  await page.goto(`${base}/#/env/prod/flags`);
  await page.getByRole("switch", { name: "checkout on" }).click();
  await status().filter({ hasText: "checkout off at version" }).waitFor();
  const version = (await status().textContent()).match(/version (\d+)/)[1];
  const figure = live.locator(`figure[data-version="${version}"]`);
  await figure.locator(".acked").filter({ hasText: /^1 of 1$/ }).waitFor();
  await live.screenshot({ path: `${shots}/live.png`, fullPage: true });
  step("live view counted the ack", { version: Number(version), acked: await figure.locator(".acked").textContent() });
  await live.close();

  // SDK keys: a new one's secret is shown once; a revoked one disappears.
  await page.goto(`${base}/#/env/prod/keys`);
  await page.getByLabel("Kind").selectOption("mobile");
  await page.getByRole("button", { name: "Create key" }).click();
  const secret = await page.locator("#new-secret").inputValue();
  if (!secret.startsWith("vane_mob_")) throw new Error(`a mobile secret: ${secret}`);
  await shot("keys");
  const id = await page.locator("tbody tr").filter({ hasText: "mobile" }).locator("th").textContent();
  await page.getByRole("button", { name: `Revoke ${id}` }).click();
  await page.locator(`tr[data-key="${id}"]`).waitFor({ state: "detached" });
  step("revoked key disappeared", { id });

  // Evaluate and the audit log.
  await page.goto(`${base}/#/env/prod/evaluate`);
  await page.getByLabel("Flag").selectOption("checkout");
  await page.getByLabel("Context (JSON)").fill('{"key": "user-1", "country": "de"}');
  await page.getByRole("button", { name: "Evaluate" }).click();
  await page.locator("dl.answer dt").first().waitFor();
  await shot("evaluate");
  await page.goto(`${base}/#/env/prod/audit`);
  await page.locator("tbody tr").first().waitFor();
  await shot("audit");
  step("evaluate and audit shown");

  // Segments: a refused definition is marked, a valid one saved; admin tokens.
  await page.goto(`${base}/#/env/prod/segments`);
  await page.getByLabel("Key").fill("staff");
  await page.getByLabel("Definition").fill('{"included": ["u-boss"], "rules": [{"clauses": [{"attribute": "age", "op": "gt", "values": ["old"]}]}]}');
  await page.getByRole("button", { name: "Save segment" }).click();
  await page.locator('#segment-body[aria-invalid="true"]').waitFor();
  const segmentError = await page.locator("#segment-error").textContent();
  if (!segmentError.includes("rules[0].clauses[0].values[0]")) throw new Error(`the segment error names the field: ${segmentError}`);
  await page.getByLabel("Definition").fill('{"included": ["u-boss"], "rules": [{"clauses": [{"attribute": "age", "op": "gt", "values": [65]}]}]}');
  await page.getByRole("button", { name: "Save segment" }).click();
  await status().filter({ hasText: "saved staff" }).waitFor();
  await page.getByRole("link", { name: "staff" }).waitFor();
  await shot("segments");
  await page.goto(`${base}/#/tokens`);
  await page.getByLabel("Name").fill("alice");
  await page.getByRole("button", { name: "Create token" }).click();
  if (!(await page.locator("#token-secret").inputValue()).startsWith("vane_adm_")) throw new Error("a token secret");
  await shot("tokens");
  step("segments and tokens");

  // A clone shows its progress, then ready.
  await page.goto(`${base}/#/`);
  await page.getByLabel("From").selectOption("prod");
  await page.getByLabel("New name").fill("staging");
  await page.getByRole("button", { name: "Clone" }).click();
  const row = page.locator('tr[data-env="staging"]');
  await row.locator("progress").waitFor();
  await shot("clone-progress");
  const seen = Number(await row.locator("progress").getAttribute("value"));
  await page.locator('tr[data-env="staging"][data-state="ready"]').waitFor({ timeout: 30_000 });
  await shot("clone-ready");
  step("clone showed progress, then ready", { copied_when_seen: seen });

  // Readable at phone width: nothing wider than the screen.
  await page.setViewportSize({ width: 375, height: 800 });
  await page.goto(`${base}/#/env/prod/flags`);
  await page.locator('tr[data-flag="checkout"]').waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await shot("phone");
  if (overflow > 1) throw new Error(`the flags page is ${overflow}px wider than a phone`);
  step("phone width");

  if (errors.length) throw new Error(errors.join("\n"));
  step("done");
} catch (e) {
  console.log(JSON.stringify({ step: "failed", error: String(e?.stack ?? e), page_errors: errors }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
