// The tab's views: each draws one part of a run's column with Plotly from data model.js fetched.
// Every chart goes through chart(): a title in HTML (never cut by the plot), a log/linear switch
// where the values span decades, CSV and JSON downloads of the values as logged, and a zoom that
// survives a redraw (auto-refresh) because it is kept in the tab's state under the chart's key.

import {
  NONFINITE_COLOUR, ZERO_COLOUR, cellValue, download, familySpec, fileName, finite, gap, heatmapSeries,
  matches, runColour, seriesCsv, seriesJson, smooth, useColours, zeroMeaning,
} from './model.js';

const SPIKE_COLOUR = '#d62728';
const PLOT_CONFIG = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ['select2d', 'lasso2d']};
const BASE_LAYOUT = {
  margin: {l: 56, r: 16, t: 8, b: 36},
  font: {family: 'Roboto, sans-serif', size: 11},
  paper_bgcolor: '#fff',
  plot_bgcolor: '#fff',
  hovermode: 'x unified',
  showlegend: false,
};

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export const note = (text, cls = 'note') => el('p', {class: cls}, text);

// One chart: spec.build(scale) returns {traces, layout}; spec.series() the values for downloads.
export async function chart(parent, spec, ctx) {
  const box = el('div', {class: `chart ${spec.cls || ''}`, 'data-key': spec.key});
  const tools = el('span', {class: 'chart-tools'});
  box.append(el('div', {class: 'chart-head'}, el('span', {class: 'chart-title', title: spec.tooltip || spec.title},
    spec.title), tools));
  const div = el('div', {class: `plot ${spec.plotCls || ''}`, ...(spec.attrs || {})});
  box.append(div);
  if (spec.note) box.append(note(spec.note));
  parent.append(box);
  let scale = ctx.scales[spec.key] || spec.scale || 'linear';
  // draw once the caller has placed its sibling charts: a grid's columns are final by then, and
  // plotly measures the width when it draws
  await new Promise((resolve) => setTimeout(resolve, 0));
  const draw = async () => {
    const {traces, layout} = spec.build(scale);
    const zoom = ctx.zoom[spec.key] || {};
    const full = {...BASE_LAYOUT, height: spec.height || 200, ...layout};
    // x labels a few pixels lower: the y axis's bottom label and the x axis's first never touch
    full.xaxis = {ticks: 'outside', ticklen: 5, tickcolor: 'rgba(0,0,0,0)', automargin: true, zeroline: false,
                  ...(full.xaxis || {})};
    full.yaxis = {automargin: true, ...(full.yaxis || {})};
    // a log axis labels its decades only on small charts (no crowded 2, 3, 5 minor labels)
    if (full.yaxis.type === 'log') full.yaxis.nticks = Math.max(3, Math.floor(full.height / 45));
    for (const axis of ['xaxis', 'yaxis']) {
      if (zoom[axis]) full[axis] = {...(full[axis] || {}), range: zoom[axis], autorange: false};
    }
    // small charts: no mode bar over the plot (drag zooms, a double click resets); big ones keep it
    const config = full.height <= 200 ? {...PLOT_CONFIG, displayModeBar: false} : PLOT_CONFIG;
    await Plotly.react(div, traces, full, config);
  };
  if (spec.scale) {
    const toggle = el('button', {class: 'scale', title: 'log or linear axis'}, scale);
    toggle.addEventListener('click', async () => {
      scale = scale === 'log' ? 'linear' : 'log';
      ctx.scales[spec.key] = scale;
      delete ctx.zoom[spec.key];  // a range on one scale means nothing on the other
      toggle.textContent = scale;
      await draw();
    });
    tools.append(toggle);
  }
  if (spec.series) {
    const name = fileName(ctx.run, spec.key);
    tools.append(
      el('button', {class: 'csv', onclick: () => download(`${name}.csv`, seriesCsv(spec.series()), 'text/csv')}, 'CSV'),
      el('button', {class: 'json', onclick: () => download(`${name}.json`,
        seriesJson({run: ctx.run, chart: spec.key}, spec.series()), 'application/json')}, 'JSON'));
  }
  await draw();
  div.on('plotly_relayout', (event) => {
    const zoom = ctx.zoom[spec.key] || (ctx.zoom[spec.key] = {});
    for (const axis of ['xaxis', 'yaxis']) {
      if (event[`${axis}.autorange`]) delete zoom[axis];
      else if (event[`${axis}.range[0]`] !== undefined) zoom[axis] = [event[`${axis}.range[0]`], event[`${axis}.range[1]`]];
      else if (Array.isArray(event[`${axis}.range`])) zoom[axis] = event[`${axis}.range`].slice();
    }
  });
  return div;
}

// A line with its smoothed twin (TensorBoard's look): the raw values faint, the smoothed ones solid.
function lines(name, steps, values, colour, smoothing, extra = {}) {
  const raw = {x: steps, y: gap(values), name, type: 'scatter', mode: 'lines', meta: 'raw',
               line: {color: colour, width: 1.2}, ...extra};
  if (!(smoothing > 0)) return [raw];
  return [{...raw, opacity: 0.25, hoverinfo: 'skip', showlegend: false},
          {...raw, y: gap(smooth(values, smoothing)), meta: 'smoothed', name: `${name} (smoothed)`}];
}

// -- status and empty states ------------------------------------------------------------------

export function statusNotes(info) {
  const status = info.status;
  const out = [];
  if (status.no_step_logged) {
    const every = status.log_every_n_steps ? `every ${status.log_every_n_steps} steps` : 'every log_every_n_steps steps';
    const run = status.steps_run ? ` This run has ${status.steps_run} steps so far.` : '';
    out.push(el('div', {class: 'empty no-step'},
      el('strong', {}, 'No step logged yet. '),
      `The monitor writes its statistics on logging steps only, ${every} (Lightning's Trainer default: 50), ` +
      `so a run shorter than that logs nothing.${run} Lightning: Trainer(log_every_n_steps=10) or ` +
      'ParameterMonitor(log_every_n_steps=10). A plain PyTorch loop: PlainMonitor(model, writer, ' +
      'log_every_n_steps=10). The tab refreshes by itself: the charts appear with the first logged step.'));
  }
  return out;
}

function sharedEmpty(info) {
  const status = info.status;
  if (status.tracking === false) {
    return el('div', {class: 'empty tracking-off'}, el('strong', {}, 'Per-use tracking was off in this run. '),
      'ParameterMonitor(track_shared=False) or ParameterWatcher(model, track_shared=False) turns it off, and the ' +
      'monitor turns it off itself under a sharded strategy (FSDP), with a warning. The per-parameter views below ' +
      'still hold; turn it on to see how the uses of a shared parameter add up.');
  }
  if (status.tracking === null) {
    return el('div', {class: 'empty no-shared'}, el('strong', {}, 'No per-use data. '),
      'This run has no shared_grad tags and no run metadata: either no parameter is used twice, or tracking was off.');
  }
  return el('div', {class: 'empty no-shared'}, el('strong', {}, 'No shared parameter in this run. '),
    'Every parameter was used once per step (no tied weights, no module called twice), so there is no per-use ' +
    'split to show. A tied embedding or a layer applied at several depths gets a group here.');
}

function singleUseNotes(info) {
  return info.status.single_use_aliases.map((a) => el('p', {class: 'note single-use'},
    `${a.name} is tied to ${a.aliases.join(', ')} but was used once per step` +
    `${a.sites.length ? ` (at ${a.sites.join(', ')})` : ''}: one use, nothing to split.`));
}

// -- the overview: shared groups --------------------------------------------------------------

function groupTitle(group) {
  const tensors = group.tensors.length === 1 ? '1 tensor' : `${group.tensors.length} tensors`;
  const more = group.more_uses ? ` (first ${group.uses.length} drawn)` : '';
  return `${group.name}: ${tensors} × ${group.uses.length + group.more_uses} uses${more}`;
}

function seenMark(group) {
  if (group.max_error === null) return el('span', {class: 'mark unknown'}, '? no error logged');
  return group.every_use_seen
    ? el('span', {class: 'mark ok', title: 'the uses add up to the gradient'},
      `✓ every use seen (largest error ${group.max_error === 0 ? '0' : group.max_error.toExponential(1)})`)
    : el('span', {class: 'mark bad', title: 'a use was not seen: its contribution is missing'},
      `✗ a use missed (error up to ${group.max_error.toExponential(1)})`);
}

export async function drawGroups(section, info, groups, ctx) {
  if (!groups.length) {
    section.append(sharedEmpty(info), ...singleUseNotes(info));
    return;
  }
  section.append(note('Groups: the shared tensors of one module (a layer applied at several depths, a tied ' +
    'embedding), in model order; uses in call order. Bands: each use\'s share of the group\'s gradient ' +
    '(its tensors\' shares weighted by grad_norm²; they add up to 1).'), ...singleUseNotes(info));
  const grid = el('div', {class: 'groups'});
  section.append(grid);
  const shown = groups.filter((g) => matches(ctx.filter, g.name) || g.tensors.some((t) => matches(ctx.filter, t)));
  if (!shown.length) grid.append(note(`No shared group matches "${ctx.filter}".`));
  if (info.status.no_step_logged) {  // the groups are known from the metadata; their values come with a logged step
    for (const group of shown) {
      grid.append(el('div', {class: 'card group', 'data-group': group.name}, el('h3', {}, groupTitle(group)),
        note(`${group.tensors.join(', ')}: values from the first logged step on.`)));
    }
    return;
  }
  await Promise.all(shown.map((group) => drawGroupCard(grid, group, ctx)));
}

// Which colour is which use: swatches for a few uses, the ends of the scale for many.
function useLegend(uses, colours) {
  if (uses.length > 6) return note(`${uses[0]} (dark) … ${uses[uses.length - 1]} (light)`, 'note legend');
  return el('p', {class: 'note legend'}, ...uses.map((use, k) => el('span', {class: 'swatch-item'},
    el('span', {class: 'swatch', style: `background: ${colours[k]}`}), use)));
}

async function drawGroupCard(grid, group, ctx) {
  const card = el('div', {class: 'card group', 'data-group': group.name});
  grid.append(card);
  card.append(el('h3', {}, groupTitle(group), ' ', seenMark(group)));
  const colours = useColours(group.uses.length);
  const key = `group:${group.name}`;
  await chart(card, {
    key: `${key}:bands`, title: 'share of the gradient per use', height: 160, plotCls: 'bands',
    attrs: {'data-group': group.name},
    series: () => group.uses.map((u, k) => ({name: u, steps: group.steps, values: group.bands[k]})),
    build: () => ({
      traces: group.uses.map((use, k) => ({
        x: group.steps, y: gap(group.bands[k]), name: use, type: 'scatter', mode: 'lines', stackgroup: 'uses',
        line: {width: 0.5, color: colours[k]}, fillcolor: colours[k],
        hovertemplate: `${use}: %{y:.1%}<extra></extra>`,
      })),
      layout: {yaxis: {range: [0, 1], tickformat: '.0%', title: {text: 'share'}}, xaxis: {title: {text: 'step'}},
               shapes: [...nonfiniteBands(group.steps, group.nonfinite_steps), ...spikeLines(ctx.spikes)],
               hovermode: 'x'},
    }),
  }, ctx);
  card.append(useLegend(group.uses, colours));
  const checks = el('div', {class: 'pair checks'});
  card.append(checks);
  await Promise.all([
    chart(checks, {
      key: `${key}:error`, title: 'error of the split', height: 120,
      tooltip: '‖Σ uses − grad‖ / ‖grad‖ of the group\'s worst tensor: about 1e-7 when every use is seen',
      scale: group.error.some((v) => finite(v) && v > 0) ? 'log' : 'linear',  // all exactly 0: no log axis
      plotCls: 'error', series: () => [{name: 'error', steps: group.steps, values: group.error}],
      build: (scale) => ({
        traces: [{x: group.steps, y: gap(group.error), type: 'scatter', mode: 'lines', name: 'error',
                  line: {color: '#d62728', width: 1}}],
        layout: {yaxis: {type: scale, exponentformat: 'e'}, margin: {...BASE_LAYOUT.margin, b: 24},
                 shapes: spikeLines(ctx.spikes)},
      }),
    }, ctx),
    chart(checks, {
      key: `${key}:cosine`, title: 'cosine of uses', height: 120, plotCls: 'cosine',
      tooltip: 'mean pairwise cosine between the uses\' contributions (mean over the group\'s tensors)',
      series: () => [{name: 'cosine', steps: group.steps, values: group.cosine}],
      build: () => ({
        traces: [{x: group.steps, y: gap(group.cosine), type: 'scatter', mode: 'lines', name: 'cosine',
                  line: {color: '#555', width: 1}}],
        layout: {yaxis: {range: [-1.05, 1.05]}, margin: {...BASE_LAYOUT.margin, b: 24}, shapes: spikeLines(ctx.spikes)},
      }),
    }, ctx),
  ]);
  const details = el('div', {class: 'details'});
  const open = ctx.openGroups.has(group.name);
  const button = el('button', {class: 'open-group'}, open ? 'close' : 'per-tensor stacks and per-use norms');
  button.addEventListener('click', async () => {
    if (ctx.openGroups.has(group.name)) {
      ctx.openGroups.delete(group.name);
      details.replaceChildren();
      button.textContent = 'per-tensor stacks and per-use norms';
    } else {
      ctx.openGroups.add(group.name);
      button.textContent = 'close';
      await drawGroupDetails(details, group, ctx);
    }
  });
  card.append(button, details);
  if (open) await drawGroupDetails(details, group, ctx);
}

async function drawGroupDetails(details, group, ctx) {
  details.replaceChildren();
  const colours = useColours(group.uses.length);
  await chart(details, {
    key: `group:${group.name}:norms`, title: 'norm of each use (the group\'s tensors together)', height: 200,
    scale: 'log', plotCls: 'group-norms',
    series: () => group.uses.map((u, k) => ({name: u, steps: group.steps, values: group.use_norm[k]})),
    build: (scale) => ({
      traces: group.uses.flatMap((u, k) => lines(u, group.steps, group.use_norm[k], colours[k], ctx.smoothing)),
      layout: {yaxis: {type: scale, exponentformat: 'e'}, xaxis: {title: {text: 'step'}}, shapes: spikeLines(ctx.spikes)},
    }),
  }, ctx);
  const tensors = group.tensors.filter((t) => matches(ctx.filter, t) || matches(ctx.filter, group.name));
  const chosen = tensors.includes(ctx.openTensor[group.name]) ? ctx.openTensor[group.name] : tensors[0];
  const select = el('select', {class: 'tensor'}, ...tensors.map((t) => {
    const option = el('option', {value: t}, t);
    option.selected = t === chosen;
    return option;
  }));
  const holder = el('div', {class: 'tensor-view'});
  select.addEventListener('change', async () => {
    ctx.openTensor[group.name] = select.value;
    await drawTensor(holder, await ctx.sharedView(select.value), ctx);
  });
  details.append(el('label', {class: 'note'}, 'tensor: ', select), holder);
  if (chosen) await drawTensor(holder, await ctx.sharedView(chosen), ctx);
}

// One shared tensor: each use's share × grad_norm stacked (the top is grad_norm), and each use's norm.
export async function drawTensor(holder, view, ctx) {
  holder.replaceChildren();
  const colours = useColours(view.sites.length);
  if (!view.stack) {
    holder.append(note('No shared_grad_share tags for this tensor: the per-use norms only.'));
  } else {
    await chart(holder, {
      key: `tensor:${view.name}:stack`, title: `${view.name}: each use's share × grad_norm, stacked (the top is ` +
        'grad_norm; below zero: a use pulling against the others)', height: 240, plotCls: 'stack',
      attrs: {'data-param': view.name},
      series: () => [...view.sites.map((s) => ({name: s, steps: view.steps, values: view.stack[s]})),
                     {name: 'grad_norm', steps: view.steps, values: view.grad_norm}],
      build: () => ({
        traces: [...view.sites.map((site, i) => ({
          x: view.steps, y: gap(view.stack[site]), name: `use @ ${site}`, type: 'scatter', mode: 'lines',
          stackgroup: 'uses', line: {color: colours[i], width: 1}, fillcolor: colours[i],
          customdata: gap(view.share[site]), hovertemplate: `${site}: %{y:.4g} (share %{customdata:.1%})<extra></extra>`,
        })), {x: view.steps, y: gap(view.grad_norm), name: 'grad_norm (the total)', type: 'scatter', mode: 'lines',
              line: {color: '#222', width: 1.5, dash: 'dot'}}],
        layout: {xaxis: {title: {text: 'step'}}, yaxis: {title: {text: 'gradient norm'}},
                 shapes: [...nonfiniteBands(view.steps, view.steps.filter((s, i) => !finite(view.grad_norm[i]))),
                          ...spikeLines(ctx.spikes)]},
      }),
    }, ctx);
  }
  await chart(holder, {
    key: `tensor:${view.name}:norms`, title: `${view.name}: norm of each use`, height: 200, scale: 'log',
    plotCls: 'use-norms',
    series: () => view.sites.map((s) => ({name: s, steps: view.steps, values: view.use_norm[s]})),
    build: (scale) => ({
      traces: [...view.sites.flatMap((s, i) => lines(s, view.steps, view.use_norm[s], colours[i], ctx.smoothing)),
               ...lines('grad_norm', view.steps, view.grad_norm, '#222', ctx.smoothing, {line: {color: '#222', dash: 'dot', width: 1}})],
      layout: {yaxis: {type: scale, exponentformat: 'e'}, xaxis: {title: {text: 'step'}}, shapes: spikeLines(ctx.spikes)},
    }),
  }, ctx);
}

// Magenta bands over the steps where a value was NaN/inf (a stack cannot leave a gap there).
function nonfiniteBands(steps, bad) {
  const set = new Set(bad || []);
  return steps.flatMap((step, i) => (!set.has(step) ? [] : [{
    type: 'rect', xref: 'x', yref: 'paper', x0: i ? (steps[i - 1] + step) / 2 : step,
    x1: i + 1 < steps.length ? (steps[i + 1] + step) / 2 : step, y0: 0, y1: 1,
    fillcolor: NONFINITE_COLOUR, opacity: 0.25, line: {width: 0},
  }]));
}

// Dashed red lines at the steps where grad_norm_total or the training loss spiked (detect_spikes=True:
// the steps the param_monitor/spikes record lists). Named 'spike', so they can be told from other shapes.
export function spikeLines(steps) {
  return (steps || []).map((step) => ({
    type: 'line', name: 'spike', xref: 'x', yref: 'paper', x0: step, x1: step, y0: 0, y1: 1,
    line: {color: SPIKE_COLOUR, width: 1, dash: 'dash'}, opacity: 0.8,
  }));
}

// A heatmap's column is a span of steps ending at its step: a spike is marked above the column that holds
// it (the first column at or after it; past the last logged step, at its own step), a short red bar.
export function spikeColumnMarks(columns, steps) {
  const xs = [...new Set((steps || []).map((step) => columns.find((c) => c >= step) ?? step))];
  return xs.map((x) => ({
    type: 'line', name: 'spike', xref: 'x', yref: 'paper', ysizemode: 'pixel', yanchor: 1, y0: 1, y1: 9,
    x0: x, x1: x, line: {color: SPIKE_COLOUR, width: 3},
  }));
}

// -- layer health -----------------------------------------------------------------------------

export function drawHealth(section, data, ctx, onPick) {
  const shown = data.findings.filter((f) => (f.names || [f.name]).some((n) => matches(ctx.filter, n)));
  const [low, high] = data.rules.update_ratio_range;
  section.append(note(`Rules: the first NaN/inf gradient; a gradient norm below ${data.rules.vanished} of its ` +
    `largest; an update ratio outside ${low}..${high} (median of the last ${data.rules.recent} logged steps); ` +
    `more than ${data.rules.dead_fraction * 100}% of the units dead. Click a name for its charts.`));
  const off = Object.entries(data.checked).filter(([, n]) => !n).map(([m]) => m);
  const how = {update_ratio: 'ParameterMonitor(log_update_ratio=True)',
               dead_units: 'ParameterMonitor(log_dead_units=True) or ParameterWatcher(model, dead_units=True)'};
  if (off.length) section.append(note(`Not logged in this run, so not checked: ${off.join(', ')} ` +
    `(${off.map((m) => how[m]).filter(Boolean).join('; ')} ${off.length > 1 ? 'turn them' : 'turns it'} on).`));
  if (!shown.length) {
    section.append(el('p', {class: 'all-well'}, data.findings.length ? 'No finding matches the filter.'
      : '✓ Nothing to look at: every checked layer is within the rules.'));
    return;
  }
  const list = el('ul', {class: 'findings'});
  for (const f of shown) {
    const name = el('a', {href: '#', class: 'finding-name'}, f.name);
    name.addEventListener('click', (event) => { event.preventDefault(); onPick(f.name); });
    list.append(el('li', {class: `finding ${f.kind}`, 'data-kind': f.kind}, name, `: ${f.text} (step ${f.step})`));
  }
  section.append(list);
}

// -- heatmaps -----------------------------------------------------------------------------

function rowLabel(info, name) {
  const param = info.parameters.find((p) => p.name === name);
  return param && param.aliases.length ? `${name} (= ${param.aliases.join(', ')})` : name;
}

export function heatmapTraces(info, data, spec, log) {
  const names = data.rows.filter((name) => matches(spec.filter, name));
  const y = names.map((name) => rowLabel(info, name));
  const z = [], special = [], custom = [];
  let anySpecial = false;
  for (const name of names) {
    const i = data.rows.indexOf(name);
    const values = data.values[i];
    const steps = data.cell_steps ? data.cell_steps[i] : data.steps;
    z.push(values.map((v) => cellValue(v, log)));
    // zero on a log scale and NaN/inf (where training broke) get colours of their own
    const marks = values.map((v) => (v === null || v === undefined ? null : !finite(v) ? 1 : log && v <= 0 ? 0 : null));
    anySpecial = anySpecial || marks.some((m) => m !== null);
    special.push(marks);
    custom.push(values.map((v, j) => [v === null || v === undefined ? NaN : v, steps[j]]));
  }
  let colour = {colorscale: spec.colorscale, reversescale: Boolean(spec.reversescale)};
  const flat = z.flat().filter(finite);
  if (log && spec.logMid !== undefined) {
    colour = {...colour, zmid: spec.logMid, zmin: spec.logRange[0], zmax: spec.logRange[1]};
  } else if (!log && spec.zmin !== undefined) {
    colour = {...colour, zmin: spec.zmin, zmax: spec.zmax};
  } else if (!log && spec.diverging) {
    const extent = Math.max(1e-12, ...flat.map(Math.abs));
    colour = {...colour, zmid: 0, zmin: -extent, zmax: extent};
  }
  const ticks = spec.ticks && (log === (spec.scale === 'log')) ? {tickvals: spec.ticks.vals, ticktext: spec.ticks.text} : {};
  const title = log ? `log10 ${spec.name}` : spec.name;
  const hovertemplate = `%{y}<br>step %{customdata[1]}<br>${spec.name} %{customdata[0]:.6g}<extra></extra>`;
  const ygap = y.length > 80 ? 0 : 1;
  const traces = [{type: 'heatmap', x: data.steps, y, z, customdata: custom, hovertemplate, xgap: 0, ygap, ...colour,
                   colorbar: {title: {text: title, side: 'right'}, thickness: 12, ...ticks}}];
  if (anySpecial) {  // a second layer only where there is something to mark (1,000 rows: half the drawing time)
    traces.push({type: 'heatmap', x: data.steps, y, z: special, customdata: custom, hovertemplate,
                 colorscale: [[0, ZERO_COLOUR], [1, NONFINITE_COLOUR]], zmin: 0, zmax: 1, showscale: false, ygap,
                 name: 'zero / non-finite'});
  }
  return {names, anySpecial, traces};
}

export async function drawHeatmap(container, info, data, spec, ctx, onPick) {
  container.replaceChildren();
  const names = data.rows.filter((name) => matches(ctx.filter, name));
  if (!names.length) {
    container.append(note(data.rows.length ? `No row matches "${ctx.filter}".` : `No ${spec.name}/ tags in this run.`));
    return;
  }
  const rows = names.length;
  const what = info.has_metadata ? 'rows: parameters in model order (weights before biases, as registered)'
    : 'rows: by module name, weights before biases (no run metadata)';
  let last = null;
  const spikes = spikeColumnMarks(data.steps, ctx.spikes);
  const caption = () => {
    const log = (ctx.scales[`heatmap:${spec.name}`] || spec.scale) === 'log';
    const parts = [`Magenta: NaN or infinite (where training broke).`];
    if (log && last && last.anySpecial) parts.unshift(zeroMeaning(spec.name));
    if (spikes.length) parts.push('Red bar above a column: grad_norm_total or the loss spiked in its steps.');
    if (data.cell_steps) parts.push(`${data.steps.length} columns, each a span of steps (the cell: its last value, or its first NaN/inf).`);
    return parts.join(' ');
  };
  const div = await chart(container, {
    key: `heatmap:${spec.name}`, title: `${spec.name}: ${spec.meaning}`, scale: spec.scale, plotCls: 'heatmap',
    attrs: {'data-metric': spec.name}, height: Math.min(900, Math.max(160, 50 + 16 * rows)),
    series: () => heatmapSeries(data, names),
    build: (scale) => {
      last = heatmapTraces(info, data, {...spec, filter: ctx.filter}, scale === 'log');
      return {traces: last.traces, layout: {
        hovermode: 'closest', margin: {l: rows > 80 ? 20 : 8, r: 8, t: spikes.length ? 14 : 8, b: 36},
        shapes: spikes,
        xaxis: {title: {text: 'step'}},
        yaxis: {autorange: 'reversed', automargin: true, showticklabels: rows <= 80, tickfont: {size: 10}},
      }};
    },
  }, ctx);
  container.append(note(`${what}; click a row for its charts. ${caption()}`));
  div.on('plotly_click', (event) => {
    const name = names[last.traces[0].y.indexOf(event.points[0].y)];
    if (name) onPick(name);
  });
}

// -- one row: every heatmap family of one parameter, a small chart each (no shared y-axes) -------

// series: [{run, colourIndex, data: /series payload}] (one entry; several when runs are overlaid)
export async function drawRow(container, name, entries, families, ctx) {
  container.replaceChildren();
  if (!matches(ctx.filter, name)) {
    container.append(note(`${name} is hidden by the filter.`));
    return;
  }
  const metrics = families.filter((f) => entries.some((e) => e.data.series[f.name]));
  container.append(el('h3', {class: 'row-title'}, name,
    entries.length > 1 ? el('span', {class: 'note'}, ` (${entries.map((e) => e.run).join(', ')}: one colour per run)`) : null));
  const grid = el('div', {class: 'row-charts'});
  container.append(grid);
  await Promise.all(metrics.map((family) => chart(grid, {
    key: `row:${family.name}`, title: family.name, height: 170, scale: family.scale, plotCls: 'row',
    attrs: {'data-metric': family.name},
    series: () => entries.filter((e) => e.data.series[family.name]).map((e) => ({
      name: e.run, steps: e.data.series[family.name].steps, values: e.data.series[family.name].values})),
    build: (scale) => ({
      traces: entries.filter((e) => e.data.series[family.name]).flatMap((e) => lines(
        entries.length > 1 ? e.run : family.name, e.data.series[family.name].steps, e.data.series[family.name].values,
        runColour(e.colourIndex), ctx.smoothing)),
      layout: {yaxis: {type: scale, exponentformat: 'e'}, xaxis: {title: {text: 'step'}},
               showlegend: entries.length > 1, legend: {orientation: 'h', y: 1.1, x: 0}, shapes: spikeLines(ctx.spikes)},
    }),
  }, {...ctx, run: `${entries.map((e) => e.run).join('+')}_${name}`})));
}

// -- the parameter table ----------------------------------------------------------------------

// "layer.q#0 … #11 (12 calls)" for a module's repeated calls; other lists as they are (at most 4 shown).
export function compactSites(sites) {
  const base = sites.length > 2 && sites[0].endsWith('#0') ? sites[0].slice(0, -2) : null;
  if (base !== null && sites.every((s, i) => s === `${base}#${i}`)) {
    return `${base} #0 … #${sites.length - 1} (${sites.length} calls)`;
  }
  return sites.length > 4 ? `${sites.slice(0, 3).join(', ')} … (${sites.length})` : sites.join(', ');
}

export function drawTable(container, info, ctx) {
  if (!info.parameters.length) {
    container.append(note('No parameter table: this run has no run metadata (the monitor\'s description of the ' +
      'model). ParameterMonitor and PlainMonitor write it at the first step; a run written by hand with ' +
      'write_scalars has none.'));
    return;
  }
  const shown = info.parameters.filter((p) => matches(ctx.filter, p.name));
  const table = el('table', {class: 'params'});
  table.append(el('thead', {}, el('tr', {}, ...['name', 'shape', 'numel', 'tied aliases', 'call sites']
    .map((h) => el('th', {}, h)))));
  const body = el('tbody');
  for (const p of shown) {
    const shape = p.shape === null ? 'uninitialized' : p.shape.length ? p.shape.join('×') : 'scalar';
    const sites = compactSites(p.call_sites);
    body.append(el('tr', {class: p.call_sites.length > 1 ? 'shared' : ''},
      el('td', {}, p.name), el('td', {}, shape), el('td', {class: 'num'}, p.numel.toLocaleString('en')),
      el('td', {}, p.aliases.join(', ') || '–'), el('td', {title: p.call_sites.join(', ')}, sites || '–')));
  }
  table.append(body);
  const total = info.parameters.reduce((sum, p) => sum + p.numel, 0);
  container.append(table, note(`${shown.length} of ${info.parameters.length} parameters shown, in model order; ` +
    `${total.toLocaleString('en')} values (tied tensors once).`));
}
