// The PARAM MONITOR tab. TensorBoard imports this module into an iframe whose <base> is the
// plugin's route prefix and calls render(); every request below is relative to that prefix, and
// model.js/views.js are served next to it. TensorBoard tells an iframed plugin neither which runs
// are selected nor when its reload button is pressed, so the tab has its own run selector and its
// own auto-refresh timer; a refresh keeps the filter, the zoom of every chart, the scales chosen,
// and the open groups and rows. The state is kept on window.__paramMonitorState, so tests (and
// curious users) can read what is plotted and how long it took.
//
// index.js: state, controls, the order of the page.  model.js: data.  views.js: drawing.

import {familySpec, getJson, heatmapFamilies, runColour} from './model.js';
import {drawGroups, drawHealth, drawHeatmap, drawRow, drawTable, el, note, statusNotes} from './views.js';

const REFRESH_SECONDS = 30;
const started = performance.now();

const state = {
  runs: [], selected: [], families: [], filter: '', smoothing: 0, layout: 'side', autoRefresh: true,
  metric: {}, data: {}, zoom: {}, scales: {}, openGroups: {}, openTensor: {}, openRow: {}, compareRow: null,
  ready: false, errors: [], drawMs: {}, firstScreenMs: null, refreshes: 0, marks: {},
};
// milliseconds since the module started, of the first time each step of the first screen was reached
const mark = (name) => { if (!(name in state.marks)) state.marks[name] = Math.round(performance.now() - started); };
window.__paramMonitorState = state;

function runContext(run) {
  for (const key of ['zoom', 'scales', 'openTensor']) state[key][run] = state[key][run] || {};
  state.openGroups[run] = state.openGroups[run] || new Set();
  const data = state.data[run];
  return {
    run, filter: state.filter, smoothing: state.smoothing, zoom: state.zoom[run], scales: state.scales[run],
    openGroups: state.openGroups[run], openTensor: state.openTensor[run],
    spikes: data?.info?.spike_steps || [],  // marked on every time axis of the run
    sharedView: async (name) => {
      data.shared = data.shared || {};
      if (!data.shared[name]) data.shared[name] = (await getJson('shared', {run, name})).shared[0];
      return data.shared[name];
    },
  };
}

// A run's first-screen data, fetched once (the promise is kept: render() starts it while plotly.js
// loads, and drawRun() waits for the same fetch).
function fetchRun(run) {
  const data = state.data[run] || (state.data[run] = {});
  if (!data.loading) {
    // the heatmap the reader last chose (grad_norm at first) is fetched at once, not after the run's
    // description: on 1,000 tensors each read takes about a second
    const metric = state.metric[run] || 'grad_norm';
    data.heatmaps = {};
    const early = getJson('heatmap', {run, metric}).then((h) => { data.heatmaps[metric] = h; mark('heatmap fetched'); },
      () => null);
    const timed = (route, name) => getJson(route, {run}).then((r) => { mark(name); return r; });
    data.loading = Promise.all(
      [timed('run', 'run fetched'), timed('groups', 'groups fetched'), timed('health', 'health fetched'), early],
    ).then(([info, groups, health]) => Object.assign(data, {info, groups, health}));
    data.loading.catch(() => { data.loading = null; });  // a failed fetch is tried again on the next draw
  }
  return data.loading;
}

async function heatmapData(run, metric) {
  const data = state.data[run];
  data.heatmaps = data.heatmaps || {};
  if (!data.heatmaps[metric]) data.heatmaps[metric] = await getJson('heatmap', {run, metric});
  return data.heatmaps[metric];
}

async function seriesData(run, name) {
  const data = state.data[run];
  data.series = data.series || {};
  if (!data.series[name]) data.series[name] = await getJson('series', {run, name});
  return data.series[name];
}

function section(title, cls, ...children) {
  return el('section', {class: cls}, el('h2', {}, title), ...children);
}

function orderNote(info) {
  return note(info.has_metadata
    ? 'Order everywhere: parameters as the model registers them (a module\'s weight before its bias), ' +
      'uses in call order, groups in model order.'
    : 'Order: by module name, weights before biases (this run has no run metadata to give the model\'s order).',
  'note order');
}

async function pickRow(run, name) {
  if (state.layout === 'overlay') {
    state.compareRow = name;
    await drawCompare();
    document.querySelector('.compare')?.scrollIntoView({block: 'nearest'});
    return;
  }
  state.openRow[run] = name;
  const column = [...document.querySelectorAll('.run')].find((c) => c.dataset.run === run);
  const holder = column && column.querySelector('.row-chart');
  if (holder) {
    await drawRow(holder, name, [{run, colourIndex: 0, data: await seriesData(run, name)}],
      heatmapFamilies(state.families), runContext(run));
  }
}

async function drawRun(column, run) {
  const t0 = performance.now();
  column.replaceChildren(el('h1', {class: 'run-name'}, run));
  try {
    const data = await fetchRun(run);
    const {info} = data;
    const ctx = runContext(run);
    column.append(orderNote(info), ...statusNotes(info));
    if (info.nonfinite.length) {
      const box = el('div', {class: 'nonfinite'});
      for (const record of info.nonfinite) box.insertAdjacentHTML('beforeend', record.html);
      column.append(section('Non-finite gradients', 'nonfinite-record', box));
    }
    if (info.spikes.length) {
      const box = el('div', {class: 'spikes'});
      for (const record of info.spikes) box.insertAdjacentHTML('beforeend', record.html);
      column.append(section('Gradient spikes', 'spikes-record', box));
    }
    const groups = section('Shared parameters: how the uses share the gradient', 'overview');
    const health = section('Layers to look at', 'health');
    const heat = section('Layer health: one row per parameter, one column per logged step', 'heatmaps');
    const table = section('Parameters', 'table');
    column.append(groups, health, heat, table);
    const heatmapDone = drawHeatmapSection(heat, run, info, ctx);
    if (info.status.steps_logged) drawHealth(health, data.health, ctx, (name) => pickRow(run, name));
    else health.append(note('Nothing to check before the first logged step.'));
    await Promise.all([drawGroups(groups, info, data.groups.groups, ctx).then(() => mark('groups drawn')),
      heatmapDone.then(() => mark('heatmap drawn'))]);
    drawTable(table, info, ctx);  // below the first screen: after it (1,000 rows)
    mark('table drawn');
  } catch (error) {
    state.errors.push(String(error));
    column.append(el('p', {class: 'error'}, String(error)));
  }
  state.drawMs[run] = Math.round(performance.now() - t0);
}

async function drawHeatmapSection(heat, run, info, ctx) {
  const available = heatmapFamilies(state.families).filter((f) => info.rows[f.name]);
  if (!available.length) {
    heat.append(note(info.status.no_step_logged ? 'No heatmap before the first logged step.'
      : 'No per-parameter family in this run.'));
    return;
  }
  if (!available.some((f) => f.name === state.metric[run])) state.metric[run] = available[0].name === 'weight_mean'
    ? (available.find((f) => f.name === 'grad_norm') || available[0]).name : available[0].name;
  const buttons = el('div', {class: 'metric-buttons'});
  const holder = el('div', {class: 'heatmap-holder'});
  const rowChart = el('div', {class: 'row-chart'});
  heat.append(buttons, holder, rowChart);
  const show = async () => {
    for (const b of buttons.children) b.classList.toggle('active', b.dataset.metric === state.metric[run]);
    const spec = familySpec(state.families, state.metric[run]);
    await drawHeatmap(holder, info, await heatmapData(run, spec.name), spec, ctx, (name) => pickRow(run, name));
  };
  for (const family of available) {
    buttons.append(el('button', {'data-metric': family.name, title: family.meaning, onclick: async () => {
      state.metric[run] = family.name;
      await show();
    }}, family.name));
  }
  await show();
  if (state.layout === 'side' && state.openRow[run]) await pickRow(run, state.openRow[run]);
}

async function drawCompare() {
  const box = document.querySelector('.compare');
  if (!box) return;
  box.replaceChildren();
  if (!state.compareRow) {
    box.append(note('Runs overlaid: click a heatmap row or a layer to look at, and its charts appear here with ' +
      'one colour per run.'));
    return;
  }
  const entries = [];
  for (const [i, run] of state.selected.entries()) {
    if (!state.data[run]?.info) continue;
    const data = await seriesData(run, state.compareRow);
    if (Object.keys(data.series).length) entries.push({run, colourIndex: i, data});
  }
  // overlaid runs: the spikes of each (a line per step, whichever run it is from)
  const spikes = [...new Set(entries.flatMap((e) => state.data[e.run].info.spike_steps || []))].sort((a, b) => a - b);
  const ctx = {...runContext('compare'), run: 'compare', spikes};
  await drawRow(box, state.compareRow, entries, heatmapFamilies(state.families), ctx);
}

async function drawAll() {
  state.ready = false;
  const t0 = performance.now();
  const scroll = window.scrollY;
  const columns = document.getElementById('columns');
  columns.replaceChildren();
  const overlay = state.layout === 'overlay';
  const count = overlay ? 1 : Math.max(1, Math.min(2, state.selected.length));
  columns.style.gridTemplateColumns = `repeat(${count}, minmax(0, 1fr))`;
  if (!state.runs.length) {
    columns.append(el('div', {class: 'empty'}, el('strong', {}, 'No run holds param_monitor data yet. '),
      'Train with ParameterMonitor (Lightning) or PlainMonitor (a plain PyTorch loop); ' +
      'the tab refreshes by itself.'));
  }
  let target = columns;
  if (overlay && state.selected.length) {
    target = el('div', {class: 'run-stack'});
    columns.append(section('Runs overlaid', 'compare-section', el('div', {class: 'compare'})), target);
  }
  await Promise.all(state.selected.map((run) => {
    const column = el('div', {class: 'run', 'data-run': run});
    target.append(column);
    return drawRun(column, run);
  }));
  if (overlay) await drawCompare();
  window.scrollTo(0, scroll);
  state.drawMs.all = Math.round(performance.now() - t0);
  if (state.firstScreenMs === null) state.firstScreenMs = Math.round(performance.now() - started);
  state.ready = true;
}

function drawSelector() {
  const box = document.getElementById('run-selector');
  box.replaceChildren(el('span', {class: 'label'}, 'Runs:'));
  for (const [i, {name}] of state.runs.entries()) {
    const input = el('input', {type: 'checkbox', value: name});
    input.checked = state.selected.includes(name);
    input.addEventListener('change', () => {
      state.selected = state.runs.map((r) => r.name).filter((r) =>
        box.querySelector(`input[value="${CSS.escape(r)}"]`).checked);
      drawAll();
    });
    // the run's colour where runs are overlaid
    box.append(el('label', {style: `border-bottom: 3px solid ${runColour(i)}`}, input, name));
  }
}

// Fetch the run list and redraw; cached data is dropped, what the reader chose is kept.
async function refresh() {
  const known = new Set(state.runs.map((r) => r.name));
  state.runs = (await getJson('runs')).runs;
  const names = state.runs.map((r) => r.name);
  state.selected = names.filter((r) => state.selected.includes(r) || !known.has(r));  // new runs: shown
  state.data = {};
  state.refreshes += 1;
  drawSelector();
  await drawAll();
}

function controls() {
  const filter = el('input', {id: 'filter', type: 'search', placeholder: 'filter parameters and groups (words in the name)'});
  let timer = null;
  filter.addEventListener('input', (event) => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.filter = event.target.value; drawAll(); }, 250);
  });
  const smoothing = el('input', {id: 'smoothing', type: 'range', min: '0', max: '0.99', step: '0.01', value: '0'});
  const smoothingValue = el('span', {class: 'value'}, '0');
  smoothing.addEventListener('change', () => {
    state.smoothing = Number(smoothing.value);
    smoothingValue.textContent = smoothing.value;
    drawAll();
  });
  const layout = el('select', {id: 'layout'}, el('option', {value: 'side'}, 'runs side by side'),
    el('option', {value: 'overlay'}, 'runs overlaid'));
  layout.addEventListener('change', () => { state.layout = layout.value; drawAll(); });
  const auto = el('input', {id: 'auto-refresh', type: 'checkbox'});
  auto.checked = state.autoRefresh;
  auto.addEventListener('change', () => { state.autoRefresh = auto.checked; });
  return el('header', {},
    el('div', {id: 'run-selector'}),
    filter,
    el('label', {class: 'control', title: 'TensorBoard\'s smoothing: a debiased moving average of line charts'},
      'smoothing ', smoothing, smoothingValue),
    layout,
    el('label', {class: 'control', title: `reload the data every ${REFRESH_SECONDS} s, keeping zoom, filter and open rows`},
      auto, `auto-refresh (${REFRESH_SECONDS} s)`),
    el('button', {id: 'reload', onclick: () => refresh()}, 'reload'));
}

export async function render() {
  const style = el('link', {rel: 'stylesheet', href: 'static/style.css'});
  const styled = new Promise((resolve) => { style.onload = resolve; style.onerror = resolve; });
  document.head.append(style);
  document.body.append(controls(), el('main', {id: 'columns'}));
  try {
    const plotly = new Promise((resolve, reject) => {
      const script = el('script', {src: 'plotly.min.js'});
      script.onload = resolve;
      script.onerror = () => reject(new Error('could not load plotly.min.js'));
      document.head.append(script);
    });
    // the runs' data is fetched while plotly.js (3.5 MB) loads: on a big run both take a second or more
    const runs = getJson('runs').then((r) => {
      mark('runs fetched');
      for (const {name} of r.runs) fetchRun(name).catch(() => null);  // errors are shown by drawRun
      return r;
    });
    const [families, listed] = await Promise.all([getJson('families'), runs, plotly.then(() => mark('plotly loaded')), styled]);
    state.families = families.families;
    state.runs = listed.runs;
    state.selected = state.runs.map((r) => r.name);  // all selected, so the tab shows something at once
    drawSelector();
    await drawAll();
  } catch (error) {
    state.errors.push(String(error));
    document.getElementById('columns').append(el('p', {class: 'error'}, String(error)));
    state.ready = true;
  }
  setInterval(() => {
    if (state.autoRefresh && state.ready && !document.hidden) refresh().catch((e) => state.errors.push(String(e)));
  }, REFRESH_SECONDS * 1000);
}
