// The page `biogpt serve` gives at /: a playground over /v1/completions (streamed, token
// probabilities on hover, a stop that cancels on the server) and, on a task checkpoint, its task
// over /v1/qa|extract|classify with the copied entities highlighted at their offsets.
"use strict";

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("biogpt-key") || "";
let served = null; // this server's /v1/models entry
let controller = null; // the running generation's, to stop it

class Refused extends Error {}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    askKey(key ? "The server refused this key: check it and try again." : "This server needs its API key.");
    throw new Refused();
  }
  return response;
}

async function failure(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function askKey(message) {
  $("key").hidden = false;
  $("key-message").textContent = message;
  $("key-input").focus();
}

$("key-save").onclick = () => {
  key = $("key-input").value.trim();
  sessionStorage.setItem("biogpt-key", key);
  $("key").hidden = true;
  start();
};

for (const tab of document.querySelectorAll(".tab")) {
  tab.onclick = () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("on", t === tab);
    for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== tab.dataset.view;
  };
}

async function start() {
  try {
    const response = await api("v1/models");
    served = (await response.json()).data[0];
    $("model").textContent = served.id;
    if (served.tasks && served.tasks.length) setupTask(served.tasks[0]);
  } catch (e) {
    if (!(e instanceof Refused)) $("play-message").textContent = String(e);
  }
}

// -- the playground ----------------------------------------------------------------------------
function request() {
  const body = {
    model: served.id, prompt: $("prompt").value, stream: true, logprobs: 1,
    max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
  };
  if (Number($("top_k").value) > 0) body.top_k = Number($("top_k").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("stop").value) body.stop = [$("stop").value];
  return body;
}

async function* events(response) {
  // server-sent events: each `data:` line's JSON, until [DONE]
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function showTokens(out, logprobs) {
  // the text again, a span a token, its probability on hover
  out.textContent = "";
  logprobs.tokens.forEach((piece, i) => {
    const span = document.createElement("span");
    span.textContent = piece;
    span.title = `${(Math.exp(logprobs.token_logprobs[i]) * 100).toFixed(1)}%`;
    out.appendChild(span);
  });
}

$("generate").onclick = async () => {
  const out = $("output");
  out.textContent = "";
  $("play-message").textContent = $("stats").textContent = "";
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  const began = performance.now();
  let first = null, pieces = 0, text = "";
  try {
    const response = await api("v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await failure(response));
    for await (const chunk of events(response)) {
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.text) {
        first = first ?? performance.now();
        pieces += 1;
        text += choice.text;
        out.textContent = text;
      }
      if (choice.logprobs) {
        pieces = choice.logprobs.tokens.length;
        showTokens(out, choice.logprobs);
      }
    }
    const seconds = (performance.now() - began) / 1000;
    const later = first === null ? 0 : (performance.now() - first) / 1000;
    $("stats").textContent = first === null ? "no text" :
      `first token after ${((first - began) / 1000).toFixed(2)} s, ${pieces} tokens in ${seconds.toFixed(2)} s` +
      (pieces > 1 && later > 0 ? `, ${((pieces - 1) / later).toFixed(1)} tokens/s` : "");
  } catch (e) {
    if (e.name === "AbortError") $("stats").textContent = "stopped";
    else if (!(e instanceof Refused)) $("play-message").textContent = e.message;
  } finally {
    $("generate").disabled = false;
    $("stop-button").disabled = true;
  }
};

$("stop-button").onclick = () => controller && controller.abort(); // the server cancels it at its next step

// -- the task ----------------------------------------------------------------------------------
const FIELDS = { qa: ["question", "context"], extract: ["title", "abstract"], classify: ["text"] };
let task = null, documents = null, records = [];

function setupTask(t) {
  task = t;
  $("task-tab").hidden = false;
  $("task-tab").textContent = t.command;
  $("task-name").textContent = `${t.command} (${t.task})`;
  $("fields").replaceChildren(...FIELDS[t.command].map((name) => {
    const label = document.createElement("label");
    const area = document.createElement("textarea");
    area.id = `field-${name}`;
    area.rows = name === "title" || name === "question" ? 1 : 6;
    label.append(name, area);
    return label;
  }));
}

function contentType(name) {
  if (/\.json$/i.test(name)) return "application/json";
  if (/\.xml(\.gz)?$/i.test(name)) return "application/xml";
  return "text/plain";
}

async function runTask(format) {
  const file = $("file").files[0];
  const constrained = $("constrained").checked;
  if (file) {
    return api(`v1/${task.command}?constrained=${constrained}&format=${format}`, {
      method: "POST", headers: { "Content-Type": contentType(file.name) }, body: file,
    });
  }
  documents = [Object.fromEntries(FIELDS[task.command].map((name) => [name, $(`field-${name}`).value]))];
  return api(`v1/${task.command}`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ documents, constrained, format }),
  });
}

$("run").onclick = async () => {
  $("task-message").textContent = $("task-stats").textContent = "";
  $("highlighted").textContent = "";
  $("results").replaceChildren();
  $("downloads").hidden = true;
  const began = performance.now();
  try {
    const response = await runTask("json");
    if (!response.ok) throw new Error(await failure(response));
    records = (await response.json()).data;
    $("task-stats").textContent = `${records.length} document(s) in ${((performance.now() - began) / 1000).toFixed(2)} s`;
    showRecords();
    $("downloads").hidden = false;
  } catch (e) {
    if (!(e instanceof Refused)) $("task-message").textContent = e.message;
  }
};

function row(cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement(tag);
    td.textContent = cell ?? "";
    tr.appendChild(td);
  }
  return tr;
}

function showRecords() {
  const table = $("results");
  if (task.command === "extract") {
    table.append(row(["document", "head", "relation", "tail"], "th"));
    for (const r of records) for (const rel of r.relations || []) table.append(row([r.id ?? r.line, rel.head, rel.relation, rel.tail]));
    if (!$("file").files[0]) highlight(records[0]);
  } else {
    const name = task.command === "qa" ? "answer" : "labels";
    table.append(row(["document", name, "text"], "th"));
    for (const r of records) table.append(row([r.id ?? r.line, [].concat(r[name] ?? "(none)").join(", "), r.text]));
  }
}

function highlight(record) {
  // the document's text as the offsets count in it (title, a space, abstract), each copied entity marked
  const doc = documents[0];
  const text = `${doc.title || ""} ${doc.abstract || ""}`;
  const marks = new Map();
  for (const rel of record.relations || []) {
    for (const [role, spans] of [["head", rel.head_spans], ["tail", rel.tail_spans]]) {
      for (const [start, end] of spans || []) {
        const mark = marks.get(`${start}:${end}`) || { start, end, roles: new Set() };
        mark.roles.add(role);
        marks.set(`${start}:${end}`, mark);
      }
    }
  }
  const out = $("highlighted");
  let at = 0;
  for (const m of [...marks.values()].sort((a, b) => a.start - b.start || b.end - a.end)) {
    if (m.start < at) continue; // inside one already marked
    out.append(text.slice(at, m.start));
    const mark = document.createElement("mark");
    mark.className = [...m.roles].join(" ");
    mark.dataset.start = m.start;
    mark.dataset.end = m.end;
    mark.textContent = text.slice(m.start, m.end);
    out.append(mark);
    at = m.end;
  }
  out.append(text.slice(at));
}

for (const button of document.querySelectorAll("#downloads button")) {
  button.onclick = async () => {
    const format = button.dataset.format;
    let blob;
    if (format === "json") {
      blob = new Blob([records.map((r) => JSON.stringify(r)).join("\n") + "\n"], { type: "application/jsonl" });
    } else {
      const response = await runTask(format);
      if (!response.ok) return ($("task-message").textContent = await failure(response));
      blob = await response.blob();
    }
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${task.command}.${{ json: "jsonl", pubtator: "pubtator", "bioc-xml": "bioc.xml" }[format]}`;
    a.click();
  };
}

start();
