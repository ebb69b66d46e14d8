// The wsd chat room: one WebSocket to the page's own address (the `chat` app relays every text
// message to every client, the sender included). Reconnects after a drop.
"use strict";

const statusEl = document.getElementById("status");
const list = document.getElementById("messages");
const form = document.getElementById("composer");
const input = document.getElementById("input");
const send = document.getElementById("send");
let ws = null;

function setStatus(state, text) {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
  const open = state === "open";
  input.disabled = !open;
  send.disabled = !open;
}

function append(text) {
  const item = document.createElement("li");
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  item.append(time, " ", text); // text nodes: a message is never parsed as HTML
  list.append(item);
  list.scrollTop = list.scrollHeight;
}

function connect() {
  setStatus("connecting", "connecting…");
  ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/");
  ws.onopen = () => {
    setStatus("open", "connected");
    input.focus();
  };
  ws.onmessage = (e) => append(String(e.data));
  ws.onclose = (e) => {
    setStatus("closed", "disconnected (" + e.code + "), retrying…");
    setTimeout(connect, 2000);
  };
}

form.addEventListener("submit", (e) => {
  e.preventDefault(); // the Send button and Enter both land here
  const text = input.value.trim();
  if (!text || !ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(text);
  input.value = "";
});

connect();
