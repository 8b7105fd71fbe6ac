// Browser-test bridge. Inside the Tauri app window.__TAURI__ already exists (withGlobalTauri) and this
// file does nothing. Opened in a plain browser from tilewise-ui-bridge (src-tauri/src/bin), it defines
// the same two entry points the dashboard uses, forwarding to that process, which answers with the
// app's own dispatch code against the real daemon:
//   core.invoke(cmd, args)  → POST /invoke/<cmd>  (JSON args → JSON result, or {error} with status 4xx/5xx)
//   event.listen(name, cb)  → Server-Sent Events from /events (`event: <name>`, data = JSON payload)
"use strict";
(function () {
  if (window.__TAURI__) return;
  let source = null;
  const listeners = {};
  function ensureSource() {
    if (source) return;
    source = new EventSource("/events");
    source.onmessage = () => {};
  }
  window.__TAURI__ = {
    bridge: true,
    core: {
      async invoke(cmd, args) {
        const r = await fetch(`/invoke/${encodeURIComponent(cmd)}`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify(args || {}),
        });
        const body = await r.json();
        if (!r.ok) throw body.error ?? body;
        return body;
      },
    },
    event: {
      async listen(name, cb) {
        ensureSource();
        if (!listeners[name]) {
          listeners[name] = [];
          source.addEventListener(name, (m) => {
            const payload = JSON.parse(m.data);
            for (const f of listeners[name]) f({ event: name, payload });
          });
        }
        listeners[name].push(cb);
        return () => { listeners[name] = listeners[name].filter((f) => f !== cb); };
      },
    },
  };
})();
