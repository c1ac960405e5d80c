// A plain live list of devices; every agent string is set as text, never as HTML.
"use strict";
const cards = new Map();

function dash(v, unit) { return v === null || v === undefined ? "–" : `${v}${unit}`; }

function card(device) {
  let el = cards.get(device);
  if (!el) {
    el = document.createElement("section");
    el.className = "device";
    el.append(document.createElement("h2"), document.createElement("div"));
    el.firstChild.textContent = device;
    cards.set(device, el);
    const names = [...cards.keys()].sort();
    const next = cards.get(names[names.indexOf(device) + 1]);
    document.getElementById("fleet").insertBefore(el, next || null);
    document.getElementById("empty")?.remove();
  }
  return el;
}

function show(data) {
  const el = card(data.device);
  el.className = `device ${data.status}`;
  el.firstChild.textContent = `${data.device} (${data.status})`;
  if (!data.gpus) return;
  el.lastChild.replaceChildren(...data.gpus.map(g => {
    const line = document.createElement("div");
    line.className = "gpu";
    line.textContent = `${data.device}:${g.index} ${g.name ?? "GPU"} · ${dash(g.utilizationGpu, "%")} · ` +
      `${dash(g.memoryUsed, "")}/${dash(g.memoryTotal, " MiB")} · ${dash(g.temperatureGpu, " °C")} · ` +
      `${dash(g.powerDraw, " W")}`;
    return line;
  }));
}

function connect() {
  const state = document.getElementById("connection");
  const source = new EventSource("gpu/stream" + location.search);
  source.onopen = () => { state.textContent = "live"; };
  source.onmessage = e => show(JSON.parse(e.data));
  source.addEventListener("status", e => show(JSON.parse(e.data)));
  source.onerror = () => {
    state.textContent = "reconnecting…";
    if (source.readyState === EventSource.CLOSED) { source.close(); setTimeout(connect, 3000); }
  };
}

connect();
