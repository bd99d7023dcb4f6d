// The live charts (uPlot, vendored): each color's requests/s, error rate, p50, p99 and
// share, one point a second over the last 15 minutes, with the rollouts' moments marked
// (a deploy, a promotion, the end: done, rolled back, aborted...).
//
// Blue and green differ by more than their color: blue is a solid line, green a dashed
// one, and the legend names both.

import { el, clock } from "./dom.js";

const CHARTS = [
  { series: "requests_per_second", title: "Requests per second" },
  { series: "error_rate", title: "Error rate (%)", scale: 100 },
  { series: "p50_ms", title: "p50 latency (ms)" },
  { series: "p99_ms", title: "p99 latency (ms)" },
  { series: "effective_share", title: "Traffic share (%)", max: 100 },
];

const STYLES = {
  blue: { label: "blue", stroke: "#0a58ca", width: 2 },
  green: { label: "green", stroke: "#198038", width: 2, dash: [7, 4] },
};

// Rollout events drawn on the charts, and their labels.
export const MARKERS = {
  rollout_preflight: "deploy",
  rollout_baking: "promoted",
  rollout_done: "done",
  rollout_rolled_back: "rolled back",
  rollout_aborted: "aborted",
  rollout_frozen: "frozen",
  rollout_failed: "failed",
};

const HEIGHT = 170;
const SPAN = 900; // seconds the charts cover at most, as the feed's history

const LABEL_WIDTH = 80; // px a marker's label takes: a closer one goes a row lower

/** Vertical lines, as elements over the plot, at each marked event inside the x range. */
function placeMarkers(plot, marks) {
  const layer = plot.over;
  for (const old of layer.querySelectorAll(".marker")) old.remove();
  const [from, to] = [plot.scales.x.min, plot.scales.x.max];
  const rows = []; // the x of the last label in each row
  for (const mark of marks()) {
    if (from === undefined || mark.time < from || mark.time > to) continue;
    const x = plot.valToPos(mark.time, "x");
    let row = rows.findIndex((last) => x - last > LABEL_WIDTH);
    if (row < 0) row = rows.length < 4 ? rows.length : rows.length - 1;
    rows[row] = x;
    const nearEnd = x > layer.clientWidth - LABEL_WIDTH;
    const line = el(
      "div",
      {
        class: `marker marker-${mark.kind}${nearEnd ? " flip" : ""}`,
        "data-testid": `marker-${mark.kind.replace("rollout_", "")}`,
        title: `${clock(mark.time)} rollout ${mark.rollout}: ${mark.reason}`,
      },
      el("span", {}, MARKERS[mark.kind]),
    );
    line.style.left = `${x}px`;
    line.firstChild.style.top = `${row * 14}px`;
    layer.append(line);
  }
}

function width(container) {
  return Math.max(240, container.clientWidth - 16);
}

/** The charts in `container`; `update(samples, events)` redraws them. */
export function createCharts(container) {
  let marks = [];
  const plots = CHARTS.map((chart) => {
    const box = el("figure", { class: "chart" }, el("figcaption", {}, chart.title));
    container.append(box);
    const options = {
      width: width(box),
      height: HEIGHT,
      scales: {
        // The samples' span, widened to the marks in it: a rollout that began before
        // the first sample (zdproxy just started) is still marked.
        x: {
          time: true,
          range: (plot, low, high) => {
            const times = marks.map((m) => m.time);
            if (low === null || high === null) return [low, high]; // no sample yet
            return [Math.min(low, ...times), Math.max(high, ...times)];
          },
        },
        // From 0, with headroom; an idle second (null, 0) still gets an axis.
        y: { range: (plot, low, high) => [0, chart.max ?? (high > 0 ? high * 1.15 : 1)] },
      },
      series: [{}, STYLES.blue, STYLES.green].map((s, i) =>
        i === 0 ? { label: "time" } : { ...s, points: { show: false }, spanGaps: false },
      ),
      axes: [{}, { size: 56 }],
      legend: { live: false }, // the names and line styles; values are on the axes
      hooks: { draw: [(plot) => placeMarkers(plot, () => marks)] },
    };
    return { chart, box, plot: new window.uPlot(options, [[], [], []], box) };
  });

  new ResizeObserver(() => {
    for (const { box, plot } of plots) plot.setSize({ width: width(box), height: HEIGHT });
  }).observe(container);

  return {
    update(samples, events) {
      const newest = samples.time.length ? samples.time[samples.time.length - 1] : Date.now() / 1000;
      marks = events.filter((e) => e.kind in MARKERS && e.time > newest - SPAN).map((e) => ({
        time: e.time,
        kind: e.kind,
        reason: e.reason,
        rollout: e.data.rollout,
      }));
      for (const { chart, plot } of plots) {
        const column = (color) => {
          const values = samples.colors[color][chart.series];
          return chart.scale ? values.map((v) => (v === null ? null : v * chart.scale)) : values;
        };
        plot.setData([samples.time, column("blue"), column("green")]);
      }
    },
  };
}
