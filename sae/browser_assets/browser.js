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
  view.innerHTML = `<h1>${esc(m.title)}</h1><table>${metrics}</table>${probes}${n2g}
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
