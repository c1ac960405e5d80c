// The Jobs page: who ran what, where, for how long and at what cost (api/jobs), and a usage report
// per user or per PC over a range (api/usage), each sortable, searchable and downloadable as CSV.
// The view (?q=&range=&running=&by=&sort=) lives in the URL; running jobs are loaded again every 30 s.
// Every string from an agent is set with textContent.
"use strict";

(() => {
  const {known, make, setText} = FleetOverview; // overview.js: the page's DOM helpers
  const RANGES = {"24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400};
  const RANGE_WORDS = {"24h": "the last 24 h", "7d": "this week (7 days)", "30d": "the last 30 days"};
  const REFRESH_MS = 30000;
  const SHOWN = 500; // rows drawn at most; the search narrows the rest
  const params = new URLSearchParams(location.search);
  const view = {
    q: params.get("q") || "", range: Object.hasOwn(RANGES, params.get("range")) ? params.get("range") : "7d",
    running: params.get("running") === "1", by: params.get("by") === "device" ? "device" : "user",
    sort: params.get("sort") || "startedAt", usageSort: params.get("usort") || "gpuHours",
  };
  let jobs = [], usage = [], loadedAt = 0, request = null;

  // ---- formatting ------------------------------------------------------------------------------
  const dash = "–";
  const fixed = (v, digits) => v.toLocaleString("en-US", {minimumFractionDigits: digits, maximumFractionDigits: digits});
  const hours = v => known(v) ? fixed(v, v < 10 ? 2 : 1) : dash;
  const gib = mib => known(mib) ? `${fixed(mib / 1024, 1)} GiB` : dash;
  const pct = v => known(v) ? `${Math.round(v)} %` : dash;
  const energy = wh => !known(wh) ? dash : wh >= 1000 ? `${fixed(wh / 1000, 2)} kWh` : `${fixed(wh, wh >= 100 ? 0 : 1)} Wh`;
  function lasted(s) {
    if (!known(s)) return dash;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor(s % 86400 / 3600)} h`;
  }
  function when(t) {
    if (!known(t)) return dash;
    const d = new Date(t * 1000), today = d.toDateString() === new Date().toDateString();
    const time = d.toLocaleTimeString("en-GB", {hour: "2-digit", minute: "2-digit"});
    return today ? time : `${d.toLocaleDateString("en-GB", {day: "numeric", month: "short"})} ${time}`;
  }
  const text = v => typeof v === "string" ? v : "";
  const where = job => `${text(job.device)}:${Array.isArray(job.gpus) ? job.gpus.join(",") : ""}`;

  // ---- the view in the URL -----------------------------------------------------------------------
  function keepView() {
    const next = new URLSearchParams();
    if (view.q) next.set("q", view.q);
    if (view.range !== "7d") next.set("range", view.range);
    if (view.running) next.set("running", "1");
    if (view.by !== "user") next.set("by", view.by);
    if (view.sort !== "startedAt") next.set("sort", view.sort);
    if (view.usageSort !== "gpuHours") next.set("usort", view.usageSort);
    const query = next.toString();
    history.replaceState(null, "", query ? `?${query}` : location.pathname);
  }

  // ---- tables ----------------------------------------------------------------------------------
  // Numbers sort the largest first, words from A; a second click on a header turns the order round.
  function sorter(key) {
    const desc = key.startsWith("-"), field = desc ? key.slice(1) : key;
    return (a, b) => {
      const x = field === "device" ? where(a) : a[field], y = field === "device" ? where(b) : b[field];
      const numeric = known(x) || known(y);
      let order = numeric ? (known(y) ? y : -Infinity) - (known(x) ? x : -Infinity)
        : text(x).localeCompare(text(y));
      if (field === "ended") order = (a.endedAt === null ? 0 : 1) - (b.endedAt === null ? 0 : 1) || order;
      return desc ? -order : order;
    };
  }

  function showSort(table, key) {
    const field = key.replace(/^-/, "");
    for (const button of table.querySelectorAll("th button")) {
      const th = button.parentElement;
      if (button.dataset.sort === field) th.setAttribute("aria-sort", key.startsWith("-") ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }

  function jobRow(job) {
    const row = make("tr", job.endedAt === null || job.endedAt === undefined ? "running" : "");
    make("td", "where", row, where(job));
    make("td", "", row, text(job.user) || dash);
    const command = make("td", "command", row, text(job.command) || text(job.name) || dash);
    command.title = `pid ${job.pid ?? "?"}`;
    const started = make("td", "", row, when(job.startedAt));
    if (known(job.startedAt)) started.title = new Date(job.startedAt * 1000).toLocaleString();
    make("td", "num", row, lasted(job.durationS));
    make("td", "num", row, hours(job.gpuHours));
    make("td", "num", row, gib(job.peakMemory));
    make("td", "num", row, pct(job.meanUtilization));
    make("td", "num", row, energy(job.energyWh));
    make("td", `state ${job.ended || "running"}`, row, job.ended === "lost" ? "lost (PC went offline)"
      : job.ended === "exited" ? "exited" : "running");
    return row;
  }

  function drawJobs() {
    const table = document.getElementById("jobs");
    const q = view.q.trim().toLowerCase();
    const shown = jobs.filter(job => !q || [where(job), job.user, job.command, job.name]
      .some(v => text(v).toLowerCase().includes(q))).sort(sorter(view.sort));
    table.tBodies[0].replaceChildren(...shown.slice(0, SHOWN).map(jobRow));
    showSort(table, view.sort);
    const more = document.getElementById("jobs-more");
    more.hidden = shown.length <= SHOWN;
    setText(more, `${SHOWN} of ${shown.length} jobs shown: the search narrows them, the CSV holds them all.`);
    const running = jobs.filter(job => job.endedAt === null || job.endedAt === undefined).length;
    setText(document.getElementById("jobs-status"), `${shown.length === jobs.length ? jobs.length : `${shown.length} of ${jobs.length}`} jobs, ${running} running`);
  }

  function drawUsage() {
    const table = document.getElementById("usage");
    const q = view.q.trim().toLowerCase();
    const rows = usage.filter(row => !q || text(row.key).toLowerCase().includes(q)).sort(sorter(view.usageSort));
    table.tBodies[0].replaceChildren(...rows.map(row => {
      const tr = make("tr");
      make("td", "", tr, text(row.key) || "(nobody named)");
      make("td", "num", tr, known(row.jobs) ? row.jobs.toLocaleString("en-US") : dash);
      make("td", "num", tr, hours(row.gpuHours));
      make("td", "num", tr, energy(row.energyWh));
      make("td", "num", tr, pct(row.meanUtilization));
      make("td", "num", tr, gib(row.peakMemory));
      return tr;
    }));
    setText(document.getElementById("usage-key-head"), view.by === "device" ? "PC" : "user");
    showSort(table, view.usageSort);
  }

  // ---- loading -----------------------------------------------------------------------------------
  // From the range's start; the end is the server's now (a job begun this second is in it).
  function query(extra) {
    return new URLSearchParams({from: String(Math.floor(Date.now() / 1000) - RANGES[view.range]), ...extra});
  }

  async function load() {
    request?.abort();
    const controller = new AbortController();
    request = controller;
    loadedAt = Date.now();
    const jobsQuery = query(view.running ? {running: "1"} : {}), usageQuery = query({by: view.by});
    document.getElementById("jobs-csv").href = `api/jobs.csv?${jobsQuery}`;
    document.getElementById("usage-csv").href = `api/usage.csv?${usageQuery}`;
    setText(document.getElementById("usage-range"), RANGE_WORDS[view.range]);
    try {
      const [jobsAnswer, usageAnswer] = await Promise.all([`api/jobs?${jobsQuery}`, `api/usage?${usageQuery}`]
        .map(async url => {
          const response = await fetch(url, {signal: controller.signal, cache: "no-store"});
          if (response.status === 401) location.assign(`login?next=${encodeURIComponent(location.pathname + location.search)}`);
          if (!response.ok) throw new Error(`${url.split("?")[0]}: HTTP ${response.status}`);
          return response.json();
        }));
      if (request !== controller) return;
      jobs = Array.isArray(jobsAnswer.jobs) ? jobsAnswer.jobs : [];
      usage = Array.isArray(usageAnswer.rows) ? usageAnswer.rows : [];
      drawJobs();
      drawUsage();
    } catch (problem) {
      if (request === controller && problem.name !== "AbortError") {
        setText(document.getElementById("jobs-status"), `Could not load jobs (${problem.message}); trying again shortly.`);
      }
    } finally {
      if (request === controller) request = null;
    }
  }

  // ---- controls ----------------------------------------------------------------------------------
  const search = document.getElementById("job-search");
  search.value = view.q;
  search.addEventListener("input", () => { view.q = search.value; keepView(); drawJobs(); drawUsage(); });
  const rangeButtons = document.querySelectorAll("[data-range]");
  const byButtons = document.querySelectorAll("[data-by]");
  const running = document.getElementById("running-only");
  function showControls() {
    for (const b of rangeButtons) b.setAttribute("aria-pressed", String(b.dataset.range === view.range));
    for (const b of byButtons) b.setAttribute("aria-pressed", String(b.dataset.by === view.by));
    running.setAttribute("aria-pressed", String(view.running));
  }
  for (const b of rangeButtons) b.addEventListener("click", () => { view.range = b.dataset.range; changed(); });
  for (const b of byButtons) b.addEventListener("click", () => { view.by = b.dataset.by; changed(); });
  running.addEventListener("click", () => { view.running = !view.running; changed(); });
  function changed() { keepView(); showControls(); load(); }
  for (const [id, key, draw] of [["jobs", "sort", drawJobs], ["usage", "usageSort", drawUsage]]) {
    for (const button of document.getElementById(id).querySelectorAll("th button")) {
      button.addEventListener("click", () => {
        view[key] = view[key] === button.dataset.sort ? `-${button.dataset.sort}` : button.dataset.sort;
        keepView();
        draw();
      });
    }
  }
  showControls();
  load();
  setInterval(() => {
    if (!document.hidden && !request && Date.now() - loadedAt >= REFRESH_MS) load();
  }, 1000);
})();
