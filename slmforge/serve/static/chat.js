// The chat page of `slmforge serve`: a conversation streamed from /v1/chat/completions (stream: true, server-sent
// events in OpenAI's chunk format). No build step, no libraries.
// Safety: model output and the server's error messages are inserted as text (text nodes, textContent), never as
// HTML, so markup or markdown in an answer shows as the characters it is. The API key, asked for when the server
// answers 401, lives in the variable `apiKey` only: never in storage, cookies or the URL.
"use strict";

let apiKey = null;
let modelName = null;
const history = [];  // the conversation sent with each request: {role, content}
let controller = null;  // the AbortController of the request in flight (Stop aborts it)
let retry = null;  // what to run again once a key has been given

const $ = (id) => document.getElementById(id);

function headers() {
  const h = {"Content-Type": "application/json"};
  if (apiKey !== null) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

// ---- errors: the server's {"error": {message, type, param, code}} shown as it is, as text ----

function describe(status, err) {
  const lines = [`Error ${status}${err.code ? " (" + err.code + ")" : ""}: ${err.message}`];
  if (err.param) lines.push(`param: ${err.param}`);
  if (err.type) lines.push(`type: ${err.type}`);
  return lines.join("\n");
}

async function errorText(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    // not JSON: a proxy's page, say
  }
  const err = body && body.error;
  return err ? describe(response.status, err) : `Error ${response.status} ${response.statusText}`;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

// ---- the API key: asked for on 401, kept in memory ----

function askForKey(then) {
  retry = then;
  $("key-form").hidden = false;
  $("key").value = "";
  $("key").focus();
}

async function useKey(event) {
  event.preventDefault();
  apiKey = $("key").value;
  $("key").value = "";
  $("key-form").hidden = true;
  clearError();
  const then = retry;
  retry = null;
  if (then) await then();
}

async function loadModel() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (!r.ok) {
    showError(await errorText(r));
    if (r.status === 401) askForKey(loadModel);
    return false;
  }
  clearError();
  modelName = (await r.json()).data[0].id;
  $("model").textContent = modelName;
  return true;
}

// ---- the conversation ----

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  $("log").append(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function settings() {
  const body = {};
  for (const [id, key] of [["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"]]) {
    const value = $(id).value.trim();
    if (value !== "") body[key] = Number(value);  // the server checks the ranges (400 shown as the error)
  }
  if ($("calculator").checked) body.tools = "calculator";
  return body;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("regenerate").disabled = on || history.length === 0;
}

async function send(event) {
  if (event) event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  $("prompt").value = "";
  history.push({role: "user", content: text});
  addMessage("user", text);
  await complete();
}

// Ask for the next assistant message and stream it into a new bubble.
async function complete() {
  if (modelName === null && !(await loadModel())) {
    if (!$("key-form").hidden) retry = complete;
    return;
  }
  const body = {model: modelName, messages: history.slice(), stream: true, ...settings()};
  controller = new AbortController();
  busy(true);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  let text = "";
  let finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
                                                   signal: controller.signal});
    if (!r.ok) {
      div.remove();
      showError(await errorText(r));
      if (r.status === 401) askForKey(complete);
      return;
    }
    clearError();
    const out = div.querySelector(".text");
    finish = await readStream(r, (piece) => {
      text += piece;
      out.append(piece);  // a text node: never parsed as HTML
      div.scrollIntoView({block: "end"});
    });
  } catch (e) {
    finish = e.name === "AbortError" ? "stopped" : "error";
    if (finish === "error") showError(`The request failed: ${e.message}`);
  } finally {
    controller = null;
    div.classList.remove("streaming");
    if (div.isConnected) finished(div, text, finish);
    busy(false);
  }
}

function finished(div, text, finish) {
  div.dataset.finish = finish || "none";
  history.push({role: "assistant", content: text});
  const notes = {length: "stopped at max tokens", stopped: "stopped", error: "ended by an error"};
  if (notes[finish]) {
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = `(${notes[finish]})`;
    div.append(note);
  }
}

// Server-sent events: "data: {chunk}\n\n" ... "data: [DONE]\n\n" -> the finish reason.
async function readStream(response, onText) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        showError(describe(500, chunk.error));
        finish = "error";
        continue;
      }
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
}

function regenerate() {
  if (controller || history.length === 0) return;
  if (history[history.length - 1].role === "assistant") {
    history.pop();
    const answers = $("log").querySelectorAll(".assistant");
    if (answers.length) answers[answers.length - 1].remove();
  }
  complete();
}

function clearConversation() {
  if (controller) controller.abort();
  history.length = 0;
  $("log").replaceChildren();
  clearError();
  busy(false);
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", clearConversation);
  $("key-form").addEventListener("submit", useKey);
  $("change-key").addEventListener("click", () => askForKey(loadModel));
  $("settings").addEventListener("submit", (e) => e.preventDefault());
  busy(false);
  loadModel();
});
