// The all-latent browser: data/*.js define window.SAE (loaded by script tags, so the page works from
// file:// without a server); latent shards are loaded on demand. Routes: #latent=ID, #search=TEXT,
// #list=PAGE, and the overview.
"use strict";
const S = window.SAE, view = document.getElementById("view"), PAGE = 100;
const shards = {};
S.shard = (i, data) => { shards[i] = data; (S.waiting[i] || []).forEach(f => f(data)); delete S.waiting[i]; };
S.waiting = {};

function esc(s) { return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); }
function tok(id) { const t = S.vocab[id]; return t === undefined ? "?" : t; }
function shown(s) { return esc(s.replace(/\n/g, "\u21b5")); }
function gram(ids) { return `<span class="gram">${ids.map(i => shown(tok(i))).join("")}</span>`; }
function pct(x) { return x === null ? "–" : (100 * x).toFixed(x < 0.001 ? 4 : 2) + "%"; }
function num(x, d = 3) { return x === null || x === undefined ? "–" : Number(x).toFixed(d); }
function link(latent) { return `<a href="#latent=${latent}">latent ${latent}</a>`; }
function bars(counts) {
  const top = Math.max(1, ...counts);
  return `<span class="bars">${counts.map(c => `<div style="height:${Math.max(1, Math.round(44 * c / top))}px" title="${c}"></div>`).join("")}</span>`;
}
// a histogram with its axes: counts per bin over [0, hi] (x), the tallest bin's count (y)
function histogram(counts, lo, hi, what) {
  return `<span class="hist"><span class="lbl ymax">${Math.max(...counts)}</span>${bars(counts)}` +
    `<span class="lbl xaxis">${num(lo, 2)} ${"&nbsp;".repeat(4)} ${what} ${"&nbsp;".repeat(4)} ${num(hi, 2)}</span></span>`;
}
// an N2G explanation's verdict: failed where it is unscored or finds no held-out firing
function n2gVerdict(precision, recall) {
  if (precision === null || recall === null) return '<span class="failed">not scored (too few firings)</span>';
  if (recall === 0 || precision < 0.5) return `<span class="failed">failed: held-out precision ${num(precision, 2)}, recall ${num(recall, 2)}</span>`;
  return `held-out precision ${num(precision, 2)} · recall ${num(recall, 2)}`;
}
function explanation(latent) {
  const grams = S.summary.n2g[latent];
  return grams.length ? grams.map(gram).join("") : '<span class="lbl">no n-gram explains it</span>';
}
function row(latent, extra = "") {
  const s = S.summary;
  return `<tr class="result" data-latent="${latent}"><td>${link(latent)}</td>${extra}<td class="num">${pct(s.density[latent])}</td>` +
    `<td class="num">${num(s.max[latent], 2)}</td><td class="num">${num(s.n2g_precision[latent], 2)}</td>` +
    `<td class="num">${num(s.n2g_recall[latent], 2)}</td><td>${explanation(latent)}</td></tr>`;
}
function table(latents, extraHead = "", extra = () => "") {
  return `<table><tr><th>latent</th>${extraHead}<th>density</th><th>max</th><th>N2G precision</th><th>N2G recall</th><th>explanation</th></tr>` +
    latents.map(l => row(l, extra(l))).join("") + "</table>";
}

// up to 6 tick values over [lo, hi]: 1-2-5 steps of a power of ten (of the value on a log axis)
function ticks(lo, hi, log) {
  if (log) {
    for (const mult of [[1, 2, 5], [1, 3], [1]]) {
      const out = [];
      for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++)
        mult.forEach(m => { const v = m * 10 ** e; if (v >= lo && v <= hi) out.push(v); });
      if (out.length <= 6) return out.length >= 2 ? out : [lo, hi];
    }
  }
  const raw = (hi - lo) / 4, p = 10 ** Math.floor(Math.log10(raw || 1));
  const step = [1, 2, 5, 10].map(m => m * p).find(s => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(v);
  return out;
}
function label(v) { return Number(v.toPrecision(2)).toString(); }
// a scatter plot as SVG with labelled axes; pts: {x, y, title, cls}; the points of `line` joined
function scatter(pts, xName, yName, logX, logY, line) {
  const W = 400, H = 250, L = 56, R = 14, T = 10, B = 42;
  const axis = (vs, log, a, b) => {
    let lo = Math.min(...vs), hi = Math.max(...vs);
    if (lo === hi) { lo = log ? lo / 1.5 : lo - 1; hi = log ? hi * 1.5 : hi + 1; }
    const f = log ? Math.log10 : v => v, pad = 0.06 * (f(hi) - f(lo));
    const at = v => a + (b - a) * (f(v) - f(lo) + pad) / (f(hi) - f(lo) + 2 * pad);
    return {at, ticks: ticks(lo, hi, log)};
  };
  const x = axis(pts.map(p => p.x), logX, L, W - R), y = axis(pts.map(p => p.y), logY, H - B, T);
  const xt = x.ticks.map(v => `<line x1="${x.at(v)}" x2="${x.at(v)}" y1="${H - B}" y2="${H - B + 4}"/>` +
    `<text class="tick" x="${x.at(v)}" y="${H - B + 16}" text-anchor="middle">${label(v)}</text>`).join("");
  const yt = y.ticks.map(v => `<line x1="${L - 4}" x2="${L}" y1="${y.at(v)}" y2="${y.at(v)}"/>` +
    `<text class="tick" x="${L - 6}" y="${y.at(v) + 4}" text-anchor="end">${label(v)}</text>`).join("");
  const joined = line.slice().sort((a, b) => a.x - b.x).map(p => `${x.at(p.x)},${y.at(p.y)}`).join(" ");
  const dots = pts.map(p => `<circle class="${p.cls}" cx="${x.at(p.x)}" cy="${y.at(p.y)}" r="${p.cls === "this" ? 6 : 4}">` +
    `<title>${esc(p.title)}</title></circle>`).join("");
  return `<svg class="plot" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}"><g class="axes">` +
    `<line x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/><line x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>${xt}${yt}</g>` +
    `<text class="name" x="${(L + W - R) / 2}" y="${H - 6}" text-anchor="middle">${esc(xName)}${logX ? " (log)" : ""}</text>` +
    `<text class="name" transform="translate(13,${(T + H - B) / 2}) rotate(-90)" text-anchor="middle">${esc(yName)}${logY ? " (log)" : ""}</text>` +
    `<polyline class="frontier" points="${joined}"/>${dots}</svg>`;
}
// the SAE among the other SAEs of its sweep at the same hookpoint, when it was trained in one
function sweepSection() {
  const w = S.sweep;
  if (!w) return "";
  const pts = w.points.map((p, i) => ({...p, cls: i === w.this ? "this" : p.frontier ? "front" : "other",
    title: `${p.n} latents, k ${p.k}${i === w.this ? " (this SAE)" : ""}: L0 ${num(p.l0, 1)}, normalized MSE ${num(p.nmse, 4)}`}));
  const front = pts.filter(p => p.frontier);
  const mseL0 = scatter(pts.map(p => ({...p, x: p.l0, y: p.nmse})), "L0", "normalized MSE", true, true,
    front.map(p => ({x: p.l0, y: p.nmse})));
  const withCe = pts.filter(p => p.ce !== null);
  const ceMse = withCe.length ? scatter(withCe.map(p => ({...p, x: p.nmse, y: p.ce})), "normalized MSE", "CE increase (nats)",
    false, false, withCe.filter(p => p.frontier).map(p => ({x: p.nmse, y: p.ce}))) : "";
  const rows = pts.map(p => `<tr class="point ${p.cls}"><td class="num">${p.n}</td><td class="num">${p.k}</td>` +
    `<td class="num">${num(p.lr, 4)}</td><td class="num">${p.tokens}</td><td class="num">${num(p.l0, 2)}</td>` +
    `<td class="num">${num(p.nmse, 4)}</td><td class="num">${num(p.ce, 4)}</td><td class="num">${pct(p.dead)}</td>` +
    `<td>${p.frontier ? "yes" : ""}</td></tr>`).join("");
  return `<h2>Among its sweep: ${pts.length} SAEs at this hookpoint (§3: the frontier of normalized MSE against L0)</h2>
    <div class="lbl"><span class="key this"></span>this SAE <span class="key front"></span>on the frontier (joined)
    <span class="key other"></span>others · lower and further left is better</div>
    <div class="cols sweep">${mseL0}${ceMse}</div>
    <table class="sweep-points"><tr><th>latents</th><th>k</th><th>lr</th><th>tokens</th><th>L0</th><th>normalized MSE</th>
    <th>CE increase</th><th>dead</th><th>frontier</th></tr>${rows}</table>`;
}

function overview() {
  const m = S.meta;
  const better = b => b ? `<span class="lbl">${b} is better</span>` : "";
  const metrics = m.groups.map(g => `<tr><th colspan="4" class="group">${esc(g.name)}</th></tr>` +
    g.rows.map(([k, v, means, b, d]) => `<tr class="metric" data-key="${esc(k)}"><td>${esc(k)}</td>` +
      `<td class="num">${num(v, d)}</td><td>${better(b)}</td><td class="lbl">${esc(means)}</td></tr>`).join("")).join("");
  const probes = m.probes.length ? `<h2>Probe loss (§4.2): best single latent vs best raw dimension vs best random direction</h2>
    <table><tr><th>task</th><th>SAE</th><th>raw</th><th>random</th><th>prior</th><th>best latent</th></tr>` +
    m.probes.map(p => `<tr><td>${esc(p.task)}</td><td class="num">${num(p.sae)}</td><td class="num">${num(p.raw)}</td>` +
      `<td class="num">${num(p.random)}</td><td class="num">${num(p.prior)}</td><td>${link(p.latent)}</td></tr>`).join("") + "</table>" : "";
  const n2g = `<h2>N2G explanations (§4.3) of ${m.n2g.scored} latents</h2>
    <div class="cols n2g"><div>${histogram(m.n2g.precision_hist, 0, 1, "held-out precision")}</div>
    <div>${histogram(m.n2g.recall_hist, 0, 1, "held-out recall")}</div></div>`;
  view.innerHTML = `<h1>${esc(m.title)}</h1><table>${metrics}</table>${sweepSection()}${probes}${n2g}
    <h2>Activation density</h2><img alt="activation frequency histogram" src="activation_frequency.png">
    <h2>All ${m.n_latents} latents, densest first</h2><div id="list"></div>`;
  list(0, document.getElementById("list"));
}

function list(page, target) {
  const order = S.meta.by_density, pages = Math.ceil(order.length / PAGE);
  const nav = Array.from({length: pages}, (_, i) => i === page ? `<b>${i + 1}</b>` : `<a href="#list=${i}">${i + 1}</a>`);
  (target || view).innerHTML = `<div class="pager lbl">page ${nav.slice(0, 60).join(" ")}${pages > 60 ? " …" : ""}</div>` +
    table(order.slice(page * PAGE, (page + 1) * PAGE));
}

function search(text) {
  document.getElementById("q").value = text;
  const q = text.trim().toLowerCase();
  if (/^#?\d+$/.test(q)) { const l = parseInt(q.replace("#", "")); if (l < S.meta.n_latents) { location.hash = `latent=${l}`; return; } }
  let tokens = Object.keys(S.tokens).filter(id => tok(id).trim().toLowerCase() === q);
  const exact = tokens.length > 0;
  if (!exact && q) tokens = Object.keys(S.tokens).filter(id => tok(id).toLowerCase().includes(q)).slice(0, 50);
  const counts = {};
  tokens.forEach(id => S.tokens[id].forEach(([latent, c]) => { counts[latent] = (counts[latent] || 0) + c; }));
  const latents = Object.keys(counts).map(Number).sort((a, b) => counts[b] - counts[a] || a - b).slice(0, 50);
  view.innerHTML = `<h2>Latents that fire on ${exact ? "the token" : "tokens containing"} “${esc(text)}”</h2>
    <div class="lbl">tokens: ${tokens.map(id => gram([id])).join(" ") || "none in the held-out text"}</div>` +
    (latents.length ? table(latents, "<th>firings</th>", l => `<td class="num">${counts[l]}</td>`) : "<p>no latent fires on it</p>");
}

function loadShard(i, then) {
  if (shards[i]) return then(shards[i]);
  (S.waiting[i] = S.waiting[i] || []).push(then);
  const s = document.createElement("script");
  s.src = `data/latents/${String(i).padStart(4, "0")}.js`;
  document.body.appendChild(s);
}

function latent(l) {
  if (!(l >= 0 && l < S.meta.n_latents)) { view.innerHTML = `<p>no latent ${esc(l)}</p>`; return; }
  loadShard(Math.floor(l / S.meta.shard_size), shard => {
    const d = shard[l], s = S.summary, scale = s.max[l] || 1;
    const effect = list => `<ol class="eff">${list.map(([id, v]) =>
      `<li><span class="gram">${shown(tok(id)).replace(/ /g, "\u2423")}</span>${v >= 0 ? "+" : ""}${v.toFixed(3)}</li>`).join("")}</ol>`;
    const examples = list => list.map(([ctx, maxAct, fires]) => {
      const acts = {}; fires.forEach(([p, a]) => { acts[p + S.meta.first_position] = a; });
      const spans = S.contexts[ctx].map((id, p) => {
        const a = acts[p] || 0, style = a > 0 ? ` style="background:rgba(255,110,0,${Math.min(1, a / scale).toFixed(2)})"` : "";
        const value = a > 0 ? `<sub class="act">${a.toFixed(2)}</sub>` : "";
        return `<span class="tok"${style} title="${a.toFixed(3)}">${shown(tok(id))}</span>${value}`;
      }).join("");
      return `<div class="ctx" data-context="${ctx}">${spans}</div>`;
    }).join("");
    const bands = d.bands.map(([hi, lo, list]) =>
      `<h2 class="band">Contexts from the ${hi}th to the ${lo}th percentile of its activations</h2>${examples(list)}`).join("");
    const nav = (l > 0 ? `<a class="prev" href="#latent=${l - 1}">← latent ${l - 1}</a>` : "") +
      (l + 1 < S.meta.n_latents ? `<a class="next" href="#latent=${l + 1}">latent ${l + 1} →</a>` : "");
    view.innerHTML = `<div class="pager">${nav}</div><h1 id="latent-${l}">latent ${l}</h1>
      <div class="lbl">density ${pct(s.density[l])} · max activation ${num(s.max[l])}</div>
      <h2>Activations when it fires</h2>${histogram(d.hist, 0, s.max[l], "activation")}
      <h2>N2G explanation</h2><div>${d.n2g.map(gram).join("") || '<span class="lbl">none</span>'}</div>
      <div class="lbl">${n2gVerdict(s.n2g_precision[l], s.n2g_recall[l])}</div>
      <h2>Logit effects (decoder direction through the unembedding), ranked</h2>
      <div class="cols"><div><div class="lbl">promotes</div>${effect(d.promoted)}</div>
      <div><div class="lbl">suppresses</div>${effect(d.suppressed)}</div>
      ${d.logit_hist ? `<div class="logit-hist"><div class="lbl">every token's logit change</div>${histogram(...d.logit_hist, "logit change")}</div>` : ""}</div>
      <div class="cols"><div><h2>Nearest latents by decoder cosine</h2>
      <ol class="eff neighbours">${d.neighbours.map(([n, c]) => `<li>${link(n)} <span class="lbl">${num(c, 3)}</span></li>`).join("") || '<li class="lbl">none</li>'}</ol></div>
      <div><h2>Fires most often with</h2>
      <ol class="eff cofiring">${d.cofiring.map(([n, c]) => `<li>${link(n)} <span class="lbl">on ${c} tokens</span></li>`).join("") || '<li class="lbl">no other latent</li>'}</ol></div></div>
      <h2>Top activations</h2>${examples(d.top) || '<p class="lbl">never fired on the held-out text</p>'}
      ${bands}${d.random.length ? `<h2 class="random">Random firings</h2>${examples(d.random)}` : ""}`;
  });
}

function route() {
  const h = decodeURIComponent(location.hash.slice(1)), [key, value] = [h.split("=")[0], h.slice(h.indexOf("=") + 1)];
  if (key === "latent") latent(parseInt(value));
  else if (key === "search") search(value);
  else if (key === "list") list(parseInt(value) || 0);
  else overview();
  window.scrollTo(0, 0);
}

document.getElementById("home").textContent = S.meta.title;
document.getElementById("search").addEventListener("submit", e => {
  e.preventDefault();
  location.hash = "search=" + encodeURIComponent(document.getElementById("q").value);
});
window.addEventListener("hashchange", route);
route();
