// The GPU tiles' history charts, drawn by uPlot (static/uPlot.iife.min.js): util %, memory % of
// total, °C and power % of limit on one 0-100 scale, with a time axis, a value axis, a hover
// legend in real units, and gaps where there was no data. Only numbers reach the canvas.
"use strict";

const GpuCharts = (() => {
  const HEIGHT = 120; // px, axes included; the width follows the tile
  const DAY_S = 86400;
  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const known = v => typeof v === "number" && Number.isFinite(v);
  const positive = v => known(v) && v > 0 ? v : null;
  const round = v => Math.round(v).toLocaleString("en-US");
  const pad = n => String(n).padStart(2, "0");
  const day = d => `${d.getDate()} ${MONTHS[d.getMonth()]}`;
  const clock = (d, seconds) => `${pad(d.getHours())}:${pad(d.getMinutes())}${seconds ? `:${pad(d.getSeconds())}` : ""}`;

  // Legend entries: what the series is at rest, and its value in real units under the cursor.
  const SERIES = [
    {key: "util", rest: "util %", at: v => `util ${known(v) ? `${round(v)} %` : "–"}`},
    {key: "mem", rest: "memory %", at: (v, raw) => `mem ${known(raw.memMiB) ? `${(raw.memMiB / 1024).toFixed(1)} GiB` : "–"}`},
    {key: "temp", rest: "°C", at: v => known(v) ? `${round(v)} °C` : "– °C"},
    {key: "power", rest: "power %", at: (v, raw) => known(raw.powerW) ? `${round(raw.powerW)} W` : "– W"},
  ];

  // ---- colours come from the CSS variables, so dark mode and the legend swatches agree --------
  // A variable holds light-dark(light, dark), which only a property resolves: a hidden probe's
  // colour, read back as rgb(), is what the canvas gets.
  const colours = {};
  const probe = document.createElement("span");
  probe.hidden = true;
  document.body.append(probe);
  function readColours() {
    for (const name of ["muted", "line", "util", "mem", "temp", "power"]) {
      probe.style.color = `var(--${name})`;
      colours[name] = getComputedStyle(probe).color;
    }
  }
  readColours();

  // ---- labels: clock times for short ranges, dates once ticks are a day apart ------------------
  function tickLabel(t, incr) {
    const d = new Date(t * 1000);
    if (incr >= DAY_S || (incr >= 3600 && d.getHours() === 0 && d.getMinutes() === 0)) return day(d);
    return clock(d, incr < 60);
  }

  function momentLabel(t, rangeS, step) {
    const d = new Date(t * 1000);
    const sameDay = d.toDateString() === new Date().toDateString();
    return `${rangeS > DAY_S || !sameDay ? `${day(d)} ` : ""}${clock(d, step < 60)}`;
  }

  // ---- data: the API's columns, in % of the GPU's total and limit, with nulls at the gaps -------
  function view(columns, gpu, step, gapS) {
    const memoryTotal = positive(gpu.memoryTotal), powerLimit = positive(gpu.powerLimit);
    const t = [], util = [], mem = [], temp = [], power = [], memMiB = [], powerW = [];
    const add = (ti, u, m, c, p) => {
      t.push(ti); util.push(u); temp.push(c); memMiB.push(m); powerW.push(p);
      mem.push(known(m) && memoryTotal ? 100 * m / memoryTotal : null);
      power.push(known(p) && powerLimit ? 100 * p / powerLimit : null);
    };
    for (let i = 0; i < columns.t.length; i++) {
      // No bucket for a while: a null there makes uPlot break the line (spanGaps: false).
      if (i > 0 && columns.t[i] - columns.t[i - 1] > gapS) add(columns.t[i - 1] + step, null, null, null, null);
      add(columns.t[i], columns.utilizationGpu[i], columns.memoryUsed[i], columns.temperatureGpu[i],
        columns.powerDraw[i]);
    }
    return {data: [t, util, mem, temp, power], raw: {memMiB, powerW}};
  }

  // ---- one chart ---------------------------------------------------------------------------------
  const byBox = new Map(); // chart container -> chart, for the shared observers
  const resized = new Map(); // chart -> width waiting for the next frame
  const sizer = new ResizeObserver(entries => {
    for (const entry of entries) {
      const chart = byBox.get(entry.target);
      if (chart) resized.set(chart, Math.floor(entry.contentRect.width));
    }
    // Resizing in the next frame, not inside the observer, keeps Chromium's
    // "ResizeObserver loop completed with undelivered notifications" error away.
    requestAnimationFrame(() => {
      for (const [chart, width] of resized) chart.resize(width);
      resized.clear();
    });
  });
  const watcher = new IntersectionObserver(entries => {
    for (const entry of entries) byBox.get(entry.target)?.setVisible(entry.isIntersecting);
  }, {rootMargin: "200px"});

  function axis(extra) {
    return {stroke: () => colours.muted, font: "11px system-ui, sans-serif", gap: 3,
      grid: {stroke: () => colours.line, width: 1}, ticks: {stroke: () => colours.line, width: 1, size: 3}, ...extra};
  }

  // Append a chart and its legend to `parent`; update() hands it data, drawn only while on screen.
  // `names` renames series for another subject: a PC's chart is "cpu %" where a GPU's is "util %".
  function create(parent, label, names = {}) {
    const series = SERIES.map(s => ({...s, ...(names[s.key] || {})}));
    const box = document.createElement("div");
    box.className = "chart";
    box.setAttribute("role", "img");
    box.setAttribute("aria-label", label);
    parent.append(box);
    const legend = document.createElement("div");
    legend.className = "legend";
    const when = document.createElement("span");
    when.className = "when";
    legend.append(when);
    const keys = series.map(s => {
      const key = document.createElement("span");
      key.className = s.key;
      key.textContent = s.rest;
      legend.append(key);
      return key;
    });
    parent.append(legend);

    let shown = null; // {view, from, to, rangeS, step}
    let wanted = null; // the latest update(), drawn when the chart is on screen
    let visible = true, width = box.clientWidth || 360;

    function showLegend(idx) {
      const v = shown && shown.view;
      const at = v && idx != null && idx < v.data[0].length ? idx : null;
      const set = (node, text) => { if (node.textContent !== text) node.textContent = text; };
      if (at === null) {
        set(when, "");
        series.forEach((s, i) => set(keys[i], s.rest));
        return;
      }
      const raw = {memMiB: v.raw.memMiB[at], powerW: v.raw.powerW[at]};
      const empty = [1, 2, 3, 4].every(i => !known(v.data[i][at])) && !known(raw.memMiB) && !known(raw.powerW);
      set(when, `${momentLabel(v.data[0][at], shown.rangeS, shown.step)}${empty ? " no data" : ""}`);
      series.forEach((s, i) => set(keys[i], empty ? "" : s.at(v.data[i + 1][at], raw)));
    }

    const plot = new uPlot({
      width, height: HEIGHT,
      legend: {show: false},
      padding: [8, 10, 0, 0],
      cursor: {y: false, drag: {x: false, y: false, setScale: false}, points: {size: 7}},
      scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(100, known(max) ? max : 0)]}},
      axes: [
        axis({space: 50, size: 22, values: (u, splits, i, space, incr) => splits.map(t => tickLabel(t, incr))}),
        axis({space: 24, size: 34, incrs: [25, 50, 100, 200], values: (u, splits) => splits.map(String)}),
      ],
      series: [{}, ...series.map(s => ({label: s.rest, stroke: () => colours[s.key], width: 1.5,
        spanGaps: false, points: {size: 4}}))],
      hooks: {setCursor: [u => showLegend(u.cursor.idx)]},
    }, [[], [], [], [], []], box);

    function draw() {
      if (!wanted) return;
      const {columns, gpu, from, to, rangeS, step, gapS} = wanted;
      wanted = null;
      shown = {view: view(columns, gpu, step, gapS), from, to, rangeS, step};
      plot.batch(() => {
        plot.setData(shown.view.data);
        plot.setScale("x", {min: from, max: to});
      });
    }

    const chart = {
      // Take new data and the window [from, to] (unix s); drawn now if on screen, else when it is.
      update(columns, gpu, window) {
        wanted = {columns, gpu, ...window};
        if (visible && !document.hidden) draw();
      },
      resize(newWidth) {
        if (newWidth > 0 && newWidth !== width) {
          width = newWidth;
          plot.setSize({width, height: HEIGHT});
        }
      },
      setVisible(on) {
        visible = on;
        if (on) draw();
      },
      flush() {
        if (visible) draw();
      },
      redraw() {
        plot.redraw(false);
      },
      destroy() {
        sizer.unobserve(box);
        watcher.unobserve(box);
        byBox.delete(box);
        plot.destroy();
        box.remove();
        legend.remove();
      },
    };
    byBox.set(box, chart);
    sizer.observe(box);
    watcher.observe(box);
    return chart;
  }

  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    readColours();
    for (const chart of byBox.values()) chart.redraw();
  });
  // A background tab draws nothing (update() keeps the data); back in view, draw what came.
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) for (const chart of byBox.values()) chart.flush();
  });

  return {create};
})();
