// The rating page: one trial at a time, every answer saved on the server before the next.
// The rater token lives in localStorage, so a reload (or a server restart) resumes the batch.
"use strict";
const TOKEN_KEY = "imagen-fast-rater-token";
const $ = (id) => document.getElementById(id);
let busy = false;

function show(section) {
  for (const id of ["start", "trial", "done"]) $(id).hidden = id !== section;
}

function setStatus(text) {
  $("status").textContent = text || "";
  $("status").hidden = !text;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// fetch with retries: a network failure or a 5xx is retried with back-off (the server may
// be restarting); any other answer is returned as is.
async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  for (let attempt = 0; ; attempt++) {
    try {
      const resp = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
      if (resp.status >= 500) throw new Error("server error " + resp.status);
      setStatus("");
      const data = await resp.json();
      return { status: resp.status, data };
    } catch (err) {
      setStatus("Connection to the server lost: retrying, your answers so far are saved.");
      await sleep(Math.min(4000, 250 * 2 ** Math.min(attempt, 4)));
    }
  }
}

async function start(event) {
  event.preventDefault();
  $("start-button").disabled = true;
  const r = await api("POST", "/api/raters", { name: $("rater-name").value });
  $("start-button").disabled = false;
  if (r.status !== 201) { setStatus(r.data.error || "could not start"); return; }
  localStorage.setItem(TOKEN_KEY, r.data.token);
  await next();
}

async function next() {
  const r = await api("GET", "/api/next");
  if (r.status === 401) {            // unknown token (e.g. another study): start afresh
    localStorage.removeItem(TOKEN_KEY);
    show("start");
    return;
  }
  if (r.status !== 200) { setStatus(r.data.error || "error"); return; }
  if (r.data.done) {
    $("code").textContent = r.data.code;
    show("done");
    return;
  }
  render(r.data.trial, r.data.progress);
}

function render(t, progress) {
  const trial = $("trial");
  trial.dataset.trial = t.id;
  trial.dataset.kind = t.kind;
  trial.dataset.position = t.position;
  $("progress").textContent = `Question ${progress.done + 1} of ${progress.total}`;
  $("question").textContent = t.question;
  $("caption").textContent = t.caption;
  $("caption").hidden = !t.show_caption;
  const images = $("images");
  images.replaceChildren();
  t.images.forEach((src, i) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = src;
    img.alt = t.images.length > 1 ? (i === 0 ? "left image" : "right image") : "image";
    fig.append(img);
    if (t.images.length > 1) {
      const cap = document.createElement("figcaption");
      cap.textContent = i === 0 ? "Left" : "Right";
      fig.append(cap);
    }
    images.append(fig);
  });
  const choices = $("choices");
  choices.replaceChildren();
  for (const c of t.choices) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = c.label;
    b.dataset.answer = c.value;
    b.addEventListener("click", () => answer(t.id, c.value));
    choices.append(b);
  }
  show("trial");
}

async function answer(trialId, value) {
  if (busy) return;
  busy = true;
  for (const b of $("choices").querySelectorAll("button")) b.disabled = true;
  try {
    const r = await api("POST", "/api/answer", { trial: trialId, answer: value });
    if (r.status !== 200 && r.status !== 409) setStatus(r.data.error || "error");
    await next();
  } finally {
    busy = false;
  }
}

$("start-form").addEventListener("submit", start);
if (localStorage.getItem(TOKEN_KEY)) next(); else show("start");
