// What a newcomer meets besides a loaded graph, read from the real frontend for tests/test_frontend.py
// (called by load_workflows.cjs; every function here runs in the page and only reports, the test asserts):
// the layout of a loaded workflow as the frontend draws it, its read-me note as opened by a user, the node
// search, the Templates browser.
'use strict';

// After loadGraphData: wait until every LoadImage shows its picture (the node grows to fit it), then report
// in graph units every node's rectangle with its title bar, the minimum size the frontend computes for it,
// for notes the height their text needs (more means the note scrolls), every group's rectangle, and the
// screen rectangles of the frontend's bars that float over the canvas.
async function readLayoutInPage() {
  const app = window.app;
  const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
  const deadline = Date.now() + 10_000;
  const picturesShown = () => app.graph.nodes.filter((n) => n.type === 'LoadImage')
    .every((n) => n.imgs && n.imgs.length && n.imgs.every((img) => img.complete));
  while (!picturesShown() && Date.now() < deadline) await new Promise((done) => setTimeout(done, 100));
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));

  const nodes = app.graph.nodes.map((node) => {
    const report = {
      id: node.id, type: node.type, title: node.title,
      size: [...node.size],
      rect: [node.pos[0], node.pos[1] - titleHeight, node.size[0], node.size[1] + titleHeight],
      minSize: [...node.computeSize()],
    };
    const text = node.type === 'MarkdownNote' || node.type === 'Note'
      ? (node.widgets || []).find((w) => w.element) : null;
    if (text) {
      // The text's height in unscaled CSS pixels, which are graph units (the DOM widget is scaled with the
      // canvas by a transform), plus what the node needs around its widget.
      const box = text.element;
      const last = (box.querySelector('.ProseMirror') || box).lastElementChild;
      const shown = box.getBoundingClientRect();
      const toUnscaled = box.offsetHeight / shown.height;
      const textBottom = last ? (last.getBoundingClientRect().bottom - shown.top) * toUnscaled : 0;
      report.textHeight = Math.ceil(textBottom + parseFloat(getComputedStyle(box).paddingBottom || '0')
        + (node.size[1] - box.offsetHeight));
      // The smallest font of its text, in unscaled CSS pixels (on screen: times the canvas scale).
      report.fontSize = Math.min(...[...box.querySelectorAll('.ProseMirror *')]
        .filter((element) => element.textContent.trim()).map((element) => parseFloat(getComputedStyle(element).fontSize)));
    }
    return report;
  });
  const measure = document.createElement('canvas').getContext('2d');
  const groups = app.graph.groups.map((group) => {
    // As LGraphGroup.draw writes the title: at padding from the left, in the group font.
    measure.font = `${group.font_size || window.LiteGraph.DEFAULT_GROUP_FONT_SIZE}px ${window.LiteGraph.GROUP_FONT}`;
    const titleRight = group.constructor.padding + measure.measureText(group.title).width;
    return { title: group.title, rect: [...group._bounding], titleRight };
  });
  const rectOf = (selector) => {
    const element = document.querySelector(selector);
    if (!element) return null;
    const { left, top, right, bottom } = element.getBoundingClientRect();
    return { left, top, right, bottom };
  };
  const overlays = {
    tabBar: rectOf('.workflow-tabs-container'),
    sideBar: rectOf('.side-toolbar-container'),
    workflowTitle: rectOf('.subgraph-breadcrumb .p-breadcrumb-item'),
    runBar: rectOf('.actionbar-container'),
  };
  return { nodes, groups, overlays };
}

// After a user opened a workflow (its saved view applied): where its read-me note shows on the screen. Its
// title bar (drawn on the canvas), its first block (a demo copy's DEMO banner) and its text, each checked at
// a few points with elementFromPoint: what covers them there (a side bar, a bar of the frontend), or nothing;
// the canvas scale and the note's smallest font (its text's size on screen is their product).
function readOpenedNoteInPage() {
  const app = window.app;
  const { scale, offset } = app.canvas.ds;
  const canvasBox = app.canvas.canvas.getBoundingClientRect();
  const note = app.graph.nodes.find((node) => node.type === 'MarkdownNote' || node.type === 'Note');
  const box = note.widgets.find((widget) => widget.element).element;
  const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
  const title = {
    left: canvasBox.left + (note.pos[0] + offset[0]) * scale,
    top: canvasBox.top + (note.pos[1] - titleHeight + offset[1]) * scale,
  };
  title.right = title.left + note.size[0] * scale;
  title.bottom = title.top + titleHeight * scale;
  const rectOf = (element) => {
    const { left, top, right, bottom } = element.getBoundingClientRect();
    return { left, top, right, bottom };
  };
  const text = (box.querySelector('.ProseMirror') || box);
  const firstBlock = rectOf(text.firstElementChild);
  const body = rectOf(box);
  const describe = (element) => (element ? `${element.tagName.toLowerCase()}.${String(element.className).split(' ')[0]}` : 'outside the window');
  const covered = [];
  const probe = (what, rect, isOwn) => {
    const inset = 3;
    const points = [[rect.left + inset, rect.top + inset], [rect.right - inset, rect.top + inset],
      [(rect.left + rect.right) / 2, (rect.top + rect.bottom) / 2],
      [rect.left + inset, rect.bottom - inset], [rect.right - inset, rect.bottom - inset]];
    for (const [x, y] of points) {
      const hit = document.elementFromPoint(x, y);
      if (!hit || !isOwn(hit)) covered.push(`${what} at (${Math.round(x)}, ${Math.round(y)}) under ${describe(hit)}`);
    }
  };
  probe('title bar', title, (hit) => hit === app.canvas.canvas);
  probe('first block', firstBlock, (hit) => box.contains(hit));
  probe('text', body, (hit) => box.contains(hit));
  const fontSize = Math.min(...[...text.querySelectorAll('*')].filter((element) => element.textContent.trim())
    .map((element) => parseFloat(getComputedStyle(element).fontSize)));
  return { scale, fontSize, title, firstBlock, body, covered, firstBlockText: text.firstElementChild.textContent,
    window: [window.innerWidth, window.innerHeight] };
}

// Shows the graph with a saved view ({offset, scale}), as loadGraphData does when it restores one.
async function showViewInPage(ds) {
  const canvas = window.app.canvas;
  canvas.ds.offset = [...ds.offset];
  canvas.ds.scale = ds.scale;
  canvas.setDirty(true, true);
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
}

// The node search box's own search (its service, limit and options) for each query: node ids found.
function searchNodesInPage(queries) {
  const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
  const service = pinia._s.get('nodeDef').nodeSearchService;
  return Object.fromEntries(queries.map((query) => [query,
    service.searchNode(query, [], { limit: 64 }, { matchWildcards: false }).map((def) => def.name)]));
}

// The Templates browser's data: the templates the server lists per custom node folder, and for each one
// of `module` what its thumbnail URL (built as the browser builds it) answers.
async function templatesInPage(module) {
  const { api } = window.comfyAPI.api;
  const listed = await (await api.fetchApi('/workflow_templates')).json();
  const thumbnails = {};
  for (const name of listed[module] || []) {
    const response = await fetch(api.apiURL(`/workflow_templates/${module}/${name}`) + '.jpg');
    const blob = await response.blob();
    let size = null;
    try {
      const bitmap = await createImageBitmap(blob);
      size = [bitmap.width, bitmap.height];
    } catch (err) { /* not an image: size stays null */ }
    thumbnails[name] = { status: response.status, contentType: response.headers.get('content-type'), size };
  }
  return { listed, thumbnails };
}

module.exports = { readLayoutInPage, readOpenedNoteInPage, showViewInPage, searchNodesInPage, templatesInPage };
