// The tab's data side: fetching the plugin's routes, the registry of metric families, and the pure
// transforms the views draw with (smoothing, log colours, filtering, CSV/JSON downloads). No Plotly
// and no page layout here: views.js draws, index.js holds the state and the controls.

export const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf'];
export const NONFINITE_COLOUR = '#ff00ff';
export const ZERO_COLOUR = '#000000';

// TensorBoard's JSON writes NaN and infinities as strings: turn them back into numbers.
export function revive(value) {
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

export async function getJson(route, params = {}) {
  const query = new URLSearchParams(params).toString();
  const response = await fetch(query ? `${route}?${query}` : route, {cache: 'no-store'});
  if (!response.ok) throw new Error(`${route}: ${response.status} ${await response.text()}`);
  return revive(await response.json());
}

export const finite = (v) => typeof v === 'number' && Number.isFinite(v);
export const gap = (values) => (values || []).map((v) => (finite(v) ? v : null));  // plotly: null is a gap

// Words of the filter, all of which a name must hold (case-insensitive).
export function matches(filter, name) {
  const lower = name.toLowerCase();
  return filter.toLowerCase().split(/\s+/).filter(Boolean).every((t) => lower.includes(t));
}

// -- the registry ------------------------------------------------------------------------

// How each heatmap family is coloured. Families the registry adds later (activation_std/{site}...)
// get the default: their scale comes from the registry, so no change here is needed for them.
const COLOURS = {
  grad_norm: {colorscale: 'Viridis'},
  weight_norm: {colorscale: 'Cividis'},
  weight_mean: {colorscale: 'RdBu', reversescale: true, diverging: true},
  // the 1e-3 rule of thumb in the middle of a diverging scale: blue barely moves, red moves a lot
  update_ratio: {colorscale: 'RdBu', logMid: -3, logRange: [-6, 0],  // plotly's RdBu: blue low, red high
                 ticks: {vals: [-5, -4, -3, -2, -1], text: ['1e-5', '1e-4', '1e-3 ← rule of thumb', '1e-2', '0.1']}},
  dead_units: {colorscale: 'Reds', zmin: 0, zmax: 1, ticks: {vals: [0, 0.5, 1], text: ['0', '½ dead', 'all dead']}},
};

export function familySpec(families, name) {
  const family = families.find((f) => f.name === name) || {name, scale: 'linear', meaning: ''};
  return {...family, ...(COLOURS[name] || {colorscale: 'Viridis'})};
}

export const heatmapFamilies = (families) => families.filter((f) => f.chart === 'heatmap');

// What a black (exactly zero on a log scale) cell means, per family: never a claim the data cannot make.
export function zeroMeaning(name) {
  if (name === 'grad_norm') return 'Black: a gradient norm of exactly 0 (a layer that got no gradient).';
  if (name === 'update_ratio') return 'Black: an update of exactly 0 (the optimizer did not move it).';
  return 'Black: exactly 0 (a log scale cannot draw it).';
}

// -- transforms ---------------------------------------------------------------------------

// TensorBoard's scalar smoothing: a debiased exponential moving average; gaps stay gaps.
export function smooth(values, weight) {
  if (!(weight > 0)) return values.slice();
  let last = 0;
  let count = 0;
  return values.map((v) => {
    if (!finite(v)) return v;
    last = last * weight + (1 - weight) * v;
    count += 1;
    return last / (1 - Math.pow(weight, count));
  });
}

// A heatmap cell's colour value: log10 on a log scale (zero and negatives have none: null).
export function cellValue(v, log) {
  if (!finite(v)) return null;
  if (!log) return v;
  return v > 0 ? Math.log10(v) : null;
}

// Colours for the uses of a shared group, call 0 dark to the last call light (depth reads as colour).
export function useColours(n) {
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];  // viridis
  if (n <= PALETTE.length && n <= 3) return PALETTE.slice(0, n);
  return Array.from({length: n}, (_, i) => {
    const t = n === 1 ? 0 : (i / (n - 1)) * (stops.length - 1);
    const a = stops[Math.floor(t)], b = stops[Math.min(stops.length - 1, Math.floor(t) + 1)], f = t - Math.floor(t);
    const c = a.map((x, k) => Math.round(x + (b[k] - x) * f));
    return `rgb(${c.join(',')})`;
  });
}

export const runColour = (index) => PALETTE[index % PALETTE.length];

// -- downloads ----------------------------------------------------------------------------

// A chart's data as CSV: one row per step, one column per series (values as logged, not smoothed).
export function seriesCsv(series) {
  const steps = [...new Set(series.flatMap((s) => s.steps))].sort((a, b) => a - b);
  const lookup = series.map((s) => new Map(s.steps.map((step, i) => [step, s.values[i]])));
  const quote = (text) => (/[",\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text);
  const lines = [['step', ...series.map((s) => quote(s.name))].join(',')];
  for (const step of steps) {
    lines.push([step, ...lookup.map((m) => (m.has(step) && m.get(step) !== null ? String(m.get(step)) : ''))].join(','));
  }
  return lines.join('\n') + '\n';
}

// A heatmap's data as series: one per row.
export function heatmapSeries(data, rows) {
  return rows.map((name) => {
    const i = data.rows.indexOf(name);
    const steps = data.cell_steps ? data.cell_steps[i] : data.steps;
    return {name, steps: steps.filter((s, j) => data.values[i][j] !== null), values: data.values[i].filter((v) => v !== null)};
  });
}

// JSON keeps NaN/inf as TensorBoard writes them (strings), so the file is valid JSON.
export function seriesJson(meta, series) {
  const out = (v) => (v === null || finite(v) ? v : Number.isNaN(v) ? 'NaN' : v > 0 ? 'Infinity' : '-Infinity');
  return JSON.stringify({...meta, series: series.map((s) => ({...s, values: s.values.map(out)}))}, null, 1);
}

export function download(filename, text, type) {
  const url = URL.createObjectURL(new Blob([text], {type}));
  const link = document.createElement('a');
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export const fileName = (...parts) => parts.join('_').replace(/[^\w.-]+/g, '-');
