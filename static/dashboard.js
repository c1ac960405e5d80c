// The dashboard: one EventSource, updated in place (the DOM does not grow with time). Two views:
// the overview (overview.js: a row per PC, a cell per GPU, no charts) and, at ?pc=NAME, one PC's
// detail: its card, a tile per GPU with its history chart, processes and energy. Every string from
// an agent is set with textContent. History comes from api/history for the chosen range; the live
// range also grows with pushes. Alerts come from api/alerts and `event: alert`, and are shown on
// their cells, tiles, cards and the header.
"use strict";

(() => {
  const settings = document.body.dataset;
  const HISTORY_S = Number(settings.historyS) || 600;
  const STALE_AFTER_S = Number(settings.staleAfterS) || 15;
  const OFFLINE_AFTER_S = Number(settings.offlineAfterS) || 60;
  const BUSY_PERCENT = 20;
  const RANGES = {"1h": 3600, "6h": 6 * 3600, "24h": 24 * 3600, "7d": 7 * 86400, "30d": 30 * 86400};
  // Longer ranges are loaded again every minute (or step); the live range grows with pushes and
  // is loaded again only for its energy. A fifth of jitter keeps 1,000 pages from asking at once.
  const REFRESH_MS = 60000;
  const LIVE_REFRESH_MS = 300000;
  const RECONNECT_SPREAD_MS = 5000; // after a reconnect (a deploy: every page at once), load within this
  const RETRY_MS = 5000;
  const FIELDS = ["utilizationGpu", "memoryUsed", "temperatureGpu", "powerDraw"]; // the API's series
  const DETAIL = settings.detail || null; // the PC this page details (?pc=NAME), or null: the overview
  const FOCUS_GPU = DETAIL ? Number(new URLSearchParams(location.search).get("gpu") ?? NaN) : NaN;
  // name -> {name, data, status}; the detailed PC's entry also holds its card, history state and
  // gpus: Map(index -> tile). Other PCs have no card: the overview draws no charts.
  const devices = new Map();
  let skewS = 0; // this browser's clock minus the server's, in seconds
  let range = rangeFrom(new URLSearchParams(location.search).get("range")); // {key, s, live, label}
  // The overview: a row per PC, a cell per GPU; a PC's name or a cell opens its detail.
  const overview = DETAIL ? null : FleetOverview.create({
    root: document.getElementById("overview"), rows: document.getElementById("pcs"),
    search: document.getElementById("search"), sortSelect: document.getElementById("sort"),
    statusButtons: document.querySelectorAll("#overview [data-status]"),
    stateButtons: document.querySelectorAll("#overview [data-state]"),
    freeButton: document.getElementById("free-gpus"), shownCount: document.getElementById("shown-count"),
  });
  if (DETAIL) FleetOverview.backLink(document.getElementById("back"));

  // ---- formatting: a value the GPU did not report is a dash, never 0 ----------------------
  const {known, make, setText} = FleetOverview; // overview.js loads first: one copy of the DOM helpers
  const dash = "–";
  // One formatter each, made once: toLocaleString makes one a call, and was half the overview's script.
  const whole = new Intl.NumberFormat("en-US", {maximumFractionDigits: 0});
  const tenths = new Intl.NumberFormat("en-US", {minimumFractionDigits: 1, maximumFractionDigits: 1});
  const round = v => whole.format(Math.round(v));
  // Thousands separated as power's are: "3,432.9 / 7,676.3 GiB", not "3432.9 / 7676.3 GiB".
  const gib = mib => tenths.format(mib / 1024);
  const show = {
    util: g => known(g.utilizationGpu) ? `${round(g.utilizationGpu)} %` : dash,
    mem: g => (known(g.memoryUsed) && known(g.memoryTotal) ? `${gib(g.memoryUsed)} / ${gib(g.memoryTotal)} GiB`
      : known(g.memoryUsed) ? `${gib(g.memoryUsed)} GiB` : dash) + (g.memoryShared === true ? " shared" : ""),
    temp: g => known(g.temperatureGpu) ? `${round(g.temperatureGpu)} °C` : dash,
    power: g => known(g.powerDraw) ? (known(g.powerLimit) ? `${round(g.powerDraw)} / ${round(g.powerLimit)} W`
      : `${round(g.powerDraw)} W`) : dash,
    fan: g => known(g.fanSpeed) ? `${round(g.fanSpeed)} %` : dash,
    // Two clocks, not a value out of a maximum: "core 2,510 · memory 10,501 MHz".
    clocks: g => known(g.clockCore) || known(g.clockMemory)
      ? `core ${known(g.clockCore) ? round(g.clockCore) : dash} · memory ${known(g.clockMemory) ? round(g.clockMemory) : dash} MHz`
      : dash,
    pstate: g => g.pstate || dash,
  };
  const LABELS = {util: "Util", mem: "Memory", temp: "Temp", power: "Power", fan: "Fan", clocks: "Clocks", pstate: "Perf"};
  const OPTIONAL = {fan: ["fanSpeed"], clocks: ["clockCore", "clockMemory"], pstate: ["pstate"]};

  function level(kind, g) {
    if (kind === "temp" && known(g.temperatureGpu)) {
      return g.temperatureGpu >= 90 ? "level-hot" : g.temperatureGpu >= 80 ? "level-warn" : "";
    }
    if (kind === "util" && known(g.utilizationGpu)) {
      return g.utilizationGpu >= 95 ? "level-warn" : g.utilizationGpu >= BUSY_PERCENT ? "level-busy" : "";
    }
    if (kind === "mem" && known(g.memoryUsed) && known(g.memoryTotal) && g.memoryTotal > 0) {
      return g.memoryUsed / g.memoryTotal >= 0.95 ? "level-warn" : "";
    }
    return "";
  }

  function duration(s) {
    if (s % 86400 === 0) return `${s / 86400} d`;
    if (s % 3600 === 0) return `${s / 3600} h`;
    if (s % 60 === 0) return `${s / 60} min`;
    return `${s} s`;
  }

  function energy(wh) {
    if (!known(wh)) return dash;
    const text = wh >= 1e6 ? `${(wh / 1e6).toFixed(2)} MWh` : wh >= 1000 ? `${(wh / 1000).toFixed(2)} kWh`
      : wh >= 100 ? `${round(wh)} Wh` : wh >= 1 ? `${wh.toFixed(1)} Wh` : `${wh.toFixed(2)} Wh`;
    return `${text} in ${range.label}`;
  }

  function age(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 120) return `${s} s`;
    if (s < 7200) return `${Math.floor(s / 60)} min`;
    if (s < 172800) return `${Math.floor(s / 3600)} h`;
    return `${Math.floor(s / 86400)} d`;
  }

  // ---- DOM helpers ------------------------------------------------------------------------
  function insertSorted(parent, node, key, keyOf) {
    const next = [...parent.children].find(child => keyOf(child) > key);
    parent.insertBefore(node, next || null);
  }

  // ---- device cards and GPU tiles -----------------------------------------------------------
  function deviceEntry(name) {
    let entry = devices.get(name);
    if (entry) return entry;
    entry = {name, data: null, status: "online", card: null};
    devices.set(name, entry);
    document.getElementById("empty")?.remove();
    if (name === DETAIL) addCard(entry);
    return entry;
  }

  function addCard(entry) {
    const name = entry.name;
    const card = make("section", "device");
    card.dataset.device = name;
    const head = make("div", "device-head", card);
    Object.assign(entry, {
      card, gpus: new Map(),
      load: null, loadedAt: 0, step: 0, window: null, // the history request and its answer's step and span
      jitter: Math.random(), // spreads this device's reloads from other pages
      title: make("h2", "", head, name),
      badge: make("span", "badge online", head, "online"),
      seen: make("span", "seen", head, ""),
      host: make("span", "host", head, ""),
      alert: make("p", "device-alert", card),
      error: make("p", "device-error", card, ""),
      note: make("p", "history-note", card, ""),
      system: make("dl", "stats system", card), // the PC around its GPUs, when its agent sends it
      systemKey: "", hostTile: null, // its chart: CPU and memory, as a GPU's tile has (made at the first system)
      grid: make("div", "gpus", card),
    });
    document.getElementById("fleet").append(card);
    showAlerts(entry.card, entry.alert, deviceAlerts(name));
  }

  function gpuTile(entry, device, index) {
    let tile = entry.gpus.get(index);
    if (tile) return tile;
    const root = make("article", "gpu");
    root.dataset.index = String(index);
    const head = make("div", "gpu-head", root);
    tile = {root, gpu: {}, alerts: [], history: emptyColumns(), recent: [], energyWh: null, dirty: false,
      processesKey: "", rows: {}};
    make("span", "gpu-id", head, `${device}:${index}`);
    tile.name = make("span", "gpu-name", head, "");
    tile.vendor = make("span", "gpu-vendor", head, ""); // the vendor as text: AMD, Intel, Apple, NVIDIA
    tile.alert = make("p", "gpu-alert", root);
    tile.error = make("p", "gpu-error", root, "");
    const stats = make("dl", "stats", root);
    for (const kind of Object.keys(LABELS)) {
      const row = make("div", `stat ${kind}`, stats);
      make("dt", "", row, LABELS[kind]);
      tile.rows[kind] = {row, value: make("dd", "", row, dash)};
    }
    const energyRow = make("div", "stat energy", stats);
    make("dt", "", energyRow, "Energy");
    tile.energy = make("dd", "", energyRow, dash);
    tile.chart = GpuCharts.create(root, `${device}:${index} history`);
    tile.processes = make("ul", "processes", root);
    entry.gpus.set(index, tile);
    insertSorted(entry.grid, root, index, child => Number(child.dataset.index));
    tile.alerts = gpuAlerts(device, index);
    showAlerts(root, tile.alert, tile.alerts);
    if (index === FOCUS_GPU) { // ?gpu=N: the GPU a click on the overview's cell asked for
      root.classList.add("focus");
      requestAnimationFrame(() => root.scrollIntoView({block: "start"}));
    }
    return tile;
  }

  function renderGpu(tile, g) {
    setText(tile.name, g.name || "");
    const vendor = typeof g.vendor === "string" ? g.vendor : "";
    // Said once: "AMD Radeon RX 7800 XT" needs no "AMD" beside it, "Radeon RX 580 Series" does.
    setText(tile.vendor, vendor && !(g.name || "").toLowerCase().startsWith(vendor.toLowerCase()) ? vendor : "");
    setText(tile.error, g.error || "");
    for (const [kind, {row, value}] of Object.entries(tile.rows)) {
      const sent = !OPTIONAL[kind] || OPTIONAL[kind].some(field => field in g);
      row.hidden = !sent;
      setText(value, show[kind](g));
      const cls = alertLevel(tile, kind) || level(kind, g);
      if (value.className !== cls) value.className = cls;
    }
    const processes = Array.isArray(g.processes) ? g.processes : [];
    const key = JSON.stringify(processes.slice(0, 5));
    if (key !== tile.processesKey) {
      tile.processesKey = key;
      tile.processes.replaceChildren(...processes.slice(0, 5).map(p => {
        const item = make("li");
        make("span", "pname", item, `${p.pid ?? ""} ${p.command || p.name || ""}`.trim());
        if (typeof p.user === "string" && p.user) make("span", "puser", item, p.user); // who holds the GPU
        make("span", "", item, known(p.memoryUsed) ? `${gib(p.memoryUsed)} GiB` : dash);
        return item;
      }));
    }
  }

  // ---- history: the API's columns per GPU, the live range extended by pushes --------------------
  const emptyColumns = () => ({t: [], utilizationGpu: [], memoryUsed: [], temperatureGpu: [], powerDraw: []});

  function columnsFrom(g) {
    const columns = emptyColumns();
    const t = g && Array.isArray(g.t) ? g.t : [];
    t.forEach((ti, i) => {
      if (!known(ti)) return;
      columns.t.push(ti);
      for (const field of FIELDS) {
        const v = Array.isArray(g[field]) ? g[field][i] : null;
        columns[field].push(known(v) ? v : null);
      }
    });
    return columns;
  }

  // A push is a point in its step's bucket, as the server keeps it: one a second at the live step.
  function append(columns, p, step) {
    const bucket = Math.floor(p[0] / step) * step;
    const n = columns.t.length;
    if (n && bucket < columns.t[n - 1]) return;
    if (n && bucket === columns.t[n - 1]) FIELDS.forEach((field, i) => { columns[field][n - 1] = p[i + 1]; });
    else {
      columns.t.push(bucket);
      FIELDS.forEach((field, i) => columns[field].push(p[i + 1]));
    }
  }

  function trim(columns, cutoff) {
    let drop = 0;
    while (drop < columns.t.length && columns.t[drop] < cutoff) drop += 1;
    if (drop) for (const series of Object.values(columns)) series.splice(0, drop);
  }

  const serverNow = () => Date.now() / 1000 - skewS;
  const refreshMs = entry => (range.live ? LIVE_REFRESH_MS : Math.max(REFRESH_MS, 1000 * entry.step))
    * (1 + entry.jitter / 5);

  function drawTile(entry, tile) {
    tile.dirty = false;
    const step = entry.step || 1;
    let {from, to} = entry.window || {};
    if (range.live || !known(from)) {
      to = serverNow();
      from = to - range.s;
    }
    if (range.live) trim(tile.history, from - step);
    // A device is online until STALE_AFTER_S without a push, and agents push every few seconds,
    // so a gap is a stretch of no data longer than that, or than 2.5 steps on longer ranges.
    tile.chart.update(tile.history, tile.gpu, {from, to, rangeS: range.s, step, gapS: Math.max(2.5 * step, STALE_AFTER_S)});
  }

  function applyHistory(entry, answer) {
    const step = known(answer.step) && answer.step > 0 ? answer.step : 1;
    entry.step = step;
    if (!range.live && known(answer.from) && known(answer.to)) entry.window = {from: answer.from, to: answer.to};
    const sent = new Map((Array.isArray(answer.gpus) ? answer.gpus : []).map(g => [g.index, g]));
    for (const [index, tile] of entry.gpus) {
      const g = sent.get(index);
      fillTile(entry, tile, columnsFrom(g), step);
      tile.energyWh = g && known(g.energyWh) ? g.energyWh : null;
      setText(tile.energy, energy(tile.energyWh));
    }
    if (entry.hostTile) fillTile(entry, entry.hostTile, columnsFrom(systemColumns(answer.system)), step);
  }

  function fillTile(entry, tile, history, step) {
    tile.history = history;
    if (range.live) {
      // Samples newer than the answer's last bucket: history is written in batches, so the
      // answer may not hold the latest second or two yet.
      const last = history.t.length ? history.t[history.t.length - 1] : -Infinity;
      for (const p of tile.recent) if (Math.floor(p[0] / step) * step > last) append(history, p, step);
    }
    drawTile(entry, tile);
  }

  // The API's system series in a GPU's columns: CPU where utilization is, memory where memory is.
  function systemColumns(system) {
    return system && Array.isArray(system.t)
      ? {t: system.t, utilizationGpu: system.cpuPercent, memoryUsed: system.memoryUsed} : null;
  }
  const HOST_SERIES = {
    util: {rest: "cpu %", at: v => `cpu ${known(v) ? `${round(v)} %` : dash}`},
    temp: {rest: "", at: () => ""}, power: {rest: "", at: () => ""}, // a PC's history keeps neither
  };

  async function loadHistory(entry) {
    entry.load?.abort();
    const controller = new AbortController();
    entry.load = controller;
    entry.loadedAt = Date.now();
    const params = new URLSearchParams({device: entry.name});
    if (!range.live) {
      const to = Math.floor(serverNow());
      entry.window = {from: to - range.s, to};
      params.set("from", String(to - range.s));
      params.set("to", String(to));
    }
    try {
      const response = await fetch(`api/history?${params}`, {signal: controller.signal, cache: "no-store"});
      signedOut(response);
      // 404: the server has no history for this device (yet); the live range still grows with pushes.
      if (!response.ok && response.status !== 404) throw new Error(`HTTP ${response.status}`);
      const answer = response.ok ? await response.json() : {gpus: []};
      if (entry.load !== controller) return; // a newer request (another range) took over
      applyHistory(entry, answer);
      setText(entry.note, "");
    } catch (problem) {
      if (entry.load !== controller) return;
      setText(entry.note, `History could not be loaded (${problem.message}); trying again shortly.`);
      entry.loadedAt = Date.now() - refreshMs(entry) + RETRY_MS;
    } finally {
      if (entry.load === controller) entry.load = null;
    }
  }

  // Live charts are redrawn at most once a second (the window slides even without pushes);
  // other ranges when their data changes. Both load again every REFRESH_MS.
  setInterval(() => {
    if (document.hidden) return;
    for (const entry of devices.values()) {
      if (!entry.card) continue;
      if (!entry.load && Date.now() - entry.loadedAt >= refreshMs(entry)) loadHistory(entry);
      for (const tile of entry.gpus.values()) if (range.live || tile.dirty) drawTile(entry, tile);
      if (entry.hostTile && (range.live || entry.hostTile.dirty)) drawTile(entry, entry.hostTile);
    }
  }, 1000);

  // ---- the range picker: the live range (HISTORY_S) and longer ones; kept in the URL (?range=) ----
  const picker = document.getElementById("ranges") || document.createElement("div"); // the overview has none

  function rangeFrom(key) {
    return Object.hasOwn(RANGES, key) && RANGES[key] > HISTORY_S
      ? {key, s: RANGES[key], live: false, label: key.replace(/^\d+/, "$& ")} // "24h" -> "24 h", as on its button
      : {key: "live", s: HISTORY_S, live: true, label: duration(HISTORY_S)};
  }

  function showRange() {
    for (const button of picker.querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(button.dataset.range === range.key));
    }
  }

  function chooseRange(key) {
    const next = rangeFrom(key);
    if (next.key === range.key) return;
    range = next;
    const params = new URLSearchParams(location.search);
    if (range.live) params.delete("range");
    else params.set("range", range.key);
    const query = params.toString();
    history.replaceState(null, "", query ? `?${query}` : location.pathname);
    showRange();
    for (const entry of devices.values()) {
      if (!entry.card) continue;
      entry.window = null;
      entry.step = 0;
      for (const tile of entry.gpus.values()) {
        tile.history = emptyColumns();
        tile.energyWh = null;
        setText(tile.energy, dash);
        drawTile(entry, tile);
      }
      if (entry.hostTile) { entry.hostTile.history = emptyColumns(); drawTile(entry, entry.hostTile); }
      loadHistory(entry);
    }
  }

  for (const button of picker.querySelectorAll("button")) {
    const seconds = button.dataset.range === "live" ? HISTORY_S : RANGES[button.dataset.range];
    if (button.dataset.range === "live") {
      button.textContent = rangeFrom("live").label;
      button.title = `live: the last ${duration(HISTORY_S)}, extended as pushes arrive`;
    } else if (seconds <= HISTORY_S) {
      button.hidden = true; // not longer than the live range
    }
    button.addEventListener("click", () => chooseRange(button.dataset.range));
  }
  showRange();

  // ---- events -------------------------------------------------------------------------------
  // An online PC that reads no GPU and says why is a problem, not a green "online" (issue 30).
  function unread(entry) {
    const data = entry.data;
    return Boolean(data && data.error && !(Array.isArray(data.gpus) && data.gpus.length));
  }

  function setStatus(entry, status) {
    entry.status = status;
    overview?.status(entry.name, status);
    if (!entry.card) return;
    const shown = status === "online" && unread(entry) ? "problem" : status;
    if (!entry.card.classList.contains(shown)) {
      entry.card.classList.remove("online", "stale", "offline", "problem");
      entry.card.classList.add(shown);
      entry.badge.className = `badge ${shown}`;
      setText(entry.badge, shown === "problem" ? "⚠ no GPU read" : status);
    }
    updateSeen(entry);
  }

  // The overview shows pushes once a second, each PC's latest: 40 PCs pushing every 2 s would
  // otherwise make a frame (style, layout, paint) of almost every push, 15 a second. Its stream
  // comes once a second too (?every=1), a second's pushes in one write: a browser's cost is per
  // write it reads more than per byte. They are shown GATHER_MS after the first of them arrives,
  // time enough for the rest of that write, and MIN_GAP_MS after the last show at the soonest
  // (a stream that comes push by push, from a server that ignores ?every, is still shown twice a
  // second at most). Hidden, the page keeps them until it is seen again:
  // a tab in the background costs a JSON parse a push, no DOM work. A snapshot (the page opening,
  // a reconnect) is shown at the next frame. The detail shows each push at once: its live charts
  // keep every point, and draw nothing while hidden.
  const STREAM_EVERY_S = 1;
  const GATHER_MS = 50;
  const MIN_GAP_MS = 500;
  const held = new Map(); // name -> its latest push not shown yet
  let heldFrame = false, heldTimer = 0, shownAt = 0;
  function showHeld() {
    if (document.hidden) return;
    const pushes = [...held.values()];
    held.clear();
    for (const data of pushes) showPush(data);
    if (pushes.length) {
      updateTotals(); // once for them all: it goes over the whole fleet
      shownAt = Date.now();
    }
  }
  document.addEventListener("visibilitychange", showHeld);

  function onPush(data) {
    if (!data || typeof data.device !== "string") return;
    if (!data.snapshot) skewS = Date.now() / 1000 - data.receivedAt;
    if (!overview) return showPush(data);
    held.set(data.device, data);
    if (data.snapshot && !heldFrame) { // at the next frame; the timer below too, should frames not come
      heldFrame = true;
      requestAnimationFrame(() => { heldFrame = false; showHeld(); });
    }
    if (!heldTimer) {
      heldTimer = setTimeout(() => { heldTimer = 0; showHeld(); }, Math.max(GATHER_MS, shownAt + MIN_GAP_MS - Date.now()));
    }
  }

  function showPush(data) {
    const firstSight = !devices.has(data.device);
    const entry = deviceEntry(data.device);
    entry.data = data;
    setStatus(entry, data.status || "online");
    overview?.push(data);
    cellAlerts(entry);
    if (entry.card) showCard(entry, data, firstSight);
  }

  function showCard(entry, data, firstSight) {
    setText(entry.host, data.host && data.host !== data.device ? `host ${data.host}` : "");
    showSystem(entry, data.system);
    if (data.system && typeof data.system === "object") {
      if (!entry.hostTile) { // its chart, under its values, at the first push that has them
        const box = make("div", "system-chart");
        entry.system.after(box);
        entry.hostTile = {chart: GpuCharts.create(box, `${entry.name} CPU and memory history`, HOST_SERIES),
          history: emptyColumns(), recent: [], gpu: {}, dirty: false};
      }
      entry.hostTile.gpu = {memoryTotal: data.system.memoryTotal}; // memory as a share of it
      if (known(data.receivedAt)) {
        remember(entry, entry.hostTile, {utilizationGpu: data.system.cpuPercent, memoryUsed: data.system.memoryUsed},
          data.receivedAt);
      }
    }
    setText(entry.error, data.error ? `Cannot read GPUs: ${data.error}` : "");
    entry.error.title = data.error || ""; // the whole of it, should the card's width wrap it
    const seen = new Set();
    for (const g of Array.isArray(data.gpus) ? data.gpus : []) {
      const tile = gpuTile(entry, data.device, g.index);
      seen.add(g.index);
      renderGpu(tile, g);
      tile.gpu = g;
      if (known(data.receivedAt)) remember(entry, tile, g, data.receivedAt); // a snapshot's state is a sample too
    }
    for (const [index, tile] of entry.gpus) {
      if (!seen.has(index)) { tile.chart.destroy(); tile.root.remove(); entry.gpus.delete(index); }
    }
    // A snapshot comes on every (re)connect: what we missed while away is in the history. After
    // a reconnect, the load waits a random moment, so a deploy's reconnecting pages spread out.
    if (firstSight) loadHistory(entry);
    else if (data.snapshot) entry.loadedAt = Date.now() - refreshMs(entry) + Math.random() * RECONNECT_SPREAD_MS;
  }

  // The PC: CPU, memory, each disk, network, what it runs; rows rebuilt only when a value changed.
  function showSystem(entry, system) {
    const rows = [];
    if (system && typeof system === "object") {
      const s = system, text = v => typeof v === "string" ? v : "";
      const rate = v => known(v) ? `${(v / 1e6).toLocaleString("en-US", {maximumFractionDigits: 2})} MB/s` : dash;
      rows.push(["CPU", `${known(s.cpuPercent) ? `${round(s.cpuPercent)} %` : dash}${known(s.cpuCount) ? ` of ${s.cpuCount} threads` : ""}`
        + `${known(s.temperatureCpu) ? ` · ${round(s.temperatureCpu)} °C` : ""}${known(s.load1) ? ` · load ${s.load1}` : ""}`]);
      rows.push(["Memory", known(s.memoryUsed) && known(s.memoryTotal) ? `${gib(s.memoryUsed)} / ${gib(s.memoryTotal)} GiB`
        + (known(s.swapUsed) && s.swapUsed > 0 ? ` · swap ${gib(s.swapUsed)} GiB` : "") : dash]);
      for (const d of Array.isArray(s.disks) ? s.disks.slice(0, 16) : []) {
        if (d && known(d.used) && known(d.total)) {
          rows.push([`Disk ${text(d.mount)}`, `${gib(d.used)} / ${gib(d.total)} GiB (${d.total > 0 ? round(100 * d.used / d.total) : 0} %)`]);
        }
      }
      rows.push(["Network", `in ${rate(s.netRx)} · out ${rate(s.netTx)}`]);
      if (text(s.os) || text(s.cpuModel)) rows.push(["System", [text(s.os), text(s.cpuModel)].filter(Boolean).join(" · ")]);
      if (known(s.uptimeS)) rows.push(["Up", age(s.uptimeS)]);
    }
    const key = JSON.stringify(rows);
    if (key === entry.systemKey) return;
    entry.systemKey = key;
    entry.system.replaceChildren(...rows.map(([label, value]) => {
      const row = make("div", "stat");
      make("dt", "", row, label);
      make("dd", "", row, value);
      return row;
    }));
  }

  function remember(entry, tile, g, t) {
    const p = [t, ...FIELDS.map(field => known(g[field]) ? g[field] : null)];
    tile.recent.push(p);
    while (tile.recent.length && tile.recent[0][0] < t - 120) tile.recent.shift();
    if (range.live) {
      append(tile.history, p, entry.step || 1);
      tile.dirty = true;
    }
  }

  function onStatus(change) {
    if (known(change.at)) skewS = Date.now() / 1000 - change.at;
    const pending = held.get(change.device);
    if (pending) { // a status for a push not shown yet: it goes with that push
      if (change.status === "removed") held.delete(change.device);
      else held.set(change.device, {...pending, status: change.status, receivedAt: change.receivedAt ?? pending.receivedAt});
    }
    const entry = devices.get(change.device);
    if (!entry) return;
    if (change.status === "removed") { // an admin removed the device: its card goes
      entry.load?.abort();
      entry.card?.remove();
      devices.delete(change.device);
      overview?.remove(change.device);
      updateTotals();
      return;
    }
    if (!entry.data) return;
    entry.data.receivedAt = change.receivedAt;
    setStatus(entry, change.status);
    updateTotals();
  }

  function lastSeenS(entry) {
    return Date.now() / 1000 - skewS - entry.data.receivedAt;
  }

  function updateSeen(entry) {
    if (entry.card) setText(entry.seen, entry.status === "online" || !entry.data ? "" : `last seen ${age(lastSeenS(entry))} ago`);
  }

  function updateTotals() {
    if (!overview) return; // the detail view shows one PC: no fleet totals
    const count = {online: 0, stale: 0, offline: 0};
    let gpus = 0, busy = 0, used = 0, total = 0, watts = 0, anyMem = false, anyWatts = false;
    for (const entry of devices.values()) {
      count[entry.status] += 1;
      const list = entry.data && Array.isArray(entry.data.gpus) ? entry.data.gpus : [];
      gpus += list.length;
      if (entry.status === "offline") continue; // old readings are not today's load
      for (const g of list) {
        if (known(g.utilizationGpu) && g.utilizationGpu >= BUSY_PERCENT) busy += 1;
        // A Mac's or an APU's memory is the system's: counting it would make the fleet's VRAM a lie.
        if (known(g.memoryUsed) && known(g.memoryTotal) && g.memoryShared !== true) {
          used += g.memoryUsed; total += g.memoryTotal; anyMem = true;
        }
        if (known(g.powerDraw)) { watts += g.powerDraw; anyWatts = true; }
      }
    }
    setText(document.getElementById("total-online"), String(count.online));
    setText(document.getElementById("total-stale"), String(count.stale));
    setText(document.getElementById("total-offline"), String(count.offline));
    setText(document.getElementById("total-gpus"), String(gpus));
    setText(document.getElementById("total-busy"), String(busy));
    setText(document.getElementById("total-vram"), anyMem ? `${gib(used)} / ${gib(total)} GiB` : dash);
    setText(document.getElementById("total-power"), anyWatts ? `${round(watts)} W` : dash);
  }

  // Counts "last seen" up, and dims devices the server cannot tell us about (after a server
  // restart it knows only the devices that pushed since; while we are cut off, nobody pushes).
  setInterval(() => {
    if (document.hidden) return; // nothing to see: the held pushes are shown, and this runs, when it is
    let changed = false;
    for (const entry of devices.values()) {
      if (!entry.data) continue;
      const ageS = lastSeenS(entry);
      const local = ageS >= OFFLINE_AFTER_S ? "offline" : ageS >= STALE_AFTER_S ? "stale" : "online";
      const rank = {online: 0, stale: 1, offline: 2};
      if (rank[local] > rank[entry.status]) { setStatus(entry, local); changed = true; }
      else updateSeen(entry);
    }
    if (changed) updateTotals();
    overview?.tick();
  }, 1000);

  // ---- alerts: the server's rules fire and resolve them; this page shows the active ones on their
  // tiles and cards and counts them in the header, and lists the newest few. api/alerts is loaded
  // on every (re)connect (a page that was away missed events) and once a minute; between loads,
  // `event: alert` events are applied as they come. Words always say what the colour says.
  const ALERTS_REFRESH_MS = 60000;
  const RECENT_SHOWN = 10;
  const RECENT_KEPT = 100; // as many as the server keeps
  const KINDS = {GpuHot: "Hot", GpuMemoryFull: "Memory full", DeviceOffline: "Offline", GpuError: "GPU error",
    GpuJobDone: "Job done", GpuIdleHeld: "Held idle", HostMemoryFull: "PC memory full", DiskFull: "Disk full"};
  const SEVERITIES = ["critical", "warning", "info"]; // worst first
  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  // One entry per alert instance (`fingerprint startsAt`: its firing, then its resolution), with
  // the moment this page learned its state.
  const alerts = new Map(); // key -> {alert, seenAt}
  let active = new Map(); // JSON [device, gpu or null] -> its firing alerts, newest first
  let alertsKnown = false; // api/alerts has answered once: the count can be told
  const alertsLoad = {request: null, at: 0, jitter: Math.random()};
  const shownAlerts = new WeakMap(); // the line on a tile or card -> the key of what it shows
  const counter = document.getElementById("alert-count");
  const recentSection = document.getElementById("alerts");
  const recentList = document.getElementById("alert-list");
  let recentKey = "";
  const onlyDevices = (() => { // the page's ?device= filter, as the stream applies it; the detail's PC
    if (DETAIL) return new Set([DETAIL]);
    const only = new URLSearchParams(location.search).get("device");
    const names = only ? only.split(",").map(d => d.trim()).filter(Boolean) : [];
    return names.length ? new Set(names) : null;
  })();

  const alertKey = a => `${a.fingerprint} ${a.startsAt}`;
  const changedAt = a => Date.parse(a.endsAt || a.startsAt) || 0; // its latest transition
  const where = (device, gpu) => JSON.stringify([device, gpu ?? null]);
  const severity = a => SEVERITIES.includes(a.severity) ? a.severity : "warning";
  const tone = a => a.alertname === "GpuJobDone" ? "good" : a.status === "resolved" ? "resolved" : severity(a);
  const deviceAlerts = name => active.get(where(name, null)) || [];
  const gpuAlerts = (name, index) => active.get(where(name, index)) || [];
  // The stat an active alert is about takes its colour: the server's threshold, not the page's.
  const STAT_ALERTS = {temp: "GpuHot", mem: "GpuMemoryFull"};
  const LEVELS = {critical: "level-hot", warning: "level-warn"};

  // The overview's row of a PC shows its own alerts; its cells their GPUs' worst, hot while GpuHot fires.
  function cellAlerts(entry) {
    if (!overview) return;
    const own = deviceAlerts(entry.name);
    overview.pcAlerts(entry.name, SEVERITIES.find(s => own.some(a => severity(a) === s)),
      [...new Set(own.map(a => KINDS[a.alertname] || a.alertname))], own.map(a => a.summary || "").join("\n"));
    if (!entry.data || !Array.isArray(entry.data.gpus)) return;
    for (const g of entry.data.gpus) {
      const list = gpuAlerts(entry.name, g.index);
      overview.alerts(entry.name, g.index, SEVERITIES.find(s => list.some(a => severity(a) === s)),
        list.some(a => a.alertname === "GpuHot"), list.some(a => a.alertname === "GpuIdleHeld"));
    }
  }

  function alertLevel(tile, kind) {
    const alert = tile.alerts.find(a => a.alertname === STAT_ALERTS[kind]);
    return alert ? LEVELS[severity(alert)] || "" : "";
  }

  function isAlert(a) {
    return Boolean(a) && typeof a.fingerprint === "string" && typeof a.startsAt === "string"
      && typeof a.device === "string" && (a.status === "firing" || a.status === "resolved")
      && (!onlyDevices || onlyDevices.has(a.device));
  }

  function when(iso) {
    const d = new Date(iso);
    if (!Number.isFinite(d.getTime())) return "";
    const time = `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
    return d.toDateString() === new Date().toDateString() ? time : `${d.getDate()} ${MONTHS[d.getMonth()]} ${time}`;
  }

  // A tile says "Hot: 91 °C since 04:10" (the value when it fired); a card, the alert's summary.
  function label(a) {
    if (a.gpu === undefined || a.gpu === null) return a.summary || KINDS[a.alertname] || a.alertname;
    const unit = {GpuHot: " °C", GpuMemoryFull: " %"}[a.alertname];
    const value = unit && known(a.value) ? `: ${round(a.value)}${unit}` : "";
    return `${KINDS[a.alertname] || a.alertname}${value} since ${when(a.startsAt)}`;
  }

  // An instance fires, then resolves: its firing never undoes its resolution, whichever of the two
  // this page hears last (an answer asked before the resolution was sent comes after it, say).
  function takeAlert(alert, seenAt) {
    if (!isAlert(alert)) return;
    const key = alertKey(alert);
    const had = alerts.get(key);
    if (had && had.alert.status === "resolved" && alert.status === "firing") return;
    alerts.set(key, {alert, seenAt});
  }

  // A fleet-wide storm sends many alerts at once: the page is drawn once a frame, not once an alert.
  let renderQueued = false;
  function onAlert(alert) {
    takeAlert(alert, Date.now());
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderAlerts();
    });
  }

  function applyAlerts(answer, askedAt) {
    // The answer knows all this page learned before it asked; what it leaves out is over (it
    // resolved while this page was away, or the server no longer keeps it). Events that came
    // after the question stay, and are merged with the answer instance by instance.
    for (const [key, entry] of alerts) if (entry.seenAt < askedAt) alerts.delete(key);
    for (const list of [answer.recent, answer.active]) {
      for (const alert of Array.isArray(list) ? list : []) takeAlert(alert, askedAt);
    }
    alertsKnown = true;
    renderAlerts();
  }

  // Show `list` on a tile or card; return whether that changed anything.
  function showAlerts(root, line, list) {
    const key = JSON.stringify(list.map(a => [alertKey(a), a.summary]));
    if (shownAlerts.get(line) === key) return false;
    shownAlerts.set(line, key);
    line.replaceChildren(...list.map(a => {
      const note = make("span", `alert-note ${severity(a)}`, null, label(a));
      if (a.summary) note.title = a.summary;
      return note;
    }));
    const worst = SEVERITIES.find(s => list.some(a => severity(a) === s));
    if (worst) root.dataset.alert = worst;
    else delete root.dataset.alert;
    return true;
  }

  function alertItem(a) {
    const item = make("li", `alert-item ${tone(a)}`);
    const time = make("time", "", item, when(a.endsAt || a.startsAt));
    time.dateTime = a.endsAt || a.startsAt;
    const done = a.alertname === "GpuJobDone"; // news, not a problem: no kind word, no red
    make("span", `badge ${tone(a)}`, item, done ? "job done" : a.status);
    if (!done) make("span", "alert-kind", item, KINDS[a.alertname] || a.alertname);
    make("span", "alert-summary", item, a.summary || "");
    return item;
  }

  function renderAlerts() {
    const recent = [...alerts.values()].map(entry => entry.alert).sort((a, b) => changedAt(b) - changedAt(a));
    for (const a of recent.slice(RECENT_KEPT)) if (a.status !== "firing") alerts.delete(alertKey(a));
    const latest = new Map(); // fingerprint -> its newest instance
    for (const a of recent) {
      const had = latest.get(a.fingerprint);
      if (!had || Date.parse(a.startsAt) > Date.parse(had.startsAt)) latest.set(a.fingerprint, a);
    }
    // GpuJobDone fires and resolves at once: it is news for the list, never a standing problem.
    const firing = [...latest.values()].filter(a => a.status === "firing" && a.alertname !== "GpuJobDone");
    active = new Map();
    for (const a of firing) {
      const at = where(a.device, a.gpu);
      active.set(at, [...(active.get(at) || []), a]);
    }
    for (const entry of devices.values()) {
      cellAlerts(entry);
      if (!entry.card) continue;
      showAlerts(entry.card, entry.alert, deviceAlerts(entry.name));
      for (const [index, tile] of entry.gpus) {
        tile.alerts = gpuAlerts(entry.name, index);
        if (showAlerts(tile.root, tile.alert, tile.alerts)) renderGpu(tile, tile.gpu);
      }
    }
    counter.hidden = !alertsKnown;
    const worst = SEVERITIES.find(s => firing.some(a => severity(a) === s));
    counter.className = `alert-count ${worst || "none"}`;
    setText(counter, firing.length === 0 ? "no alerts" : firing.length === 1 ? "1 alert" : `${firing.length} alerts`);
    const shown = recent.slice(0, RECENT_SHOWN);
    recentSection.hidden = shown.length === 0;
    const key = JSON.stringify(shown.map(a => [alertKey(a), a.status, a.summary]));
    if (key !== recentKey) {
      recentKey = key;
      recentList.replaceChildren(...shown.map(alertItem));
    }
  }

  const alertsRefreshMs = () => ALERTS_REFRESH_MS * (1 + alertsLoad.jitter / 5);

  async function loadAlerts() {
    alertsLoad.request?.abort();
    const controller = new AbortController();
    alertsLoad.request = controller;
    const askedAt = alertsLoad.at = Date.now();
    try {
      const response = await fetch("api/alerts", {signal: controller.signal, cache: "no-store"});
      signedOut(response);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const answer = await response.json();
      if (alertsLoad.request === controller) applyAlerts(answer, askedAt);
    } catch {
      if (alertsLoad.request === controller) alertsLoad.at = Date.now() - alertsRefreshMs() + RETRY_MS;
    } finally {
      if (alertsLoad.request === controller) alertsLoad.request = null;
    }
  }

  // Loaded again every minute (a page that fell behind may have missed events), from the first
  // (re)connect on; see connect() for the loads that follow a reconnect.
  setInterval(() => {
    if (document.hidden || alertsLoad.request || !alertsLoad.at) return;
    if (Date.now() - alertsLoad.at >= alertsRefreshMs()) loadAlerts();
  }, 1000);

  // ---- the connection -------------------------------------------------------------------------
  const connection = document.getElementById("connection");
  let retryMs = 1000;

  function setConnection(state, text) {
    connection.className = `connection ${state}`;
    setText(connection, text);
  }

  function streamUrl() {
    const only = DETAIL || new URLSearchParams(location.search).get("device");
    const params = new URLSearchParams(only ? {device: only} : {});
    if (overview) params.set("every", String(STREAM_EVERY_S)); // it shows changes once a second: it asks for them so
    const query = params.toString();
    return query ? `gpu/stream?${query}` : "gpu/stream";
  }

  // A 401 means the session is over (signed out elsewhere, its password changed, a link revoked):
  // the sign-in page, coming back here after.
  function signedOut(response) {
    if (response.status === 401) location.assign(`login?next=${encodeURIComponent(location.pathname + location.search)}`);
  }

  function connect() {
    const source = new EventSource(streamUrl());
    source.onopen = () => {
      retryMs = 1000;
      setConnection("live", "live");
      // Alerts fired or resolved while this page was not listening are in api/alerts, asked once
      // the stream is open so nothing falls between the two. After a reconnect (a deploy: every
      // page at once) the load waits a random moment, as history's does.
      if (!alertsLoad.at) loadAlerts();
      else alertsLoad.at = Date.now() - alertsRefreshMs() + Math.random() * RECONNECT_SPREAD_MS;
    };
    source.onmessage = event => onPush(JSON.parse(event.data));
    source.addEventListener("status", event => onStatus(JSON.parse(event.data)));
    source.addEventListener("alert", event => onAlert(JSON.parse(event.data)));
    source.onerror = () => {
      setConnection("reconnecting", "reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        // A 502/503 (a proxy during a restart, or the server's viewer cap) ends an EventSource
        // for good; the browser will not retry, so we make a new one, with backoff and jitter.
        source.close();
        fetch("api/alerts", {cache: "no-store"}).then(signedOut, () => {}); // a 401 ends a stream too
        setTimeout(connect, retryMs * (0.5 + Math.random() / 2));
        retryMs = Math.min(retryMs * 2, 30000);
      }
    };
  }

  connect();
})();
