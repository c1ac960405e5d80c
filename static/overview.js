// The fleet overview: one compact row per PC, one small cell per GPU, read at a glance for
// hundreds of GPUs. Cells are updated by setting only what changed; nothing here reads layout.
// Search, filters and sort narrow and order the rows, and live in the URL (?q=&status=&state=&sort=).
// A PC's name opens its detail (?pc=NAME), a cell its GPU's (?pc=NAME&gpu=N): links, so a middle
// click opens a tab and Back comes back to this view.
// Every string from an agent is set with textContent.
"use strict";

window.FleetOverview = (() => {
  const BUSY_PERCENT = 20;
  const HOT_C = 80;
  const FREE_PERCENT = 5; // free: under 5 % utilization and under 5 % of memory used, on an online PC
  const STATES = { // the cell's state, worst first: its glyph says it without the colour
    error: {glyph: "✖", text: "error"}, stale: {glyph: "◌", text: "no recent data"},
    hot: {glyph: "▲", text: "hot"}, busy: {glyph: "●", text: "busy"},
    used: {glyph: "◐", text: "in use"}, free: {glyph: "○", text: "free"},
  };
  const STATUSES = ["online", "stale", "offline", "problem"];
  const FILTER_STATES = ["busy", "free", "hot"];
  const SORTS = {name: "name", util: "utilization", mem: "memory", temp: "temperature", power: "power",
    seen: "last push"};
  const known = v => typeof v === "number" && Number.isFinite(v);
  const memShare = g => known(g.memoryUsed) && known(g.memoryTotal) && g.memoryTotal > 0
    ? 100 * g.memoryUsed / g.memoryTotal : null;
  const pct = v => known(v) ? `${Math.round(v)}%` : "–";
  // Bytes a second, short: "1.2M", "83k", "0".
  const rate = v => !known(v) ? "–" : v >= 1e9 ? `${(v / 1e9).toFixed(1)}G` : v >= 1e6 ? `${(v / 1e6).toFixed(1)}M`
    : v >= 1e3 ? `${Math.round(v / 1e3)}k` : String(Math.round(v));

  // The PC around its GPUs (the agent's `system`): CPU, memory, its fullest disk, network in and out.
  function hostLine(system) {
    if (!system || typeof system !== "object") return {text: "", title: ""};
    const memory = known(system.memoryUsed) && known(system.memoryTotal) && system.memoryTotal > 0
      ? 100 * system.memoryUsed / system.memoryTotal : null;
    const disks = (Array.isArray(system.disks) ? system.disks : [])
      .filter(d => d && known(d.used) && known(d.total) && d.total > 0);
    const fullest = disks.reduce((most, d) => !most || d.used / d.total > most.used / most.total ? d : most, null);
    const text = `cpu ${pct(system.cpuPercent)} · mem ${pct(memory)} · disk ${fullest ? pct(100 * fullest.used / fullest.total) : "–"}`
      + ` · ↓${rate(system.netRx)} ↑${rate(system.netTx)}`;
    const title = [typeof system.os === "string" ? system.os : "", typeof system.cpuModel === "string" ? system.cpuModel : "",
      `CPU ${pct(system.cpuPercent)}${known(system.temperatureCpu) ? ` at ${Math.round(system.temperatureCpu)} °C` : ""}`
        + `${known(system.load1) ? `, load ${system.load1}` : ""}`,
      `memory ${pct(memory)}${known(system.memoryUsed) && known(system.memoryTotal) ? ` (${(system.memoryUsed / 1024).toFixed(1)} of ${(system.memoryTotal / 1024).toFixed(1)} GiB)` : ""}`,
      ...disks.map(d => `${typeof d.mount === "string" ? d.mount : "?"} ${pct(100 * d.used / d.total)} full`),
      `network in ${rate(system.netRx)}B/s, out ${rate(system.netTx)}B/s`].filter(Boolean).join("\n");
    return {text, title};
  }

  function make(tag, className, parent, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    if (parent) parent.append(node);
    return node;
  }

  // A changed value goes into the node's own text node: no node made, none removed, no style to
  // work out again; the text alone is laid out.
  function setText(node, text) {
    const only = node.firstChild;
    if (only && only.nodeType === Node.TEXT_NODE && !only.nextSibling) {
      if (only.nodeValue !== text) only.nodeValue = text;
    } else if (node.textContent !== text) {
      node.textContent = text;
    }
  }

  function since(s) {
    if (s < 60) return "under a minute";
    if (s < 7200) return `${Math.floor(s / 60)} min`;
    if (s < 172800) return `${Math.floor(s / 3600)} h`;
    return `${Math.floor(s / 86400)} d`;
  }

  // The view as the URL says it: a link keeps it.
  function viewFrom(search) {
    const params = new URLSearchParams(search);
    const list = (key, allowed) => (params.get(key) || "").split(",").filter(v => allowed.includes(v));
    return {q: params.get("q") || "", status: list("status", STATUSES), state: list("state", FILTER_STATES),
      sort: Object.hasOwn(SORTS, params.get("sort")) ? params.get("sort") : "name"};
  }

  const KEPT = "gpustats-overview"; // sessionStorage: the overview's URL, for the detail's way back
  const CARRIED = ["range", "theme", "kiosk"]; // what a detail link keeps of this page's URL

  function detailHref(name, index) {
    const here = new URLSearchParams(location.search), params = new URLSearchParams({pc: name});
    if (index !== undefined) params.set("gpu", String(index));
    for (const key of CARRIED) if (here.has(key)) params.set(key, here.get(key));
    return `?${params}`;
  }

  function keep() {
    try { sessionStorage.setItem(KEPT, location.search); } catch { /* storage off: Back still works */ }
  }

  // The detail's "GPU Stats" link: back to the overview as it was left (search, filters, sort).
  function backLink(link) {
    let kept = null;
    try { kept = sessionStorage.getItem(KEPT); } catch { /* storage off */ }
    if (kept !== null) link.href = kept || "./";
    else {
      const here = new URLSearchParams(location.search), params = new URLSearchParams();
      for (const key of CARRIED) if (here.has(key)) params.set(key, here.get(key));
      link.href = params.size ? `?${params}` : "./";
    }
  }

  function create({root, rows, search, statusButtons, stateButtons, freeButton, sortSelect, shownCount}) {
    const pcs = new Map(); // name -> {row, name, status, data, cells: Map(index -> cell), seenAt}
    let view = viewFrom(location.search);
    let order = []; // the rows' names in the order they stand in, kept here so nothing reads the DOM
    let sortDue = false;

    // ---- one PC, one GPU ------------------------------------------------------------------------
    function pcEntry(name) {
      let pc = pcs.get(name);
      if (pc) return pc;
      const row = make("div", "pc online");
      row.dataset.device = name;
      const head = make("div", "pc-head", row);
      pc = {name, row, status: "online", data: null, receivedAt: 0, cells: new Map(), visible: true, onScreen: true, due: false,
        glyph: make("span", "pc-glyph", head, "●"),
        link: make("a", "pc-name", head, name),
        label: make("span", "pc-status", head, ""), alert: make("span", "pc-alert", head, ""),
        host: make("span", "pc-host", head, ""), hostTitle: "",
        list: make("ol", "cells", row), error: make("p", "pc-error", row, "")};
      pc.link.href = detailHref(name);
      pc.link.title = `${name}: its GPUs' charts, processes and energy`;
      pcs.set(name, pc);
      order.push(name);
      sortDue = true;
      rows.append(row);
      onScreen.observe(row); // on the screen until the observer says otherwise: drawn at once
      return pc;
    }

    function cellEntry(pc, index) {
      let cell = pc.cells.get(index);
      if (cell) return cell;
      const node = make("li", "cell");
      node.dataset.index = String(index);
      const box = make("div", "cell-box", node);
      cell = {node, index, g: {}, judged: "", state: "", flags: {}, freeSince: undefined, hotAlert: false, held: false, title: "", hay: null,
        glyph: make("span", "glyph", box), id: make("a", "idx", box, String(index)),
        util: make("span", "v util", box), mem: make("span", "v mem", box), temp: make("span", "v temp", box),
        who: make("span", "who", box)};
      cell.id.href = detailHref(pc.name, index); // the whole cell is its link's target (CSS ::after)
      pc.cells.set(index, cell);
      // Cells stand by index; a new one goes before the first with a larger index.
      const after = [...pc.cells.values()].filter(c => c.index > index).sort((a, b) => a.index - b.index)[0];
      pc.list.insertBefore(node, after ? after.node : null);
      return cell;
    }

    function flagsOf(pc, cell) {
      const g = cell.g, online = pc.status === "online";
      const share = memShare(g);
      return {
        error: Boolean(g.error), stale: !online,
        hot: online && (cell.hotAlert || (known(g.temperatureGpu) && g.temperatureGpu >= HOT_C)),
        busy: online && known(g.utilizationGpu) && g.utilizationGpu >= BUSY_PERCENT,
        free: online && !g.error && known(g.utilizationGpu) && g.utilizationGpu < FREE_PERCENT
          && share !== null && share < FREE_PERCENT,
      };
    }

    function whoText(cell) {
      if (cell.judged === "free") {
        return cell.freeSince === null ? "free since you opened the page"
          : `free for ${since(Date.now() / 1000 - cell.freeSince)}`;
      }
      const processes = Array.isArray(cell.g.processes) ? cell.g.processes : [];
      // "ana python3 train.py": who, and what (its command, where the agent sends one), not "python3" twice.
      const people = processes.map(p => [p.user, p.command || p.name].filter(s => typeof s === "string" && s).join(" "));
      // GpuIdleHeld fires: memory held on a GPU doing nothing, the GPU a lab is waiting for.
      return `${cell.held ? "⏸ held idle: " : ""}${people.filter(Boolean).join(", ")}`;
    }

    // A cell's state from its GPU's latest figures: what the filters, counts and search read.
    function judgeCell(pc, cell) {
      const flags = flagsOf(pc, cell);
      cell.flags = flags;
      const state = Object.keys(STATES).find(s => flags[s]) || "used";
      if (state === "free" && cell.judged !== "free") {
        // Free from the first event this page saw: it cannot tell since when.
        cell.freeSince = cell.judged ? Date.now() / 1000 : null;
      } else if (state !== "free") {
        cell.freeSince = undefined;
      }
      cell.judged = state;
      cell.hay = null; // made again when a search reads it
    }

    function hayOf(pc, cell) {
      if (cell.hay === null) {
        const processes = Array.isArray(cell.g.processes) ? cell.g.processes : [];
        cell.hay = [`${pc.name}:${cell.index}`, cell.g.name, ...processes.flatMap(p => [p.user, p.name, p.command])]
          .filter(s => typeof s === "string").join("\n").toLowerCase();
      }
      return cell.hay;
    }

    // Its figures into its nodes, each written only when it changed.
    function drawCell(pc, cell) {
      const g = cell.g, state = cell.judged;
      if (cell.state !== state) {
        cell.state = state;
        cell.node.className = `cell ${state}${cell.held ? " held" : ""}`;
        setText(cell.glyph, STATES[state].glyph);
      }
      setText(cell.util, pct(g.utilizationGpu));
      setText(cell.mem, pct(memShare(g)));
      setText(cell.temp, known(g.temperatureGpu) ? `${Math.round(g.temperatureGpu)}°` : "–");
      setText(cell.who, whoText(cell));
      const processes = Array.isArray(g.processes) ? g.processes : [];
      const title = [`${pc.name}:${cell.index} ${g.name || ""} — ${STATES[state].text}`,
        `utilization ${pct(g.utilizationGpu)}, memory ${pct(memShare(g))}, `
          + `${known(g.temperatureGpu) ? `${Math.round(g.temperatureGpu)} °C` : "– °C"}, `
          + `${known(g.powerDraw) ? `${Math.round(g.powerDraw)} W` : "– W"}`,
        ...(g.error ? [g.error] : []),
        ...processes.slice(0, 5).map(p => `${p.user || "?"}: ${p.command || p.name || "?"} (${p.pid ?? "?"})`)].join("\n");
      if (cell.title !== title) { cell.title = title; cell.node.title = title; }
    }

    // ---- the view: search, filters, sort ----------------------------------------------------------
    function pcStatus(pc) {
      const unread = pc.data && pc.data.error && !(Array.isArray(pc.data.gpus) && pc.data.gpus.length);
      return pc.status === "online" && unread ? "problem" : pc.status;
    }

    function applyView(pc) {
      const q = view.q.trim().toLowerCase();
      const status = pcStatus(pc);
      const statusOk = !view.status.length || view.status.includes(status)
        || (view.status.includes("problem") && [...pc.cells.values()].some(c => c.flags.error));
      const nameOk = !q || pc.name.toLowerCase().includes(q);
      let shown = 0;
      for (const cell of pc.cells.values()) {
        const on = statusOk && (nameOk || hayOf(pc, cell).includes(q))
          && (!view.state.length || view.state.some(s => cell.flags[s]));
        if (cell.node.hidden === on) cell.node.hidden = !on;
        if (on) shown += 1;
      }
      const visible = shown > 0 || (statusOk && nameOk && !view.state.length && pc.cells.size === 0);
      if (pc.visible !== visible) {
        pc.visible = visible;
        pc.row.hidden = !visible;
      }
    }

    function sortKey(pc) {
      const gpus = [...pc.cells.values()].map(c => c.g);
      const most = values => { const v = values.filter(known); return v.length ? Math.max(...v) : -Infinity; };
      switch (view.sort) {
        case "util": return most(gpus.map(g => g.utilizationGpu));
        case "mem": return most(gpus.map(memShare));
        case "temp": return most(gpus.map(g => g.temperatureGpu));
        case "power": { const w = gpus.map(g => g.powerDraw).filter(known); return w.length ? w.reduce((a, b) => a + b) : -Infinity; }
        case "seen": return -(pc.receivedAt || 0); // the longest silent first
        default: return 0;
      }
    }

    function sortRows() {
      sortDue = false;
      const keys = new Map([...pcs.values()].map(pc => [pc.name, sortKey(pc)]));
      // The most first (by name among equals): the busiest, the hottest, the longest silent.
      const next = [...pcs.keys()].sort((a, b) => keys.get(b) - keys.get(a) || (a < b ? -1 : a > b ? 1 : 0));
      if (next.length === order.length && next.every((name, i) => order[i] === name)) return;
      order = next;
      rows.append(...next.map(name => pcs.get(name).row));
    }

    function countShown() {
      let gpus = 0, shown = 0, free = 0;
      for (const pc of pcs.values()) {
        for (const cell of pc.cells.values()) {
          gpus += 1;
          if (pc.visible && !cell.node.hidden) shown += 1;
          if (cell.flags.free) free += 1;
        }
      }
      setText(freeButton.querySelector(".n"), String(free));
      setText(shownCount, shown === gpus ? `${gpus} GPUs` : `${shown} of ${gpus} GPUs`);
    }

    function showView() {
      if (search.value !== view.q) search.value = view.q;
      for (const b of statusButtons) b.setAttribute("aria-pressed", String(view.status.includes(b.dataset.status)));
      for (const b of stateButtons) b.setAttribute("aria-pressed", String(view.state.includes(b.dataset.state)));
      freeButton.setAttribute("aria-pressed", String(view.state.length === 1 && view.state[0] === "free"));
      sortSelect.value = view.sort;
      root.classList.toggle("free-view", view.state.length === 1 && view.state[0] === "free");
    }

    function setView(change) {
      view = {...view, ...change};
      const params = new URLSearchParams(location.search);
      for (const [key, value] of [["q", view.q], ["status", view.status.join(",")],
        ["state", view.state.join(",")], ["sort", view.sort === "name" ? "" : view.sort]]) {
        if (value) params.set(key, value);
        else params.delete(key);
      }
      const query = params.toString();
      history.replaceState(null, "", query ? `?${query}` : location.pathname);
      keep();
      showView();
      for (const pc of pcs.values()) applyView(pc);
      sortRows();
      countShown();
    }

    const toggle = (list, value) => list.includes(value) ? list.filter(v => v !== value) : [...list, value];
    search.addEventListener("input", () => setView({q: search.value}));
    for (const b of statusButtons) b.addEventListener("click", () => setView({status: toggle(view.status, b.dataset.status)}));
    for (const b of stateButtons) b.addEventListener("click", () => setView({state: toggle(view.state, b.dataset.state)}));
    freeButton.addEventListener("click", () => setView({state: freeButton.getAttribute("aria-pressed") === "true" ? [] : ["free"]}));
    sortSelect.addEventListener("change", () => setView({sort: sortSelect.value}));
    showView();
    keep();

    // Counts and order follow events once a frame at most, not once an event.
    let countQueued = false;
    function later() {
      if (countQueued) return;
      countQueued = true;
      requestAnimationFrame(() => {
        countQueued = false;
        if (sortDue) sortRows();
        countShown();
      });
    }

    // A PC's cells judged, its row filtered, and drawn if it is on the screen (or near it); a row
    // off it keeps only its latest state, drawn when it scrolls in. Its figures change every push,
    // and a changed figure is layout and paint, even where nobody sees it.
    function renderPc(pc) {
      for (const cell of pc.cells.values()) judgeCell(pc, cell);
      applyView(pc);
      if (pc.onScreen) drawPc(pc);
      else pc.due = true;
      if (view.sort !== "name") sortDue = true;
      later();
    }

    function drawPc(pc) {
      pc.due = false;
      const status = pcStatus(pc);
      if (!pc.row.classList.contains(status)) {
        pc.row.classList.remove(...STATUSES);
        pc.row.classList.add(status);
        setText(pc.label, status === "problem" ? "⚠ no GPU read" : status === "online" ? "" : status); // the glyph says online
        setText(pc.glyph, {online: "●", stale: "◐", offline: "○", problem: "⚠"}[status]);
      }
      setText(pc.error, status === "problem" ? `Cannot read GPUs: ${pc.data.error}` : "");
      const host = hostLine(pc.data && pc.data.system);
      setText(pc.host, host.text);
      if (pc.hostTitle !== host.title) { pc.hostTitle = host.title; pc.host.title = host.title; }
      for (const cell of pc.cells.values()) drawCell(pc, cell);
    }

    const onScreen = new IntersectionObserver(entries => {
      for (const entry of entries) {
        const pc = pcs.get(entry.target.dataset.device);
        if (!pc || pc.row !== entry.target) continue;
        pc.onScreen = entry.isIntersecting;
        if (pc.onScreen && pc.due) drawPc(pc);
      }
    }, {rootMargin: "200px 0px"}); // drawn a little before it scrolls in

    return {
      push(data) { // an accepted push or a snapshot's state of one PC
        const pc = pcEntry(data.device);
        pc.data = data;
        pc.status = data.status || "online";
        if (known(data.receivedAt)) pc.receivedAt = data.receivedAt;
        const seen = new Set();
        for (const g of Array.isArray(data.gpus) ? data.gpus : []) {
          const cell = cellEntry(pc, g.index);
          cell.g = g;
          seen.add(g.index);
        }
        for (const [index, cell] of pc.cells) if (!seen.has(index)) { cell.node.remove(); pc.cells.delete(index); }
        renderPc(pc);
      },
      status(name, status) {
        const pc = pcs.get(name);
        if (!pc || pc.status === status) return;
        pc.status = status;
        renderPc(pc);
      },
      remove(name) {
        const pc = pcs.get(name);
        if (!pc) return;
        onScreen.unobserve(pc.row);
        pc.row.remove();
        pcs.delete(name);
        order = order.filter(n => n !== name);
        later();
      },
      // A GPU's active alerts: its worst severity, whether GpuHot fires, whether GpuIdleHeld does.
      alerts(name, index, worst, hot, held) {
        const pc = pcs.get(name), cell = pc && pc.cells.get(index);
        if (!cell) return;
        if ((cell.node.dataset.alert || "") !== (worst || "")) {
          if (worst) cell.node.dataset.alert = worst;
          else delete cell.node.dataset.alert;
        }
        if (cell.hotAlert === hot && cell.held === held) return;
        cell.hotAlert = hot; // the server's GpuHot rule, not only the page's threshold
        cell.held = held;
        cell.state = ""; // its class says whether it is held
        renderPc(pc);
      },
      // A PC's own active alerts (offline, disk or memory full): their kinds by its name, summaries in the tooltip.
      pcAlerts(name, worst, kinds, summaries) {
        const pc = pcs.get(name);
        if (!pc) return;
        setText(pc.alert, kinds.length ? `▲ ${kinds.join(", ")}` : "");
        if (pc.alert.title !== summaries) pc.alert.title = summaries;
        if ((pc.row.dataset.alert || "") !== (worst || "")) {
          if (worst) pc.row.dataset.alert = worst;
          else delete pc.row.dataset.alert;
        }
      },
      tick() { // once a second: how long free GPUs have been free; a hidden tab does nothing
        if (document.hidden) return;
        for (const pc of pcs.values()) {
          for (const cell of pc.cells.values()) {
            if (cell.judged !== "free") continue;
            if (pc.onScreen) setText(cell.who, whoText(cell));
            else pc.due = true;
          }
        }
        if (sortDue && view.sort === "seen") sortRows();
      },
    };
  }

  return {create, backLink, hostLine, SORTS, known, make, setText}; // what dashboard.js and jobs.js use too
})();
