"""The page at `/`: pick an adapter, paste texts, see labels and probabilities as bars (a multi-label
run: the set of labels, and a bar per label with a tick at its threshold). Self-contained
(no outside resources: the server may be offline); it calls /adapters and /predict with the API key
typed into it, and writes every server-provided string as text, never as HTML."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>peftlab serve</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 860px; margin: 2em auto; padding: 0 1em; color: #222; }
  label { display: block; margin: .6em 0 .2em; font-weight: 600; }
  input, select, textarea { font: inherit; width: 100%; box-sizing: border-box; padding: .35em; }
  button { font: inherit; margin-top: .8em; padding: .4em 1.2em; }
  #status { color: #555; min-height: 1.4em; }
  .card { border: 1px solid #ddd; border-radius: 6px; padding: .6em .9em; margin: .8em 0; }
  .text { margin: 0 0 .4em; white-space: pre-wrap; overflow-wrap: anywhere; }
  .row { display: grid; grid-template-columns: 11em 1fr 4.5em; gap: .6em; align-items: center; margin: .15em 0; }
  .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .bar { background: #eee; height: .9em; border-radius: 3px; overflow: hidden; }
  .bar > span { display: block; height: 100%; background: #4a78c2; }
  .top .bar > span { background: #2a9d5c; }
  .value { text-align: right; font-variant-numeric: tabular-nums; }
  .bar { position: relative; }
  .bar > i { position: absolute; top: 0; bottom: 0; width: 2px; background: #222; }
  .labels { margin: 0 0 .4em; font-weight: 600; }
</style>
</head>
<body>
<h1>peftlab</h1>
<form id="form">
  <label for="key">API key</label>
  <input id="key" type="password" autocomplete="off" placeholder="only when the server was started with --api-key">
  <label for="adapter">Adapter</label>
  <select id="adapter"></select>
  <label for="texts">Texts, one per line</label>
  <textarea id="texts" rows="6"></textarea>
  <button id="go" type="submit">Classify</button>
</form>
<p id="status" role="status"></p>
<div id="results"></div>
<script>
const $ = id => document.getElementById(id);
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
                                 if (text !== undefined) e.textContent = text; return e; };
$("key").value = sessionStorage.getItem("peftlab-key") || "";

async function call(path, body) {
  const headers = {"Content-Type": "application/json"};
  const key = $("key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  const reply = await fetch(path, body === undefined ? {headers} : {method: "POST", headers, body: JSON.stringify(body)});
  const data = await reply.json().catch(() => ({}));
  if (!reply.ok) throw new Error(`${reply.status}: ${data.detail || reply.statusText}`);
  return data;
}

let served = {};  // adapter name -> its /adapters entry (multi_label, thresholds)

async function loadAdapters() {
  sessionStorage.setItem("peftlab-key", $("key").value.trim());
  try {
    const adapters = await call("adapters");
    served = Object.fromEntries(adapters.map(a => [a.name, a]));
    $("adapter").replaceChildren(...adapters.map(a =>
      new Option(`${a.name} (${a.method}${a.multi_label ? ", multi-label" : ""}: ${a.labels.join(", ")})`, a.name)));
    $("status").textContent = `${adapters.length} adapter(s) served`;
  } catch (e) {
    $("status").textContent = e.message;
  }
}

function card(text, prediction, adapter) {
  // single-label: {label, confidence, probabilities}; multi-label: {labels (a set, maybe empty), probabilities}
  const div = el("div", "card");
  div.append(el("p", "text", text));
  const chosen = new Set(prediction.labels || [prediction.label]);
  const thresholds = (adapter && adapter.thresholds) || {};
  if (prediction.labels) div.append(el("p", "labels",
    prediction.labels.length ? "labels: " + prediction.labels.join(", ") : "no label reaches its threshold"));
  const ranked = Object.entries(prediction.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, p] of ranked) {
    const row = el("div", chosen.has(name) ? "row top" : "row");
    const bar = el("span", "bar"), fill = el("span");
    fill.style.width = (100 * p).toFixed(1) + "%";
    bar.append(fill);
    if (name in thresholds) {  // where this label's threshold lies
      const tick = el("i");
      tick.style.left = (100 * thresholds[name]).toFixed(1) + "%";
      tick.title = "threshold " + thresholds[name].toFixed(3);
      bar.append(tick);
    }
    row.append(el("span", "name", name), bar, el("span", "value", p.toFixed(4)));
    div.append(row);
  }
  return div;
}

$("key").addEventListener("change", loadAdapters);
$("form").addEventListener("submit", async event => {
  event.preventDefault();
  const texts = $("texts").value.split("\\n").map(t => t.trim()).filter(Boolean);
  if (!texts.length) { $("status").textContent = "type at least one text"; return; }
  $("status").textContent = "classifying…";
  try {
    const reply = await call("predict", {adapter: $("adapter").value || null, texts});
    $("results").replaceChildren(...reply.predictions.map((p, i) => card(texts[i], p, served[reply.adapter])));
    $("status").textContent = `${texts.length} text(s) classified by ${reply.adapter}`;
  } catch (e) {
    $("status").textContent = e.message;
  }
});
loadAdapters();
</script>
</body>
</html>
"""
