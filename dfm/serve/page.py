"""The one page of `dfm serve`: the form drawn from dfm.serve.jobs.FIELDS, and a little script that posts it, polls
the job (queue position, sampling progress) and shows the result. Everything is inline: the page fetches nothing
but its own server's /api and /files."""

from __future__ import annotations

from html import escape

from dfm.serve.jobs import FIELDS, Field

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .6em; } h1 small { color: #777; font-weight: normal; }
main { display: grid; grid-template-columns: 360px 1fr; gap: 1.5em; }
label { display: block; margin: .5em 0 .15em; font-weight: 600; }
input[type=text], input[type=number], textarea, select { width: 100%; box-sizing: border-box; padding: .35em;
  font: inherit; }
textarea { height: 4.5em; } .row { display: grid; grid-template-columns: 1fr 1fr 1.3fr; gap: .6em; }
.hint { color: #777; font-size: .85em; } .seed { display: flex; gap: .5em; align-items: center; }
.seed input[type=number] { flex: 1; min-width: 4.5em; } .seed label { display: inline; font-weight: normal; margin: 0; }
button { margin-top: 1em; padding: .5em 2em; font: inherit; font-weight: 600; background: #2458c6; color: white;
         border: 0; border-radius: 4px; cursor: pointer; } button:disabled { background: #99a; }
#error { color: #b00020; font-weight: 600; min-height: 1.4em; } #status { min-height: 1.4em; } progress { width: 100%; }
video { min-width: 256px; max-width: 100%; background: #000; image-rendering: pixelated; }
#sheet { max-width: 100%; image-rendering: pixelated; }
pre { background: #f4f4f4; padding: .6em; white-space: pre-wrap; word-break: break-all; font-size: .85em; }
"""

SCRIPT = """
const $ = (id) => document.getElementById(id);
let info = null; const images = {};
function modelName() { return $('model').value === '' ? $('model_path').value.trim() : $('model').value; }
async function loadModel() {
  $('model_path').hidden = $('model').value !== '';
  const name = modelName(); if (!name) return;
  document.body.dataset.model = '';  // loading; the model's name once its settings are in the form
  const r = await fetch('/api/model?name=' + encodeURIComponent(name)); const j = await r.json();
  if (!r.ok) { $('error').textContent = j.error; document.body.dataset.model = '!' + name; return; }
  $('error').textContent = ''; info = j;
  const s = $('sampler'); s.innerHTML = '';
  for (const n of j.samplers) s.add(new Option(n, n));
  for (const [k, v] of Object.entries(j.defaults)) {
    const el = $(k); if (!el) continue;
    if (el.tagName === 'SELECT') el.value = v; else if (v !== null) el.value = v; else el.value = '';
    if (k === 'negative') { el.value = ''; el.placeholder = v || "the model's null conditioning"; }
  }
  $('frames').step = j.frame_step; $('frames').min = j.frames[0];
  for (const k of ['height', 'width']) { $(k).step = j.size_step; $(k).min = j.size_step; }
  $('hint_frames').textContent = 'this model: ' + j.frames.join(', ') + ', ...';
  $('hint_height').textContent = $('hint_width').textContent = 'multiples of ' + j.size_step;
  for (const k of ['image', 'last_image']) {  // shown only where the model takes it
    $('box_' + k).hidden = !j[k];
    if (!j[k]) { $(k).value = ''; delete images[k]; }
    $('hint_' + k).textContent = j[k] === 'needed' ? 'this model needs it (PNG or JPEG)' : 'optional (PNG or JPEG)';
  }
  document.body.dataset.model = name;
}
function readImage(k) {  // the chosen file as a data URL (a promise of it), sent in the JSON request
  const file = $(k).files[0]; delete images[k]; if (!file) return;
  images[k] = new Promise((ok) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result);
    reader.onerror = () => { $('error').textContent = 'cannot read ' + file.name + ' in the browser'; ok(null); };
    reader.readAsDataURL(file);
  });
}
async function form() {
  const data = {seed_random: $('seed_random').checked};
  for (const el of document.querySelectorAll('[data-field]')) data[el.id] = el.value;
  data.model = modelName();
  for (const [k, v] of Object.entries(images)) if (!$('box_' + k).hidden) data[k] = await v;
  return data;
}
function showResult(r) {
  const f = (name) => '/files/' + encodeURIComponent(name);
  $('result').hidden = false;
  const v = $('video'); v.src = f(r.video); v.load(); v.play().catch(() => {});
  $('sheet').src = f(r.sheet);
  const a = $('download'); a.href = f(r.video); a.download = r.video; a.textContent = 'Download ' + r.video;
  $('json').href = f(r.json); $('json').textContent = r.json;
  const shown = Object.assign({}, r); delete shown.command;
  $('settings').textContent = JSON.stringify(shown, null, 2);
  $('command').textContent = r.command;
}
async function poll(id) {
  while (true) {
    const r = await fetch('/api/jobs/' + id); const j = await r.json();
    if (!r.ok) { $('error').textContent = j.error; return; }
    if (j.state === 'queued') {
      $('status').textContent = 'In the queue: ' + j.ahead + ' generation' + (j.ahead === 1 ? '' : 's') +
        ' ahead of this one (position ' + (j.ahead + 1) + ')';
      $('progress').removeAttribute('value');
    } else if (j.state === 'running') {
      $('status').textContent = j.phase === 'sampling' ? 'Sampling: step ' + j.step + ' of ' + j.steps : j.phase;
      if (j.steps) { $('progress').max = j.steps; $('progress').value = j.step; }
    } else if (j.state === 'done') {
      $('status').textContent = 'Done: ' + j.result.video + ' (' + j.result.seconds + ' s, NFE ' + j.result.nfe + ')';
      $('progress').max = 1; $('progress').value = 1; showResult(j.result); return;
    } else { $('error').textContent = j.error; $('status').textContent = ''; return; }
    await new Promise((ok) => setTimeout(ok, 150));
  }
}
async function generate() {
  $('error').textContent = ''; $('generate').disabled = true;
  try {
    const r = await fetch('/api/generate', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                            body: JSON.stringify(await form())});
    const j = await r.json();
    if (!r.ok) { $('error').textContent = j.error; return; }
    $('status').textContent = 'Queued'; await poll(j.id);
  } catch (e) { $('error').textContent = 'the server did not answer (' + e + ')'; }
  finally { $('generate').disabled = false; }
}
$('model').addEventListener('change', loadModel); $('model_path').addEventListener('change', loadModel);
$('generate').addEventListener('click', generate);
for (const k of ['image', 'last_image']) $(k).addEventListener('change', () => readImage(k));
loadModel();
"""


def _input(f: Field, models: list[str], selected: str) -> str:
    """The HTML of one field: its label, its input (id = the field's name) and a hint line."""
    hint = f'<div class="hint" id="hint_{f.name}">{escape(f.hint)}</div>'
    label = f'<label for="{f.name}">{escape(f.label)}</label>'
    if f.kind == "model":
        names = models if selected in models else [selected, *models]
        options = "".join(f'<option value="{escape(m)}"{" selected" if m == selected else ""}>{escape(m)}</option>'
                          for m in names) + '<option value="">another folder...</option>'
        return (f'{label}<select id="model">{options}</select><input type="text" id="model_path" hidden '
                f'aria-label="Model folder" placeholder="path of a model folder">{hint}')
    if f.kind == "textarea":
        return f'{label}<textarea id="{f.name}" data-field></textarea>'
    if f.kind == "sampler":
        return f'{label}<select id="{f.name}" data-field></select>'
    if f.kind == "seed":
        return (f'{label}<div class="seed"><input type="number" id="seed" data-field min="0" value="0">'
                f'<input type="checkbox" id="seed_random" checked><label for="seed_random">random</label></div>{hint}')
    if f.kind == "image":  # hidden until the model says it takes one
        return f'<div id="box_{f.name}" hidden>{label}<input type="file" id="{f.name}" accept="image/*">{hint}</div>'
    kind = "text" if f.kind == "text" else "number"
    step = ' step="any"' if f.kind == "float" else ""
    return f'{label}<input type="{kind}" id="{f.name}" data-field{step}>{hint}'


def render(models: list[str], selected: str) -> str:
    """The page, with `selected` picked in the model list."""
    fields = {f.name: _input(f, models, selected) for f in FIELDS}
    grouped = ("steps", "guidance", "seed"), ("frames", "height", "width")  # three to a row
    rows = {name: group for group in grouped for name in group}
    body, done = [], set()
    for f in FIELDS:
        if f.name in done:
            continue
        group = rows.get(f.name)
        if group and all(g in fields for g in group):
            body.append('<div class="row">' + "".join(f"<div>{fields[g]}</div>" for g in group) + "</div>")
            done.update(group)
        else:
            body.append(fields[f.name])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dfm serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body><h1>dfm <small>text to video</small></h1><main>
<section>{''.join(body)}<button id="generate" type="button">Generate</button></section>
<section><p id="error" role="alert"></p><p id="status" role="status"></p><progress id="progress" max="1" value="0">
</progress><div id="result" hidden><video id="video" controls loop muted playsinline></video>
<p><a id="download" href="#">Download</a> &middot; settings: <a id="json" href="#">json</a></p>
<h2>Contact sheet</h2><img id="sheet" alt="contact sheet: the frames in order">
<h2>Settings</h2><pre id="settings"></pre><h2>The same video from the command line</h2><pre id="command"></pre>
</div></section></main><script>{SCRIPT}</script></body></html>
"""
