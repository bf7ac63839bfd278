// The pipeserve dashboard: one EventSource, each message a whole snapshot (snapshot.py), drawn with plain DOM
// and SVG. No library, nothing fetched from anywhere but this server.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f"];
const ROW_H = 26, LABEL_W = 130, AXIS_H = 18;
const $ = (id) => document.getElementById(id);
let layoutShown = false;

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }

function showLayout(l, snap) {
  $("model").textContent = l.model;
  const facts = [["model", `${l.path} (${l.num_layers} layers)`], ["layout", `PP=${l.pp} × TP=${l.tp}`],
    ["machines", String(l.nnodes)], ["device", l.device], ["dtype", l.dtype], ["quantization", l.quantization],
    ["KV capacity", `${l.kv.virtual_engines} VE × ${l.kv.blocks_per_ve} blocks × ${l.kv.block_size} tokens = ` +
                    `${l.kv.tokens_total} tokens`], ["max model len", String(l.max_model_len)]];
  $("facts").replaceChildren(...facts.map(([k, v]) => { const s = el("span"); s.append(el("b", {}, k + ": "), v);
                                                      return s; }));
  layoutShown = true;
}

function showStages(l, snap) {
  const rows = l.stages.map((st) => {
    const tr = el("tr", {id: `stage-${st.stage}`});
    tr.append(el("td", {}, `stage ${st.stage}`), el("td", {}, `[${st.layers[0]}, ${st.layers[1]})`),
              el("td", {}, st.extras.join(", ")), el("td", {}, snap.stages[st.stage].machine),
              el("td", {class: "restarts"}, String(snap.restarts[String(st.stage)] || 0)));
    return tr;
  });
  $("stages").replaceChildren(...rows);
}

function showTiles(s) {
  $("tokens-per-s").textContent = fmt(s.output_tokens_per_s, 1);
  $("ttft").textContent = `${fmt(s.ttft_ms.p50, 1)} / ${fmt(s.ttft_ms.p99, 1)}`;
  $("tpot").textContent = `${fmt(s.tpot_ms.p50, 1)} / ${fmt(s.tpot_ms.p99, 1)}`;
  $("prefix-hit").textContent = s.prefix_cache_hit_rate === null ? "–" : `${(100 * s.prefix_cache_hit_rate).toFixed(1)}%`;
}

function showGantt(s) {
  const svg = $("gantt");
  const width = svg.clientWidth || 900, plotW = width - LABEL_W, win = s.gantt_window_s;
  const height = s.stages.length * ROW_H + AXIS_H;
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const parts = [];
  const x = (ago) => LABEL_W + plotW * (1 - ago / win);
  for (const ev of s.events) {  // recoveries inside the window, shaded behind the steps
    const from = s.t - ev.start, to = s.t - ev.end;
    if (to > win) continue;
    const x0 = x(Math.min(from, win)), x1 = x(Math.max(to, 0));
    parts.push(el("svg:rect", {class: "recovery-mark", x: x0, y: 0, width: Math.max(2, x1 - x0),
                               height: height - AXIS_H, fill: "#c62828", "fill-opacity": 0.18}));
  }
  s.stages.forEach((st, i) => {
    const y = i * ROW_H;
    parts.push(el("svg:text", {class: "label", x: 4, y: y + 17}, `stage ${st.stage}`));
    parts.push(el("svg:text", {class: "label busy", id: `busy-${st.stage}`, x: 62, y: y + 17},
                  `${(100 * st.busy).toFixed(1)}%`));
    parts.push(el("svg:line", {x1: LABEL_W, x2: width, y1: y + ROW_H - 1, y2: y + ROW_H - 1, stroke: "#dde1e8"}));
    for (const [ago, durMs, ve, kind, tokens] of st.steps) {
      const x0 = Math.max(LABEL_W, x(ago)), x1 = x(ago - durMs / 1000);
      if (x1 <= LABEL_W) continue;
      const bar = el("svg:rect", {class: "step", x: x0.toFixed(1), y: y + 3, width: Math.max(1, x1 - x0).toFixed(1),
                                  height: ROW_H - 8, fill: COLOURS[ve % COLOURS.length],
                                  "fill-opacity": kind === "decode" ? 0.95 : 0.6, "data-ve": ve, "data-kind": kind,
                                  "data-stage": st.stage, "data-start": (s.t - ago).toFixed(4)});
      bar.append(el("svg:title", {}, `VE ${ve} ${kind}: ${tokens} tokens, ${durMs.toFixed(2)} ms`));
      parts.push(bar);
    }
  });
  for (let k = 0; k <= win; k += 0.5) {
    parts.push(el("svg:text", {class: "axis", x: x(k) - (k === 0 ? 22 : 8), y: height - 4},
                  k === 0 ? "now" : `-${k}s`));
  }
  svg.replaceChildren(...parts);
  const ves = [...new Set(s.stages.flatMap((st) => st.steps.map((r) => r[2])))].sort();
  $("legend").replaceChildren(...ves.map((ve) => { const sp = el("span"); const i = el("i");
    i.style.background = COLOURS[ve % COLOURS.length]; sp.append(i, `virtual engine ${ve}`); return sp; }),
    el("span", {class: "muted"}, "(solid: decode; pale: prefill or mixed)"));
}

function showVirtualEngines(s) {
  $("ves").replaceChildren(...s.ves.map((v) => {
    const tr = el("tr", {id: `ve-${v.ve}`});
    const bar = el("div", {class: "kvbar", title: `${v.kv_cached} free blocks hold a cached prefix`});
    const used = el("span", {class: "used"}), cached = el("span", {class: "cached"});
    used.style.width = `${(100 * v.kv_used / v.kv_total).toFixed(1)}%`;
    cached.style.left = used.style.width;
    cached.style.width = `${(100 * v.kv_cached / v.kv_total).toFixed(1)}%`;
    bar.append(used, cached);
    const td = el("td"); td.append(bar);
    tr.append(el("td", {}, String(v.ve)), el("td", {class: "running"}, String(v.running)),
              el("td", {class: "waiting"}, String(v.waiting)), el("td", {}, `${v.kv_used} / ${v.kv_free}`), td);
    return tr;
  }));
}

function showEvents(s) {
  const items = s.events.slice().reverse().map((ev) => {
    const when = new Date(ev.start * 1000).toLocaleTimeString();
    return el("li", {class: "recovery"}, `${when}: recovery of stage ${ev.stages.join(", ") || "(none replaced)"} ` +
              `in ${ev.seconds.toFixed(1)} s (generation ${ev.generation}): ${ev.cause}`);
  });
  if (s.state === "recovering") items.unshift(el("li", {class: "recovery recovering"}, "recovering now…"));
  $("event-list").replaceChildren(...(items.length ? items : [el("li", {class: "muted"}, "none")]));
}

function render(s) {
  if (s.error) { $("updated").textContent = s.error; return; }
  if (!layoutShown) showLayout(s.layout, s);
  $("state").textContent = s.state;
  $("state").className = `badge ${s.state}`;
  $("updated").textContent = `updated ${new Date(s.t * 1000).toLocaleTimeString()}`;
  showStages(s.layout, s);
  showTiles(s);
  showGantt(s);
  showVirtualEngines(s);
  showEvents(s);
}

const source = new EventSource("/dashboard/stream");
source.onmessage = (e) => render(JSON.parse(e.data));
source.onerror = () => { $("state").textContent = "disconnected"; $("state").className = "badge disconnected"; };
