// The browser's side of tests/interop.rs: tests/interop/browser.mjs opens this page, served by
// wsd's static_dir over https (or http), and calls interop(). It connects back to the page's
// own server (wss:// on an https page), offers two subprotocols, echoes text and binary
// messages (a 100 KB one of each), sends Close 4000 and reports what was negotiated:
// { protocol, extensions, close_code, clean, echoes }. Throws, naming the step, when a step
// fails or takes over 20 s.
"use strict";

window.interop = async function interop(protocols) {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
  const ws = new WebSocket(url, protocols);
  ws.binaryType = "arraybuffer";
  const events = [];
  let wake = () => {};
  const push = (event) => {
    events.push(event);
    wake();
  };
  ws.onopen = () => push({ type: "open" });
  ws.onmessage = (e) => push({ type: "message", data: e.data });
  ws.onerror = () => push({ type: "error" });
  ws.onclose = (e) => push({ type: "close", code: e.code, reason: e.reason, clean: e.wasClean });

  /** The next event, which must be of `type`; `step` names the wait in the error. */
  async function next(type, step) {
    const deadline = Date.now() + 20_000;
    while (!events.length) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${step}: nothing within 20 s`);
      await new Promise((resolve) => {
        wake = resolve;
        setTimeout(resolve, left);
      });
    }
    const event = events.shift();
    if (event.type === "error") {
      throw new Error(`${step}: the WebSocket failed (the browser's reason is in the console)`);
    } else if (event.type !== type) {
      throw new Error(`${step}: got ${event.type} ${event.code ?? ""} ${event.reason ?? ""}`);
    }
    return event;
  }

  await next("open", `connecting to ${url}`);
  const random = new Uint8Array(100_000);
  let x = 0x2545f491;
  for (let i = 0; i < random.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    random[i] = x & 0xff;
  }
  const messages = [
    ["text", "héllo wss ✓"],
    ["empty text", ""],
    ["100 KB text", "wsd interop, compressible text. ".repeat(3125)],
    ["binary", new Uint8Array([0, 1, 2, 254, 255])],
    ["100 KB binary", random],
  ];
  let echoes = 0;
  for (const [what, sent] of messages) {
    ws.send(sent);
    const { data } = await next("message", `echo of the ${what} message`);
    const same =
      typeof sent === "string"
        ? data === sent
        : data instanceof ArrayBuffer &&
          data.byteLength === sent.length &&
          new Uint8Array(data).every((b, i) => b === sent[i]);
    if (!same) throw new Error(`echo of the ${what} message: it came back different`);
    echoes++;
  }
  ws.close(4000, "bye");
  const closed = await next("close", "closing handshake (Close 4000)");
  return {
    protocol: ws.protocol,
    extensions: ws.extensions,
    close_code: closed.code,
    clean: closed.clean,
    echoes,
  };
};
