// The PARAM MONITOR tab. TensorBoard imports this module into an iframe whose <base> is the
// plugin's route prefix and calls render(); every request below is relative to that prefix.
// TensorBoard does not tell an iframed plugin which runs are selected, so the tab has its own
// selector (every run selected when it opens). The state drawn is kept on
// window.__paramMonitorState, so tests (and curious users) can read what is plotted.

const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf'];
const HEATMAPS = {
  grad_norm: {title: 'log10 gradient norm', log: true, colorscale: 'Viridis'},
  weight_norm: {title: 'log10 weight norm', log: true, colorscale: 'Cividis'},
  weight_mean: {title: 'weight mean', log: false, colorscale: 'RdBu', diverging: true},
};
const ZERO_COLOUR = '#000000';
const NONFINITE_COLOUR = '#ff00ff';
const PLOT_CONFIG = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ['select2d', 'lasso2d']};
const BASE_LAYOUT = {
  margin: {l: 60, r: 20, t: 36, b: 40},
  font: {family: 'Roboto, sans-serif', size: 11},
  paper_bgcolor: '#fff',
  plot_bgcolor: '#fff',
  hovermode: 'x unified',
  legend: {orientation: 'h', x: 0, y: 1.02, yanchor: 'bottom', traceorder: 'normal'},
};

const state = {runs: [], selected: [], filter: '', views: {}, metric: {}, ready: false, errors: []};
window.__paramMonitorState = state;

// TensorBoard's JSON writes NaN and infinities as strings: turn them back into numbers.
function revive(value) {
  if (value === 'NaN') return NaN;
  if (value === 'Infinity') return Infinity;
  if (value === '-Infinity') return -Infinity;
  if (Array.isArray(value)) return value.map(revive);
  if (value && typeof value === 'object') {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = revive(v);
    return out;
  }
  return value;
}

async function getJson(route, params = {}) {
  const query = new URLSearchParams(params).toString();
  const response = await fetch(query ? `${route}?${query}` : route);
  if (!response.ok) throw new Error(`${route}: ${response.status} ${await response.text()}`);
  return revive(await response.json());
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = el('script', {src});
    script.onload = resolve;
    script.onerror = () => reject(new Error(`could not load ${src}`));
    document.head.append(script);
  });
}

function loadStyle(href) {
  return new Promise((resolve) => {
    const link = el('link', {rel: 'stylesheet', href});
    link.onload = resolve;
    link.onerror = resolve;  // unstyled is still usable
    document.head.append(link);
  });
}

const finite = (v) => typeof v === 'number' && Number.isFinite(v);
const gap = (values) => (values || []).map((v) => (finite(v) ? v : null));  // plotly: null is a gap

function matches(name) {
  const terms = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
  const lower = name.toLowerCase();
  return terms.every((t) => lower.includes(t));
}

// -- views -------------------------------------------------------------------------------

function rowLabel(info, name) {
  const param = info.parameters.find((p) => p.name === name);
  return param && param.aliases.length ? `${name} (= ${param.aliases.join(', ')})` : name;
}

function drawShared(container, run, shared) {
  if (!shared.length) {
    container.append(el('p', {class: 'note'}, 'No shared parameter in this run.'));
    return;
  }
  for (const view of shared) {
    if (!matches(view.name)) continue;
    const card = el('div', {class: 'card'});
    container.append(card);
    card.append(el('h3', {}, `${view.name}: ${view.sites.length} uses`));
    const stackDiv = el('div', {class: 'plot stack', 'data-param': view.name});
    card.append(stackDiv);
    const traces = [];
    if (view.stack) {
      view.sites.forEach((site, i) => {
        traces.push({
          x: view.steps, y: gap(view.stack[site]), name: `use @ ${site}`, type: 'scatter', mode: 'lines',
          stackgroup: 'uses', stackgaps: 'interpolate', line: {color: PALETTE[i % PALETTE.length], width: 1},
          fillcolor: PALETTE[i % PALETTE.length] + 'aa',
          customdata: gap(view.share[site]),
          hovertemplate: `${site}: %{y:.4g} (share %{customdata:.1%})<extra></extra>`,
        });
      });
    } else {
      card.append(el('p', {class: 'note'}, 'No shared_grad_share tags in this run: the per-use norms only.'));
    }
    traces.push({
      x: view.steps, y: gap(view.grad_norm), name: 'grad_norm (the total)', type: 'scatter', mode: 'lines',
      line: {color: '#222', width: 1.5, dash: 'dot'}, hovertemplate: 'grad_norm: %{y:.4g}<extra></extra>',
    });
    card.insertBefore(el('p', {class: 'plot-title'},
      'Each use\'s share × grad_norm, stacked: the top is grad_norm. Below zero: a use pulling against the others.'),
    stackDiv);
    Plotly.newPlot(stackDiv, traces, {
      ...BASE_LAYOUT, height: 300, margin: {...BASE_LAYOUT.margin, t: 30},
      xaxis: {title: {text: 'step'}}, yaxis: {title: {text: 'gradient norm'}},
      shapes: nonfiniteShapes(view.steps, view.grad_norm),
    }, PLOT_CONFIG);

    const row = el('div', {class: 'pair'});
    const norms = el('div', {class: 'plot use-norms'});
    const checks = el('div', {class: 'plot checks'});
    row.append(norms, checks);
    card.append(row);
    const lines = view.sites.map((site, i) => ({
      x: view.steps, y: gap(view.use_norm[site]), name: `‖${site}‖`, type: 'scatter', mode: 'lines',
      line: {color: PALETTE[i % PALETTE.length], width: 1},
    }));
    lines.push({x: view.steps, y: gap(view.grad_norm), name: 'grad_norm', type: 'scatter', mode: 'lines',
                line: {color: '#222', width: 1, dash: 'dot'}});
    Plotly.newPlot(norms, lines, {
      ...BASE_LAYOUT, height: 220, xaxis: {title: {text: 'step'}}, yaxis: {title: {text: 'norm of each use'}},
    }, PLOT_CONFIG);
    const checkLines = [];
    if (view.cosine) {
      checkLines.push({x: view.steps, y: gap(view.cosine), name: 'cosine between uses', type: 'scatter',
                       mode: 'lines', line: {color: '#555', width: 1}});
    }
    if (view.error) {
      checkLines.push({x: view.steps, y: gap(view.error), name: 'error ‖Σ uses − grad‖/‖grad‖', yaxis: 'y2',
                       type: 'scatter', mode: 'lines', line: {color: '#d62728', width: 1, dash: 'dot'}});
    }
    Plotly.newPlot(checks, checkLines, {
      ...BASE_LAYOUT, height: 220, margin: {...BASE_LAYOUT.margin, r: 60},
      xaxis: {title: {text: 'step'}}, yaxis: {title: {text: 'cosine'}, range: [-1.05, 1.05]},
      yaxis2: {title: {text: 'error'}, overlaying: 'y', side: 'right', showgrid: false, exponentformat: 'e',
               rangemode: 'tozero'},
    }, PLOT_CONFIG);
  }
}

// A red band over the steps whose total is NaN/inf: a stack cannot leave a gap there.
function nonfiniteShapes(steps, totals) {
  return steps.flatMap((step, i) => (totals[i] === null || finite(totals[i]) ? [] : [{
    type: 'rect', xref: 'x', yref: 'paper', x0: i ? (steps[i - 1] + step) / 2 : step,
    x1: i + 1 < steps.length ? (steps[i + 1] + step) / 2 : step, y0: 0, y1: 1,
    fillcolor: NONFINITE_COLOUR, opacity: 0.25, line: {width: 0},
  }]));
}

function heatmapTraces(info, data, metric) {
  const spec = HEATMAPS[metric];
  const keep = data.rows.map((name, i) => [name, i]).filter(([name]) => matches(name));
  const y = keep.map(([name]) => rowLabel(info, name));
  const z = [], special = [], custom = [];
  let anySpecial = false;
  for (const [, i] of keep) {
    const values = data.values[i];
    const steps = data.cell_steps ? data.cell_steps[i] : data.steps;
    z.push(values.map((v) => (!finite(v) ? null : spec.log ? (v > 0 ? Math.log10(v) : null) : v)));
    // zero (a dead layer, on a log scale) and NaN/inf (where training broke) get colours of their own
    const marks = values.map((v) => (v === null || v === undefined ? null : !finite(v) ? 1 : spec.log && v <= 0 ? 0 : null));
    anySpecial = anySpecial || marks.some((m) => m !== null);
    special.push(marks);
    // hover: the value as logged and the step it was logged at (numbers: cheaper than 1,000 rows of strings)
    custom.push(values.map((v, j) => [v === null || v === undefined ? NaN : v, steps[j]]));
  }
  let colour = {colorscale: spec.colorscale};
  if (spec.diverging) {
    const extent = Math.max(1e-12, ...z.flat().filter(finite).map(Math.abs));
    colour = {colorscale: spec.colorscale, reversescale: true, zmid: 0, zmin: -extent, zmax: extent};
  }
  const hovertemplate = `%{y}<br>step %{customdata[1]}<br>${metric} %{customdata[0]:.6g}<extra></extra>`;
  const ygap = y.length > 80 ? 0 : 1;
  return [
    {type: 'heatmap', x: data.steps, y, z, customdata: custom, hovertemplate,
     colorbar: {title: {text: spec.title, side: 'right'}, thickness: 12}, xgap: 0, ygap, ...colour},
    {type: 'heatmap', x: data.steps, y, z: special, customdata: custom, hovertemplate,
     colorscale: [[0, ZERO_COLOUR], [1, NONFINITE_COLOUR]], zmin: 0, zmax: 1, showscale: false, ygap,
     name: 'zero / non-finite', visible: anySpecial},
  ];
}

async function drawHeatmap(container, run, view) {
  const metric = state.metric[run] || 'grad_norm';
  const key = `heatmap:${metric}`;
  if (!view[key]) view[key] = await getJson('heatmap', {run, metric});
  const data = view[key];
  container.replaceChildren();
  if (!data.rows.length) {
    container.append(el('p', {class: 'note'}, `No ${metric}/ tags in this run.`));
    return;
  }
  const [main, special] = heatmapTraces(view.info, data, metric);
  const rows = main.y.length;
  const div = el('div', {class: 'plot heatmap', 'data-metric': metric});
  container.append(div);
  await Plotly.newPlot(div, [main, special], {
    ...BASE_LAYOUT, hovermode: 'closest',
    height: Math.min(900, Math.max(180, 60 + 18 * rows)),
    margin: {l: rows > 80 ? 20 : 200, r: 20, t: 30, b: 40},
    title: {text: `${HEATMAPS[metric].title}: rows = parameters in model order; click a row`, font: {size: 12}},
    xaxis: {title: {text: 'step'}},
    yaxis: {autorange: 'reversed', automargin: true, showticklabels: rows <= 80, tickfont: {size: 10}},
  }, PLOT_CONFIG);
  div.on('plotly_click', (event) => {
    const index = main.y.indexOf(event.points[0].y);
    const name = data.rows.filter((n) => matches(n))[index];
    if (name) drawRow(container.parentNode.querySelector('.row-chart'), run, name);
  });
  const note = data.cell_steps ? ` ${data.steps.length} columns, each a span of steps (the cell: its last value, or its first NaN/inf).` : '';
  container.append(el('p', {class: 'note'},
    `Black: exactly zero (a dead layer). Magenta: NaN or infinite (where training broke).${note}`));
}

async function drawRow(container, run, name) {
  container.replaceChildren(el('p', {class: 'note'}, `loading ${name}…`));
  const data = await getJson('series', {run, name});
  state.views[run].row = data;
  container.replaceChildren();
  const traces = Object.entries(data.series).map(([metric, s], i) => ({
    x: s.steps, y: gap(s.values), name: metric, type: 'scatter', mode: 'lines',
    line: {color: PALETTE[i % PALETTE.length], width: 1.5}, yaxis: i ? `y${i + 1}` : 'y',
  }));
  const layout = {...BASE_LAYOUT, height: 260, title: {text: name, font: {size: 12}},
                  xaxis: {title: {text: 'step'}, domain: [0, 0.8]}};
  traces.forEach((t, i) => {
    const axis = {title: {text: t.name, font: {color: t.line.color}}, showgrid: i === 0};
    if (i) Object.assign(axis, {overlaying: 'y', side: 'right', anchor: 'free', position: 0.8 + 0.07 * (i - 1)});
    layout[i ? `yaxis${i + 1}` : 'yaxis'] = axis;
  });
  const div = el('div', {class: 'plot row'});
  container.append(div);
  await Plotly.newPlot(div, traces, layout, PLOT_CONFIG);
}

function drawTable(container, info) {
  if (!info.parameters.length) {
    container.append(el('p', {class: 'note'}, 'No parameter table in this run (written when log_summary=True).'));
    return;
  }
  const shown = info.parameters.filter((p) => matches(p.name));
  const table = el('table', {class: 'params'});
  table.append(el('thead', {}, el('tr', {}, ...['name', 'shape', 'numel', 'tied aliases', 'call sites']
    .map((h) => el('th', {}, h)))));
  const body = el('tbody');
  for (const p of shown) {
    const shape = p.shape === null ? 'uninitialized' : p.shape.length ? p.shape.join('×') : 'scalar';
    body.append(el('tr', {class: p.call_sites.length > 1 ? 'shared' : ''},
      el('td', {}, p.name), el('td', {}, shape), el('td', {class: 'num'}, p.numel.toLocaleString('en')),
      el('td', {}, p.aliases.join(', ') || '–'), el('td', {}, p.call_sites.join(', ') || '–')));
  }
  table.append(body);
  const total = info.parameters.reduce((sum, p) => sum + p.numel, 0);
  container.append(table, el('p', {class: 'note'},
    `${shown.length} of ${info.parameters.length} parameters shown; ${total.toLocaleString('en')} values (tied tensors once).`));
}

function section(title, ...children) {
  return el('section', {}, el('h2', {}, title), ...children);
}

async function drawRun(column, run) {
  const view = state.views[run] || (state.views[run] = {});
  column.replaceChildren(el('h1', {class: 'run-name'}, run));
  try {
    if (!view.info) {
      [view.info, view.shared] = await Promise.all([getJson('run', {run}), getJson('shared', {run})]);
    }
    if (view.info.nonfinite.length) {
      const box = el('div', {class: 'nonfinite'});
      for (const record of view.info.nonfinite) box.insertAdjacentHTML('beforeend', record.html);
      column.append(section('Non-finite gradients', box));
    }
    const shared = el('div');
    column.append(section('Shared parameters: how the uses add up to the gradient', shared));
    drawShared(shared, run, view.shared.shared);

    const buttons = el('div', {class: 'metric-buttons'});
    const heat = el('div');
    for (const metric of Object.keys(HEATMAPS)) {
      const active = (state.metric[run] || 'grad_norm') === metric;
      buttons.append(el('button', {class: active ? 'active' : '', onclick: () => {
        state.metric[run] = metric;
        drawRun(column, run);
      }}, metric));
    }
    column.append(section('Gradient flow', buttons, heat, el('div', {class: 'row-chart'})));
    await drawHeatmap(heat, run, view);
    if (view.row) drawRow(column.querySelector('.row-chart'), run, view.row.name);

    const table = el('div');
    column.append(section('Parameters', table));
    drawTable(table, view.info);
  } catch (error) {
    state.errors.push(String(error));
    column.append(el('p', {class: 'error'}, String(error)));
  }
}

async function drawAll() {
  state.ready = false;
  const columns = document.getElementById('columns');
  columns.replaceChildren();
  columns.style.gridTemplateColumns = `repeat(${Math.max(1, Math.min(2, state.selected.length))}, minmax(0, 1fr))`;
  if (!state.runs.length) {
    columns.append(el('p', {class: 'note'}, 'No run holds param_monitor data (train with ParameterMonitor).'));
  }
  const pending = state.selected.map((run) => {
    const column = el('div', {class: 'run'});
    columns.append(column);
    return drawRun(column, run);
  });
  await Promise.all(pending);
  state.ready = true;
}

function drawSelector() {
  const box = document.getElementById('run-selector');
  box.replaceChildren(el('span', {class: 'label'}, 'Runs:'));
  for (const {name} of state.runs) {
    const input = el('input', {type: 'checkbox', value: name});
    input.checked = state.selected.includes(name);
    input.addEventListener('change', () => {
      state.selected = state.runs.map((r) => r.name).filter((r) =>
        box.querySelector(`input[value="${CSS.escape(r)}"]`).checked);
      drawAll();
    });
    box.append(el('label', {}, input, name));
  }
}

async function loadRuns() {
  state.runs = (await getJson('runs')).runs;
  state.selected = state.runs.map((r) => r.name);  // all selected, so the tab shows something at once
  state.views = {};
  drawSelector();
  await drawAll();
}

export async function render() {
  await loadStyle('static/style.css');
  document.body.append(
    el('header', {},
      el('div', {id: 'run-selector'}),
      el('input', {id: 'filter', type: 'search', placeholder: 'filter parameters (words in the name)'}),
      el('button', {id: 'reload', onclick: () => loadRuns()}, 'reload')),
    el('main', {id: 'columns'}));
  let timer = null;
  document.getElementById('filter').addEventListener('input', (event) => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.filter = event.target.value; drawAll(); }, 250);
  });
  try {
    await loadScript('plotly.min.js');
    await loadRuns();
  } catch (error) {
    state.errors.push(String(error));
    document.getElementById('columns').append(el('p', {class: 'error'}, String(error)));
    state.ready = true;
  }
}
