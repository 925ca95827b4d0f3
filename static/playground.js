// Playground: POST the prompt, read the chunked text answer as it streams, append it as text nodes
// (never innerHTML: the model's output is untrusted).
(function () {
  "use strict";
  const form = document.getElementById("playground-form");
  if (!form) return;
  const output = document.getElementById("playground-output");
  const status = document.getElementById("playground-status");
  const go = document.getElementById("playground-go");
  const stop = document.getElementById("playground-stop");
  let controller = null;

  function number(data, name) {
    const raw = data.get(name);
    return raw === null || raw === "" ? null : Number(raw);
  }

  function say(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  async function errorDetail(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === "string") return body.detail;
      return JSON.stringify(body.detail);
    } catch (_) {
      return response.statusText;
    }
  }

  async function generate() {
    if (controller) controller.abort();
    controller = new AbortController();
    const data = new FormData(form);
    const body = {
      prompt: data.get("prompt") || "",
      system: data.get("system") || "",
      max_new_tokens: number(data, "max_new_tokens") ?? 256,
      temperature: number(data, "temperature") ?? 0.8,
      top_p: number(data, "top_p") ?? 0.9,
      repetition_penalty: number(data, "repetition_penalty") ?? 1.1,
      seed: number(data, "seed"),
    };
    output.textContent = "";
    say("Waiting for the model…");
    go.disabled = true;
    stop.disabled = false;
    const started = performance.now();
    let firstText = null;
    let chunks = 0;
    try {
      const response = await fetch(form.dataset.streamUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: {
          "Content-Type": "application/json",
          Accept: "text/plain",
          "X-CSRF-Token": form.dataset.csrf,
        },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) {
        say(`Error ${response.status}: ${await errorDetail(response)}`, true);
        return;
      }
      const version = response.headers.get("X-Policy-Version");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const text = decoder.decode(value, { stream: true });
        if (!text) continue;
        if (firstText === null) firstText = performance.now();
        output.appendChild(document.createTextNode(text));
        chunks += 1;
        say(`v${version} · streaming…`);
      }
      const rest = decoder.decode();
      if (rest) output.appendChild(document.createTextNode(rest));
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const latency = firstText === null ? "no text" : `first text after ${Math.round(firstText - started)} ms`;
      say(`v${version} · ${chunks} chunks · ${latency} · done in ${seconds} s`);
    } catch (err) {
      if (err.name === "AbortError") say("Stopped.");
      else say(`Error: ${err.message}`, true);
    } finally {
      go.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  stop.addEventListener("click", () => {
    if (controller) controller.abort();
  });
})();
