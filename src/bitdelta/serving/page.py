"""The side-by-side web page served at ``/``: static HTML + JS, no build step, no CDN.

Lists the models (``GET /v1/models``), lets the user tick any subset, sends one prompt to each
through ``POST /v1/chat/completions`` with ``stream: true`` and renders every SSE stream in its own
column as it arrives. An optional API key is kept in the browser's localStorage.
"""

INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bitdelta: fine-tunes side by side</title>
<style>
  :root { font-family: system-ui, sans-serif; color: #1d232a; background: #f6f7f9; }
  body { margin: 0 auto; max-width: 1400px; padding: 1rem 1.5rem; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  .muted { color: #667; font-size: .85rem; }
  #models { display: flex; flex-wrap: wrap; gap: .4rem .9rem; margin: .8rem 0; }
  #models label { background: #fff; border: 1px solid #d5d9de; border-radius: 6px; padding: .25rem .6rem;
                  cursor: pointer; }
  textarea { width: 100%; box-sizing: border-box; min-height: 4.5rem; font: inherit; padding: .5rem; }
  .row { display: flex; gap: .8rem; align-items: center; margin: .5rem 0; flex-wrap: wrap; }
  input[type=number] { width: 5rem; }
  button { font: inherit; padding: .4rem 1.2rem; border-radius: 6px; border: 1px solid #246; background: #2b5c8a;
           color: #fff; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  #answers { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: .8rem; margin-top: 1rem; }
  .answer { background: #fff; border: 1px solid #d5d9de; border-radius: 8px; padding: .6rem .8rem; }
  .answer h2 { font-size: 1rem; margin: 0 0 .4rem; display: flex; justify-content: space-between; }
  .answer pre { white-space: pre-wrap; word-wrap: break-word; margin: 0; font: .92rem/1.4 ui-monospace, monospace;
                min-height: 3rem; }
  .status { font-weight: normal; font-size: .8rem; color: #667; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>bitdelta &mdash; one base, many 1-bit fine-tunes</h1>
<div class="muted">Pick models, send one prompt, watch the answers stream side by side.</div>
<div id="models" aria-label="models"><span class="muted">loading models&hellip;</span></div>
<textarea id="prompt" placeholder="Type a prompt&hellip;">To be, or not to be</textarea>
<div class="row">
  <label>max tokens <input id="max_tokens" type="number" value="64" min="1"></label>
  <label>temperature <input id="temperature" type="number" value="0" min="0" max="2" step="0.1"></label>
  <label>API key <input id="api_key" type="password" placeholder="(if required)"></label>
  <button id="send">Send</button>
  <span id="info" class="muted"></span>
</div>
<div id="answers"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const keyBox = $("api_key");
keyBox.value = localStorage.getItem("bitdelta_api_key") || "";
keyBox.addEventListener("change", () => { localStorage.setItem("bitdelta_api_key", keyBox.value); loadModels(); });

function headers() {
  const h = {"Content-Type": "application/json"};
  if (keyBox.value) h["Authorization"] = "Bearer " + keyBox.value;
  return h;
}

async function loadModels() {
  const box = $("models");
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    box.textContent = "";
    for (const m of body.data) {
      const label = document.createElement("label");
      const cb = document.createElement("input");
      cb.type = "checkbox"; cb.value = m.id; cb.name = "model";
      cb.dataset.model = m.id;
      label.appendChild(cb);
      label.appendChild(document.createTextNode(" " + m.id + (m.parent ? "" : " (base)")));
      box.appendChild(label);
    }
  } catch (e) {
    box.innerHTML = "";
    const s = document.createElement("span");
    s.className = "error"; s.textContent = "could not list models: " + e.message;
    box.appendChild(s);
  }
}

function column(model) {
  const div = document.createElement("div");
  div.className = "answer"; div.dataset.model = model;
  const h = document.createElement("h2");
  h.textContent = model;
  const st = document.createElement("span"); st.className = "status"; st.textContent = "waiting";
  h.appendChild(st);
  const pre = document.createElement("pre"); pre.className = "text";
  div.appendChild(h); div.appendChild(pre);
  $("answers").appendChild(div);
  return {pre, st, div};
}

async function streamOne(model, prompt, col) {
  const body = {model, messages: [{role: "user", content: prompt}], stream: true,
                max_tokens: parseInt($("max_tokens").value) || 64,
                temperature: parseFloat($("temperature").value) || 0};
  const t0 = performance.now();
  let ntok = 0;
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    col.st.textContent = "streaming";
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of ev.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { continue; }
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          const c = obj.choices && obj.choices[0];
          if (c && c.delta && c.delta.content) { col.pre.textContent += c.delta.content; ntok++; }
          if (c && c.finish_reason) col.div.dataset.finish = c.finish_reason;
        }
      }
    }
    const s = (performance.now() - t0) / 1000;
    col.st.textContent = "done · " + s.toFixed(1) + " s";
    col.div.dataset.done = "1";
  } catch (e) {
    col.st.textContent = "error";
    const s = document.createElement("div"); s.className = "error"; s.textContent = e.message;
    col.div.appendChild(s);
    col.div.dataset.done = "error";
  }
}

$("send").addEventListener("click", async () => {
  const models = [...document.querySelectorAll("#models input:checked")].map((c) => c.value);
  const prompt = $("prompt").value;
  if (!models.length) { $("info").textContent = "tick at least one model"; return; }
  $("info").textContent = "";
  $("answers").textContent = "";
  $("send").disabled = true;
  await Promise.all(models.map((m) => streamOne(m, prompt, column(m))));
  $("send").disabled = false;
});

loadModels();
</script>
</body>
</html>
"""
