// rampart's status page: polls /api/snapshot (same origin) every second, computes rates from
// two snapshots (the daemon keeps only cumulative counters), and draws the last 60 points.
"use strict";
const HISTORY = 60;
const series = { req: [], drops: [] };
let prev = null;

function sum(xs) { return xs.reduce((a, b) => a + b, 0); }
function rate(now, before, dt) { return before === undefined || dt <= 0 ? null : Math.max(0, now - before) / dt; }
function fmt(x) { return x === null ? "-" : (x >= 100 ? x.toFixed(0) : x.toFixed(1)); }

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const [text, cls] of r) cell(tr, text, cls);
    body.appendChild(tr);
  }
}

function backendTotal(b) { return sum(Object.values(b.requests)); }
function ifaceDrops(f) {
  return sum(f.counters.filter(c => c.name === "rule_deny" || c.name === "default_deny" ||
    c.name.startsWith("malformed_")).map(c => c.packets));
}
function ifacePackets(f) { return sum(f.counters.filter(c => !c.name.startsWith("fragment_")).map(c => c.packets)); }
function ifaceLabel(f) { return f.netns ? f.netns + "/" + f.iface : f.iface; }

function draw(id, points) {
  const svg = document.querySelector("#" + id + " svg");
  const w = 480, h = 120, max = Math.max(1, ...points);
  const step = w / (HISTORY - 1), x0 = w - step * (points.length - 1);
  const pts = points.map((v, i) => (x0 + i * step).toFixed(1) + "," + (h - 4 - (v / max) * (h - 8)).toFixed(1));
  svg.querySelector("polyline").setAttribute("points", pts.join(" "));
  svg.setAttribute("data-max", String(max));
  const last = points.length ? points[points.length - 1] : null;
  document.querySelector("#" + id + " .now").textContent = fmt(last);
}

function push(name, v) {
  if (v === null) return;
  series[name].push(v);
  if (series[name].length > HISTORY) series[name].shift();
}

function render(s) {
  const dt = prev ? (s.monotonic_ns - prev.monotonic_ns) / 1e9 : 0;
  const d = s.daemon || { pools: [], routes: [], listeners: [], mysql: [] };
  const pd = prev && prev.daemon ? prev.daemon : null;
  const before = {};
  if (pd) for (const p of pd.pools) for (const b of p.backends) before[p.name + " " + b.addr] = backendTotal(b);
  const pf = {};
  if (prev) for (const f of prev.firewall) {
    pf[ifaceLabel(f)] = f;
    for (const r of f.rules) pf[ifaceLabel(f) + " " + r.id] = r;
  }

  document.getElementById("meta").textContent = "rampart " + (d.version || s.version) +
    (d.started_unix ? ", daemon started " + new Date(d.started_unix * 1000).toISOString() : "") +
    ", snapshot " + new Date(s.taken_unix * 1000).toISOString();

  let reqRate = prev ? 0 : null;
  const brows = [];
  for (const p of d.pools) for (const b of p.backends) {
    const r = rate(backendTotal(b), before[p.name + " " + b.addr], dt);
    if (r !== null && reqRate !== null) reqRate += r;
    brows.push([[p.name, "l"], [b.addr, "l"], [b.state, "l " + b.state], [b.in_flight], [fmt(r)],
      [b.requests["2xx"] || 0], [b.requests["3xx"] || 0], [b.requests["4xx"] || 0], [b.requests["5xx"] || 0],
      [b.connect_errors]]);
  }
  fill("backends", brows);

  const lrows = [];
  const pl = {};
  if (prev && prev.l4) for (const sv of prev.l4.services) {
    pl[sv.name] = sv;
    for (const b of sv.backends) pl[sv.name + " " + b.addr] = b;
  }
  if (s.l4) for (const sv of s.l4.services) {
    const o = pl[sv.name] || {};
    lrows.push([[sv.name, "l"], ["(service)", "l"], [fmt(rate(sv.packets, o.packets, dt))],
      [fmt(rate(sv.new_flows, o.new_flows, dt))], [sv.packets], [sv.new_flows]]);
    for (const b of sv.backends) {
      const ob = pl[sv.name + " " + b.addr] || {};
      lrows.push([[sv.name, "l"], [b.addr, "l"], [fmt(rate(b.packets, ob.packets, dt))],
        [fmt(rate(b.new_flows, ob.new_flows, dt))], [b.packets], [b.new_flows]]);
    }
  }
  fill("l4", lrows);

  let dropRate = prev ? 0 : null;
  const rrows = [], irows = [];
  for (const f of s.firewall) {
    const label = ifaceLabel(f);
    for (const r of f.rules) {
      const o = pf[label + " " + r.id];
      const pr = rate(r.packets, o ? o.packets : undefined, dt);
      rrows.push([[label, "l"], [r.id], [r.position], [r.action, "l"], [fmt(pr)],
        [fmt(r.action === "deny" ? pr : (pr === null ? null : 0))], [r.packets], [r.bytes], [r.comment || "", "l"]]);
    }
    const o = pf[label];
    const dr = rate(ifaceDrops(f), o ? ifaceDrops(o) : undefined, dt);
    if (dr !== null && dropRate !== null) dropRate += dr;
    const malformed = sum(f.counters.filter(c => c.name.startsWith("malformed_")).map(c => c.packets));
    const frags = sum(f.counters.filter(c => c.name.startsWith("fragment_")).map(c => c.packets));
    irows.push([[label, "l"], [fmt(rate(ifacePackets(f), o ? ifacePackets(o) : undefined, dt))], [fmt(dr)],
      [ifacePackets(f)], [ifaceDrops(f)], [malformed], [frags]]);
  }
  fill("rules", rrows);
  fill("ifaces", irows);

  const mrows = [];
  for (const c of d.mysql) {
    const change = c.last_primary_change ?
      "; changed " + new Date(c.last_primary_change.unix * 1000).toISOString() + " to " + (c.last_primary_change.to || "none") : "";
    for (const v of c.servers) {
      mrows.push([[c.name, "l"], [v.addr, "l"], [v.role, "l"], [v.health, "l " + v.health],
        [v.lag_seconds === null ? "-" : v.lag_seconds + "s"], [v.connections], ["primary " + c.primary + change, "l"]]);
    }
  }
  fill("mysql", mrows);

  const crows = [];
  for (const l of d.listeners) for (const c of l.certificates) {
    crows.push([[l.name, "l"], [c.subject, "l"], [c.file, "l"], [((c.not_after_unix - s.taken_unix) / 86400).toFixed(1)]]);
  }
  fill("certs", crows);

  push("req", reqRate);
  push("drops", dropRate);
  draw("req", series.req);
  draw("drops", series.drops);
  prev = s;
}

async function poll() {
  try {
    const r = await fetch("/api/snapshot", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "cannot read /api/snapshot: " + e.message;
  }
  setTimeout(poll, 1000);
}
poll();
