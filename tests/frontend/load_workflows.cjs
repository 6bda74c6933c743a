// Loads workflows into the real ComfyUI frontend in Debian's headless chromium (driven by playwright-core)
// and reports, per workflow, what the frontend itself saw: missing node types, missing models, the API
// prompt from its own graphToPrompt(), and a screenshot. Run by tests/test_frontend.py, which starts the
// server, validates the prompts and asserts; this script only drives the browser.
//
// usage: node load_workflows.cjs <request.json>
//   request: {url, playwright, chromium, userDataDir, newcomerDataDir, results, workflows: [{name, path,
//   screenshot}], searches, templateModule, templatesScreenshot, demo: {folder, workflows: [{name, screenshot}]}}
//   writes `results`: {blockedRequests, pageErrors, workflows: [{name, nodeCount, loadedNodeCount,
//   unregisteredTypes, missingNodeTypes, missingModels (null where the frontend does not expose it),
//   comboValuesNotOffered, prompt, consoleErrors, screenshot, layout}], search,
//   templates: {listed, thumbnails, browsed: {opened, sorted}},
//   demo: {name: {note, layout}}}
'use strict';

const fs = require('fs');
const path = require('path');
const {
  readLayoutInPage, readOpenedNoteInPage, showViewInPage, searchNodesInPage, templatesInPage,
} = require('./ui_checks.cjs');

const STARTUP_TIMEOUT_MS = 60_000;

// As asked for the project: nothing leaves the loopback interface, no GPU, no first-run or sync traffic.
const CHROMIUM_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

function isLoopback(url) {
  const { protocol, hostname } = new URL(url);
  if (protocol === 'data:' || protocol === 'blob:') return true;
  return hostname === '127.0.0.1' || hostname === 'localhost' || hostname === '[::1]';
}

// In the page: record what loadGraphData found missing. Missing node types come from the extension hook
// `afterConfigureGraph(missingNodeTypes)`, which every frontend calls after a load. Missing models have no
// such hook: where the app exposes its reporter `showMissingModelsError` we wrap it (its dialog still
// opens, so a screenshot shows it); frontends that keep it private (1.27.x) leave `missingModels` null,
// "not observable", and the test checks instead that the workflow embeds no model list to report on.
function installReporters() {
  const app = window.app;
  window.__frontendTest = { missingNodeTypes: [], missingModels: null };
  app.registerExtension({
    name: 'personalization_nodes.tests.missing_node_reporter',
    afterConfigureGraph(types) {
      window.__frontendTest.missingNodeTypes.push(...types.map((t) => (typeof t === 'string' ? t : `${t.type} (${t.hint})`)));
    },
  });
  window.__frontendTest.modelsObservable = typeof app.showMissingModelsError === 'function';
  if (window.__frontendTest.modelsObservable) {
    const showModels = app.showMissingModelsError.bind(app);
    app.showMissingModelsError = (models, paths) => {
      window.__frontendTest.missingModels.push(...models.map((m) => `${m.directory}/${m.name}`));
      return showModels(models, paths);
    };
  }
}

async function loadInPage({ name, workflow }) {
  const app = window.app;
  window.__frontendTest.missingNodeTypes = [];
  window.__frontendTest.missingModels = window.__frontendTest.modelsObservable ? [] : null;
  // Without a saved view offset the frontend fits the view to the graph, so the screenshot shows all of it.
  if (workflow.extra) delete workflow.extra.ds;
  await app.loadGraphData(workflow, true, true, name);
  const { output } = await app.graphToPrompt();
  // A choice the widget does not offer, e.g. a sampler name shifted into the scheduler widget. The server
  // checks this only for V1 combos, so it is checked here for all. File names are left to the server's
  // validation: whether a model is installed depends on the machine, not on the workflow.
  const fileName = /\.(safetensors|ckpt|pt|pth|bin|png|jpe?g|webp)$/i;
  const offChoices = [];
  for (const node of app.graph.nodes) {
    for (const widget of node.widgets || []) {
      let choices = widget.type === 'combo' ? widget.options && widget.options.values : null;
      if (typeof choices === 'function') choices = choices(widget, node);
      if (!Array.isArray(choices) || choices.includes(widget.value)) continue;
      if (typeof widget.value === 'string' && fileName.test(widget.value)) continue;
      offChoices.push(`${node.type} #${node.id} ${widget.name}=${JSON.stringify(widget.value)}`);
    }
  }
  return {
    comboValuesNotOffered: offChoices,
    loadedNodeCount: app.graph.nodes.length,
    unregisteredTypes: app.graph.nodes.map((n) => n.type).filter((t) => !(t in window.LiteGraph.registered_node_types)),
    missingNodeTypes: window.__frontendTest.missingNodeTypes,
    missingModels: window.__frontendTest.missingModels,
    prompt: output,
  };
}

// A fresh browser profile on the server, as a user's first visit: the first-run banner ("Introducing Nodes
// 2.0") stays, as users see it; nothing is fetched from outside the loopback interface (counted in
// report.blockedRequests), page errors land in report.pageErrors.
async function openFrontend(request, userDataDir, report) {
  const { chromium } = require(request.playwright);
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: request.chromium,
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: { width: 1600, height: 1000 },
  });
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (isLoopback(url)) return route.continue();
    report.blockedRequests.push(url);
    return route.abort('blockedbyclient');
  });
  const page = context.pages()[0] || (await context.newPage());
  page.on('pageerror', (err) => report.pageErrors.push(String(err && err.stack || err)));
  await page.goto(request.url, { waitUntil: 'load', timeout: STARTUP_TIMEOUT_MS });
  // window.app is set once app.setup() has registered every node definition from /object_info.
  await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas,
    null, { timeout: STARTUP_TIMEOUT_MS });
  return { context, page };
}

// As a user opens the demo copies (README): the Workflows sidebar, the demo folder, then each file; the
// sidebar stays open. Reports where each one's read-me note shows, and its layout, with a screenshot.
async function openDemoCopies(page, demo) {
  await page.click('.workflows-tab-button');
  await page.getByText(demo.folder, { exact: true }).click();
  const seen = {};
  for (const { name, screenshot } of demo.workflows) {
    await page.getByText(`${name}.json`, { exact: true }).click();
    await page.waitForFunction((file) => {
      const workflow = window.app.extensionManager.workflow.activeWorkflow;
      return workflow && workflow.path.endsWith(`/${file}`) && window.app.graph.nodes.some((n) => n.type === 'MarkdownNote');
    }, `${name}.json`, { timeout: STARTUP_TIMEOUT_MS });
    const layout = await page.evaluate(readLayoutInPage);
    seen[name] = { note: await page.evaluate(readOpenedNoteInPage), layout };
    fs.mkdirSync(path.dirname(screenshot), { recursive: true });
    await page.screenshot({ path: screenshot });
  }
  return seen;
}

// The Templates browser as users browse it: the pack's category as it opens (sorted "Newest"), then sorted
// with Sort by → "A → Z" (the README's advice), then a screenshot. The cards in order (template name, text
// shown) each time. Frontends without a Sort by control (1.25, the oldest ComfyUI's) report the cards as
// opened and `sorted: null`.
async function browseTemplates(page, module, screenshot) {
  await page.click('.templates-tab-button');
  const dialog = page.locator('[role=dialog]');
  // a span in the category list of 1.32, a listbox option in 1.25's
  await dialog.getByText(module, { exact: true }).first().click();
  const cards = dialog.locator('[data-testid^="template-workflow-"]');
  await cards.first().waitFor();
  const read = () => cards.evaluateAll((elements) => elements.map((element) => ({
    name: element.dataset.testid.replace('template-workflow-', ''), text: element.innerText })));
  const sortBy = dialog.locator('[aria-label="Sort by"]');
  if (await sortBy.count() === 0) {
    await page.screenshot({ path: screenshot });
    return { opened: { sortBy: null, cards: await read() }, sorted: null };
  }
  const opened = { sortBy: await sortBy.innerText(), cards: await read() };
  await sortBy.click();
  await page.getByRole('option', { name: 'A → Z' }).click();
  await page.waitForFunction(() => document.querySelector('[role=dialog] [aria-label="Sort by"]').innerText.includes('A → Z'));
  await page.evaluate(() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done))));
  await page.screenshot({ path: screenshot });
  return { opened, sorted: { sortBy: await sortBy.innerText(), cards: await read() } };
}

async function main() {
  const request = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const report = { blockedRequests: [], pageErrors: [], workflows: [] };
  let context = null;
  try {
    let page;
    ({ context, page } = await openFrontend(request, request.userDataDir, report));
    let consoleErrors = [];
    page.on('console', (msg) => { if (msg.type() === 'error') consoleErrors.push(msg.text()); });
    await page.evaluate(installReporters);

    for (const { name, path: file, screenshot } of request.workflows) {
      consoleErrors = [];
      const workflow = JSON.parse(fs.readFileSync(file, 'utf8'));
      const seen = await page.evaluate(loadInPage, { name, workflow });
      // Two frames: the fitView and the redraw that loadGraphData schedules with requestAnimationFrame.
      await page.evaluate(() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done))));
      fs.mkdirSync(path.dirname(screenshot), { recursive: true });
      await page.screenshot({ path: screenshot });
      // ui_checks.cjs: the layout as drawn, and the view the workflow opens with (its saved one).
      seen.layout = await page.evaluate(readLayoutInPage);
      if (workflow.extra && workflow.extra.ds) {
        await page.evaluate(showViewInPage, workflow.extra.ds);
        await page.screenshot({ path: screenshot.replace(/\.png$/, '.opened.png') });
      }
      report.workflows.push({ name, nodeCount: workflow.nodes.length, ...seen, consoleErrors, screenshot });
    }
    if (request.searches) report.search = await page.evaluate(searchNodesInPage, request.searches);
    if (request.templateModule) report.templates = await page.evaluate(templatesInPage, request.templateModule);
    await context.close();
    context = null;
    // A second first visit, as a newcomer clicks through: no dialog left open, a tab bar holding only
    // what they opened (the Templates browser last: it stays open).
    ({ context, page } = await openFrontend(request, request.newcomerDataDir, report));
    if (request.demo) report.demo = await openDemoCopies(page, request.demo);
    if (request.templateModule) {
      report.templates.browsed = await browseTemplates(page, request.templateModule, request.templatesScreenshot);
    }
  } finally {
    if (context) await context.close();
    fs.writeFileSync(request.results, JSON.stringify(report, null, 1));
  }
}

main().catch((err) => {
  console.error(err && err.stack || err);
  process.exit(1);
});
