// The page at /: pick or drop media, send it to this server's API, show the answer.
// Plain JavaScript, no dependencies; every URL is relative, so the page also works when the
// service is mounted under a path prefix behind a proxy.
"use strict";

const KINDS = {
  image: {
    endpoint: "v1/captions/image",
    field: "image",
    label: "Choose an image",
    hint: "…or drop it here. An image: PNG, JPEG, WebP, GIF.",
    accept: "image/*",
  },
  video: {
    endpoint: "v1/captions/video",
    field: "video",
    label: "Choose a video",
    hint: "…or drop it here. A video: MP4, WebM, MOV, AVI, MKV or an animated GIF.",
    accept: "video/*,image/gif",
  },
  frames: {
    endpoint: "v1/captions/video",
    field: "frames",
    label: "Choose the frames",
    hint: "…or drop them here. Several images, ordered by file name.",
    accept: "image/*",
  },
};
const OPTIONS = ["beam_size", "num_captions", "tags"];
const KEY_STORE = "captioner-api-key";

const $ = (id) => document.getElementById(id);
let files = [];
let previewUrls = [];

function kind() {
  return document.querySelector('input[name="kind"]:checked').value;
}

function setKind(name) {
  document.querySelector(`input[name="kind"][value="${name}"]`).checked = true;
  showKind();
}

function showKind() {
  const spec = KINDS[kind()];
  $("files-label").textContent = spec.label;
  $("files-hint").textContent = spec.hint;
  $("files").accept = spec.accept;
  showPreview();
}

// -- files: picked or dropped, then previewed ----------------------------------------------------

function byName(a, b) {
  return a.name.localeCompare(b.name, undefined, { numeric: true });
}

function useFiles(list) {
  files = Array.from(list).sort(byName);
  if (files.length === 0) return;
  // Guess the kind from the files; anything else (a text file, say) keeps the chosen kind, and
  // the server says what is wrong with it.
  const videos = files.filter((f) => f.type.startsWith("video/"));
  const images = files.filter((f) => f.type.startsWith("image/"));
  if (files.length === 1 && videos.length === 1) setKind("video");
  else if (files.length > 1 && images.length === files.length) setKind("frames");
  else if (files.length === 1 && images.length === 1 && kind() === "frames") setKind("image");
  else showPreview();
  hide($("error"));
}

function clearPreview() {
  previewUrls.forEach((url) => URL.revokeObjectURL(url));
  previewUrls = [];
  $("preview").replaceChildren();
}

function objectUrl(file) {
  const url = URL.createObjectURL(file);
  previewUrls.push(url);
  return url;
}

function showPreview() {
  clearPreview();
  const box = $("preview");
  if (files.length === 0) return;
  const what = kind();
  const chosen = what === "frames" ? files : files.slice(0, 1);
  if (what !== "frames" && files.length > 1) {
    box.append(note(`${files.length} files chosen; only ${files[0].name} is sent.`));
  }
  if (what === "frames") {
    const list = el("ol", { className: "frames", "aria-label": "Frames, in the order sent" });
    chosen.forEach((file, i) => {
      const item = el("li");
      const shown = media(file, `Frame ${i + 1}: ${file.name}`);
      if (shown) item.append(shown);
      item.append(el("span", {}, file.name));
      list.append(item);
    });
    box.append(list);
  } else {
    const file = chosen[0];
    const shown = media(file, `Preview of ${file.name}`);
    const figure = el("figure");
    if (shown) figure.append(shown);
    const about = `${file.name} (${size(file.size)})${shown ? "" : ": no preview for this type of file"}`;
    figure.append(el("figcaption", {}, about));
    box.append(figure);
  }
}

function media(file, label) {
  if (file.type.startsWith("video/")) {
    return el("video", { src: objectUrl(file), controls: true, muted: true, "aria-label": label });
  }
  if (file.type.startsWith("image/")) {
    return el("img", { src: objectUrl(file), alt: label });
  }
  return null;
}

// -- talking to the API ------------------------------------------------------------------------

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The API's error body is {"error": {"type", "message", "param"}}; anything else (a proxy's
// HTML page, a dropped connection) is described as best we can.
async function apiError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    // not JSON
  }
  if (body && body.error && body.error.message) return body.error;
  return { type: `HTTP ${response.status}`, message: response.statusText || "no message", param: null };
}

async function loadModel() {
  let response;
  try {
    response = await fetch("v1/models", { headers: headers() });
  } catch (err) {
    $("model").textContent = `Could not reach the server (${err.message}).`;
    return;
  }
  if (response.status === 401) {
    askForKey();
    $("model").textContent = "This server needs an API key: enter it below.";
    return;
  }
  if (response.status === 503) {
    $("model").textContent = "The model is still loading…";
    setTimeout(loadModel, 2000);
    return;
  }
  if (!response.ok) {
    const error = await apiError(response);
    $("model").textContent = `The server could not describe its model: ${error.message}`;
    return;
  }
  const model = (await response.json()).models[0];
  const what = model.domain ? ` It was trained on ${model.domain}.` : "";
  $("model").textContent = `Model ${model.name} (version ${model.version}, ${model.device}).${what}`;
  for (const name of OPTIONS) {
    const range = model.options[name];
    const input = $(name);
    if (!range) continue;
    input.min = range.min;
    input.max = range.max;
    if (input.value === "") input.value = range.default;
    $(`${name}-hint`).textContent = hintFor(name, range);
  }
  if (!model.tags) {
    $("tags").value = 0;
    $("tags").disabled = true;
    $("tags-hint").textContent = `not with this model: ${model.tags_unavailable || "no classifier"}`;
  }
}

function hintFor(name, range) {
  if (name === "beam_size") return `${range.min} to ${range.max}; 1 is greedy`;
  if (name === "num_captions") return `${range.min} to ${range.max}, at most the beam size`;
  return `${range.min} to ${range.max} ImageNet classes`;
}

function askForKey() {
  const row = $("key-row");
  if (row.hidden) {
    row.hidden = false;
    $("api-key").focus();
  }
}

async function submit(event) {
  event.preventDefault();
  hide($("error"));
  const what = kind();
  const spec = KINDS[what];
  if (files.length === 0) {
    showError({ type: "no file", message: `${spec.label.replace("Choose", "Choose or drop")} first.` });
    $("files").focus();
    return;
  }
  const form = new FormData();
  const sent = what === "frames" ? files : files.slice(0, 1);
  sent.forEach((file) => form.append(spec.field, file, file.name));
  for (const name of OPTIONS) {
    const input = $(name);
    if (input.disabled || input.value.trim() === "") continue;
    if (name === "tags" && Number(input.value) === 0) continue;
    form.append(name, input.value.trim());
  }
  const button = $("submit");
  button.disabled = true;
  $("status").textContent = "Captioning…";
  try {
    const response = await fetch(spec.endpoint, { method: "POST", body: form, headers: headers() });
    if (!response.ok) {
      const error = await apiError(response);
      if (response.status === 401) askForKey();
      showError(error, response.status);
      $("status").textContent = "";
      return;
    }
    showResult(await response.json());
    $("status").textContent = "Done.";
  } catch (err) {
    showError({ type: "network", message: `Could not reach the server (${err.message}).` });
    $("status").textContent = "";
  } finally {
    button.disabled = false;
  }
}

// -- showing answers -------------------------------------------------------------------------------

function showError(error, status) {
  hide($("result"));
  const box = $("error");
  const where = error.param ? ` (${error.param})` : "";
  const code = status ? `${status} ` : "";
  box.replaceChildren(
    el("strong", {}, "Error: "),
    el("span", { className: "message" }, error.message),
    el("span", { className: "hint" }, ` ${code}${error.type}${where}`),
  );
  box.hidden = false;
}

function showResult(body) {
  $("caption").textContent = body.caption;

  const domain = $("domain");
  domain.replaceChildren();
  domain.className = "domain";
  if (body.warnings.length > 0 || body.in_domain === false) {
    domain.classList.add("warning");
    domain.append(el("strong", {}, "Warning: "));
    const list = el("ul");
    body.warnings.forEach((text) => list.append(el("li", {}, text)));
    domain.append(list);
  }
  if (body.in_domain === null) {
    domain.append(el("p", {}, "The model cannot tell whether this input is like its training data."));
  } else {
    const verdict = body.in_domain ? "like the training data" : "unlike the training data";
    domain.append(el("p", {}, `Domain score ${fixed(body.domain_score, 2)}: ${verdict} (at most 1 is in domain).`));
  }

  const rows = body.captions.map((c, i) =>
    row([String(i + 1), c.text, fixed(c.score, 3), fixed(c.log_prob, 3)]),
  );
  $("captions").tBodies[0].replaceChildren(...rows);

  const tags = body.tags || [];
  $("tags-table").tBodies[0].replaceChildren(
    ...tags.map((t) => row([t.name, `${(t.probability * 100).toFixed(1)}%`])),
  );
  $("tags-result").hidden = tags.length === 0;

  facts($("input"), inputFacts(body.input));
  facts($("timings"), [
    ["queue", fixed(body.timings_ms.queue, 1)],
    ["preprocess", fixed(body.timings_ms.preprocess, 1)],
    ["inference", fixed(body.timings_ms.inference, 1)],
    ["total", fixed(body.timings_ms.total, 1)],
  ]);
  $("request-id").textContent = `Request ${body.id}, model ${body.model.name} version ${body.model.version}.`;

  $("result").hidden = false;
  $("result-heading").focus();
}

function inputFacts(input) {
  const known = (value, unit = "") => (value === null || value === undefined ? "n/a" : `${value}${unit}`);
  const pixels = input.width ? `${input.width} × ${input.height}` : "n/a";
  if ("frames_used" in input) {
    return [
      ["frames used", String(input.frames_used)],
      ["size", pixels],
      ["duration", known(input.duration_s, " s")],
      ["fps", known(input.fps)],
      ["codec", known(input.codec)],
    ];
  }
  return [["size", pixels], ["format", input.format]];
}

// -- small DOM helpers ------------------------------------------------------------------------------

function el(tag, props = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name in node && !name.includes("-")) node[name] = value;
    else node.setAttribute(name, value);
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

function row(cells) {
  const tr = el("tr");
  cells.forEach((text) => tr.append(el("td", {}, text)));
  return tr;
}

function facts(list, pairs) {
  list.replaceChildren(...pairs.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
}

function note(text) {
  return el("p", { className: "hint" }, text);
}

function hide(node) {
  node.hidden = true;
}

function fixed(value, digits) {
  return value === null || value === undefined ? "n/a" : Number(value).toFixed(digits);
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

// -- wiring ------------------------------------------------------------------------------------------

function setUp() {
  document.querySelectorAll('input[name="kind"]').forEach((radio) => {
    radio.addEventListener("change", showKind);
  });
  $("files").addEventListener("change", (event) => useFiles(event.target.files));

  const drop = $("drop");
  // A file dropped anywhere on the page is taken, rather than the browser navigating to it.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => event.preventDefault());
  }
  drop.addEventListener("dragenter", () => drop.classList.add("over"));
  drop.addEventListener("dragover", () => drop.classList.add("over"));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    drop.classList.remove("over");
    useFiles(event.dataTransfer.files);
  });

  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  if (key.value) $("key-row").hidden = false;
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    loadModel();
  });

  $("form").addEventListener("submit", submit);
  showKind();
  loadModel();
}

setUp();
