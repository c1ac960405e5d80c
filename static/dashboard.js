// The dashboard: one EventSource, one card per device, one tile per GPU, all updated in place
// (the DOM does not grow with time). Every string from an agent is set with textContent.
"use strict";

(() => {
  const settings = document.body.dataset;
  const HISTORY_S = Number(settings.historyS) || 600;
  const STALE_AFTER_S = Number(settings.staleAfterS) || 15;
  const OFFLINE_AFTER_S = Number(settings.offlineAfterS) || 60;
  const BUSY_PERCENT = 20;
  const SVG = "http://www.w3.org/2000/svg";
  const SERIES = ["util", "mem", "temp", "power"];
  const devices = new Map(); // name -> {data, status, card parts, gpus: Map(index -> tile)}
  let skewS = 0; // this browser's clock minus the server's, in seconds

  // ---- formatting: a value the GPU did not report is a dash, never 0 ----------------------
  const known = v => typeof v === "number" && Number.isFinite(v);
  const dash = "–";
  const round = v => Math.round(v).toLocaleString("en-US");
  const gib = mib => (mib / 1024).toFixed(1);
  const show = {
    util: g => known(g.utilizationGpu) ? `${round(g.utilizationGpu)} %` : dash,
    mem: g => known(g.memoryUsed) && known(g.memoryTotal) ? `${gib(g.memoryUsed)} / ${gib(g.memoryTotal)} GiB`
      : known(g.memoryUsed) ? `${gib(g.memoryUsed)} GiB` : dash,
    temp: g => known(g.temperatureGpu) ? `${round(g.temperatureGpu)} °C` : dash,
    power: g => known(g.powerDraw) ? (known(g.powerLimit) ? `${round(g.powerDraw)} / ${round(g.powerLimit)} W`
      : `${round(g.powerDraw)} W`) : dash,
    fan: g => known(g.fanSpeed) ? `${round(g.fanSpeed)} %` : dash,
    clocks: g => known(g.clockCore) || known(g.clockMemory)
      ? `${known(g.clockCore) ? round(g.clockCore) : dash} / ${known(g.clockMemory) ? round(g.clockMemory) : dash} MHz` : dash,
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

  function age(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 120) return `${s} s`;
    if (s < 7200) return `${Math.floor(s / 60)} min`;
    return `${Math.floor(s / 3600)} h`;
  }

  // ---- DOM helpers ------------------------------------------------------------------------
  function make(tag, className, parent, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    if (parent) parent.append(node);
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function insertSorted(parent, node, key, keyOf) {
    const next = [...parent.children].find(child => keyOf(child) > key);
    parent.insertBefore(node, next || null);
  }

  // ---- device cards and GPU tiles -----------------------------------------------------------
  function deviceEntry(name) {
    let entry = devices.get(name);
    if (entry) return entry;
    const card = make("section", "device");
    card.dataset.device = name;
    const head = make("div", "device-head", card);
    entry = {
      card, gpus: new Map(), data: null, status: "online",
      title: make("h2", "", head, name),
      badge: make("span", "badge online", head, "online"),
      seen: make("span", "seen", head, ""),
      host: make("span", "host", head, ""),
      error: make("p", "device-error", card, ""),
      grid: make("div", "gpus", card),
    };
    devices.set(name, entry);
    document.getElementById("empty")?.remove();
    // Cards keep a stable order: by name, whatever order pushes arrive in.
    insertSorted(document.getElementById("fleet"), card, name, child => child.dataset.device);
    return entry;
  }

  function gpuTile(entry, device, index) {
    let tile = entry.gpus.get(index);
    if (tile) return tile;
    const root = make("article", "gpu");
    root.dataset.index = String(index);
    const head = make("div", "gpu-head", root);
    tile = {root, history: [], processesKey: "", rows: {}};
    make("span", "gpu-id", head, `${device}:${index}`);
    tile.name = make("span", "gpu-name", head, "");
    tile.error = make("p", "gpu-error", root, "");
    const stats = make("dl", "stats", root);
    for (const kind of Object.keys(LABELS)) {
      const row = make("div", "stat", stats);
      make("dt", "", row, LABELS[kind]);
      tile.rows[kind] = {row, value: make("dd", "", row, dash)};
    }
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "chart");
    svg.setAttribute("viewBox", "0 0 100 100");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `${device}:${index} history`);
    tile.lines = {};
    for (const series of SERIES) {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", series);
      svg.append(line);
      tile.lines[series] = line;
    }
    root.append(svg);
    const legend = make("div", "legend", root);
    for (const [series, label] of [["util", "util %"], ["mem", "memory %"], ["temp", "°C"], ["power", "power %"]]) {
      make("span", series, legend, label);
    }
    tile.processes = make("ul", "processes", root);
    entry.gpus.set(index, tile);
    insertSorted(entry.grid, root, index, child => Number(child.dataset.index));
    return tile;
  }

  function renderGpu(tile, g) {
    setText(tile.name, g.name || "");
    setText(tile.error, g.error || "");
    for (const [kind, {row, value}] of Object.entries(tile.rows)) {
      const sent = !OPTIONAL[kind] || OPTIONAL[kind].some(field => field in g);
      row.hidden = !sent;
      setText(value, show[kind](g));
      const cls = level(kind, g);
      if (value.className !== cls) value.className = cls;
    }
    const processes = Array.isArray(g.processes) ? g.processes : [];
    const key = JSON.stringify(processes.slice(0, 5));
    if (key !== tile.processesKey) {
      tile.processesKey = key;
      tile.processes.replaceChildren(...processes.slice(0, 5).map(p => {
        const item = make("li");
        make("span", "pname", item, `${p.pid ?? ""} ${p.name ?? ""}`.trim());
        make("span", "", item, known(p.memoryUsed) ? `${gib(p.memoryUsed)} GiB` : dash);
        return item;
      }));
    }
  }

  // ---- history charts: util %, memory % of total, °C, power % of limit, on one 0-100 scale ----
  function point(t, g, util, memUsed, temp, power) {
    const limit = known(g.powerLimit) && g.powerLimit > 0 ? g.powerLimit : null;
    return [t, util,
      known(memUsed) && known(g.memoryTotal) && g.memoryTotal > 0 ? 100 * memUsed / g.memoryTotal : null,
      temp, known(power) && limit ? 100 * power / limit : null];
  }

  function remember(tile, g, t, snapshotHistory) {
    if (snapshotHistory) {
      const h = snapshotHistory;
      tile.history = (h.t || []).map((ht, i) => point(ht, g, h.utilizationGpu[i], h.memoryUsed[i],
        h.temperatureGpu[i], h.powerDraw[i]));
    } else {
      const p = point(t, g, g.utilizationGpu, g.memoryUsed, g.temperatureGpu, g.powerDraw);
      const last = tile.history[tile.history.length - 1];
      if (last && t - last[0] < 1) tile.history[tile.history.length - 1] = p; // one point a second, as the server
      else tile.history.push(p);
    }
    const cutoff = t - HISTORY_S;
    while (tile.history.length && tile.history[0][0] < cutoff) tile.history.shift();
    draw(tile, t);
  }

  function draw(tile, now) {
    SERIES.forEach((series, i) => {
      const points = [];
      for (const p of tile.history) {
        const v = p[i + 1];
        if (!known(v)) continue;
        const x = 100 - (now - p[0]) / HISTORY_S * 100;
        const y = 100 - Math.max(0, Math.min(100, v));
        points.push(`${x.toFixed(2)},${y.toFixed(2)}`);
      }
      tile.lines[series].setAttribute("points", points.join(" "));
    });
  }

  // ---- events -------------------------------------------------------------------------------
  function setStatus(entry, status) {
    entry.status = status;
    if (!entry.card.classList.contains(status)) {
      entry.card.classList.remove("online", "stale", "offline");
      entry.card.classList.add(status);
      entry.badge.className = `badge ${status}`;
      setText(entry.badge, status);
    }
    updateSeen(entry);
  }

  function onPush(data) {
    if (!data || typeof data.device !== "string") return;
    if (!data.snapshot) skewS = Date.now() / 1000 - data.receivedAt;
    const entry = deviceEntry(data.device);
    entry.data = data;
    setText(entry.host, data.host && data.host !== data.device ? `host ${data.host}` : "");
    setText(entry.error, data.error ? `Cannot read GPUs: ${data.error}` : "");
    const seen = new Set();
    for (const g of Array.isArray(data.gpus) ? data.gpus : []) {
      const tile = gpuTile(entry, data.device, g.index);
      seen.add(g.index);
      renderGpu(tile, g);
      remember(tile, g, data.receivedAt, data.snapshot ? g.history : null);
    }
    for (const [index, tile] of entry.gpus) {
      if (!seen.has(index)) { tile.root.remove(); entry.gpus.delete(index); }
    }
    setStatus(entry, data.status || "online");
    updateTotals();
  }

  function onStatus(change) {
    if (known(change.at)) skewS = Date.now() / 1000 - change.at;
    const entry = devices.get(change.device);
    if (!entry || !entry.data) return;
    entry.data.receivedAt = change.receivedAt;
    setStatus(entry, change.status);
    updateTotals();
  }

  function lastSeenS(entry) {
    return Date.now() / 1000 - skewS - entry.data.receivedAt;
  }

  function updateSeen(entry) {
    setText(entry.seen, entry.status === "online" || !entry.data ? "" : `last seen ${age(lastSeenS(entry))} ago`);
  }

  function updateTotals() {
    const count = {online: 0, stale: 0, offline: 0};
    let gpus = 0, busy = 0, used = 0, total = 0, watts = 0, anyMem = false, anyWatts = false;
    for (const entry of devices.values()) {
      count[entry.status] += 1;
      const list = entry.data && Array.isArray(entry.data.gpus) ? entry.data.gpus : [];
      gpus += list.length;
      if (entry.status === "offline") continue; // old readings are not today's load
      for (const g of list) {
        if (known(g.utilizationGpu) && g.utilizationGpu >= BUSY_PERCENT) busy += 1;
        if (known(g.memoryUsed) && known(g.memoryTotal)) { used += g.memoryUsed; total += g.memoryTotal; anyMem = true; }
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
  }, 1000);

  // ---- the connection -------------------------------------------------------------------------
  const connection = document.getElementById("connection");
  let retryMs = 1000;

  function setConnection(state, text) {
    connection.className = `connection ${state}`;
    setText(connection, text);
  }

  function streamUrl() {
    const only = new URLSearchParams(location.search).get("device");
    return only ? `gpu/stream?device=${encodeURIComponent(only)}` : "gpu/stream";
  }

  function connect() {
    const source = new EventSource(streamUrl());
    source.onopen = () => { retryMs = 1000; setConnection("live", "live"); };
    source.onmessage = event => onPush(JSON.parse(event.data));
    source.addEventListener("status", event => onStatus(JSON.parse(event.data)));
    source.onerror = () => {
      setConnection("reconnecting", "reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        // A 502/503 (a proxy during a restart, or the server's viewer cap) ends an EventSource
        // for good; the browser will not retry, so we make a new one, with backoff and jitter.
        source.close();
        setTimeout(connect, retryMs * (0.5 + Math.random() / 2));
        retryMs = Math.min(retryMs * 2, 30000);
      }
    };
  }

  connect();
})();
