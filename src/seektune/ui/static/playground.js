// The playground: one prompt to one or two models, answers streamed in, feedback on each answer.
"use strict";

const panes = ["a", "b"].map((id) => ({
  id, root: document.getElementById(`pane-${id}`), model: document.getElementById(`model-${id}`), history: [],
}));
const form = document.getElementById("chat-form");
const prompt = document.getElementById("prompt");
const send = document.getElementById("send");
const sideBySide = document.getElementById("side-by-side");

sideBySide.addEventListener("change", () => { panes[1].root.hidden = !sideBySide.checked; });
document.getElementById("clear").addEventListener("click", () => {
  for (const pane of panes) { pane.history = []; pane.root.querySelector(".conversation").replaceChildren(); }
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if (!text) return;
  prompt.value = "";
  send.disabled = true;
  const active = panes.filter((p) => !p.root.hidden);
  try { await Promise.all(active.map((pane) => ask(pane, text))); } finally { send.disabled = false; prompt.focus(); }
});

function turn(pane, role, text) {
  const node = el("div", { class: `turn ${role}` }, el("span", { class: "who", text: role === "user" ? "you" : pane.model.value }));
  const body = el("span", { class: "text", text });
  node.append(body);
  pane.root.querySelector(".conversation").append(node);
  return { node, body };
}

// Send the conversation so far and stream the answer into a new turn.
async function ask(pane, text) {
  pane.history.push({ role: "user", content: text });
  turn(pane, "user", text);
  const { node, body } = turn(pane, "assistant", "");
  node.classList.add("streaming");
  let responseId = null, answer = "", problem = null;
  try {
    const response = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: pane.model.value, messages: pane.history,
        max_tokens: Number(document.getElementById("max-tokens").value) || 64,
        temperature: Number(document.getElementById("temperature").value) || 0,
      }),
    });
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffered.indexOf("\n\n")) >= 0) {
        const event = buffered.slice(0, cut);
        buffered = buffered.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) { problem = chunk.error.message; continue; }
          responseId = responseId || chunk.id;
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) { answer += choice.delta.content; body.textContent = answer; }
          }
        }
      }
    }
  } catch (e) {
    problem = e.message;
  }
  node.classList.remove("streaming");
  node.dataset.done = "true";
  if (problem) {
    node.append(el("div", { class: "note error", role: "alert", text: problem }));
    pane.history.pop();
    return;
  }
  pane.history.push({ role: "assistant", content: answer });
  if (responseId) feedbackControls(node, responseId, answer);
}

// Thumbs up/down and a corrected answer, sent to the server's feedback store.
function feedbackControls(node, responseId, answer) {
  const note = el("span", { class: "note" });
  const up = el("button", { type: "button", class: "up", title: "good answer", text: "👍" });
  const down = el("button", { type: "button", class: "down", title: "bad answer", text: "👎" });
  const fix = el("button", { type: "button", class: "fix", text: "Correct it" });
  const actions = el("div", { class: "actions" }, up, down, fix, note);
  node.append(actions);
  const submit = async (body) => {
    note.className = "note";
    note.textContent = "sending…";
    try {
      const response = await fetch("/api/feedback", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ response_id: responseId, ...body }),
      });
      const result = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error((result.error && result.error.message) || `HTTP ${response.status}`);
      note.textContent = `thanks: recorded as ${result.id}`;
    } catch (e) {
      note.className = "note error";
      note.textContent = e.message;
    }
  };
  up.addEventListener("click", () => submit({ rating: 1 }));
  down.addEventListener("click", () => submit({ rating: -1 }));
  fix.addEventListener("click", () => {
    if (actions.querySelector("textarea")) return;
    const box = el("textarea", { rows: 3, class: "correction" });
    box.value = answer;
    const save = el("button", { type: "button", class: "save-correction", text: "Send correction" });
    save.addEventListener("click", () => {
      if (!box.value.trim()) { note.className = "note error"; note.textContent = "type the answer it should have given"; return; }
      submit({ correction: box.value, rating: -1 });
    });
    actions.append(box, save);
  });
}
