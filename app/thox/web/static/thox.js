// The device page: copy buttons, snippet tabs and a status refresh.
// No inline script (the CSP forbids it) and nothing from the network but this device.
"use strict";

function copyText(text, button) {
  const done = () => {
    const old = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = old; }, 1500);
  };
  // navigator.clipboard needs a secure context (https or localhost); the device
  // is plain http on the LAN, so fall back to a selected textarea + execCommand
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => legacyCopy(text) && done());
  } else if (legacyCopy(text)) {
    done();
  }
}

function legacyCopy(text) {
  const ta = document.createElement("textarea");
  ta.value = text;
  ta.setAttribute("readonly", "");
  ta.className = "offscreen";
  ta.style.position = "fixed";
  ta.style.top = "-1000px";
  document.body.appendChild(ta);
  ta.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
  document.body.removeChild(ta);
  return ok;
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function renderStatus(s) {
  const set = (name, value) => {
    const e = document.querySelector(`[data-field="${name}"]`);
    if (e) e.textContent = value;
  };
  set("status", s.status);
  set("version", s.version);
  set("loaded", s.loaded.length ? s.loaded.join(", ") : "none (models load on first request)");
  set("queue", String(s.queue));

  const tbody = document.querySelector('[data-list="models"]');
  if (tbody) {
    tbody.replaceChildren();
    if (!s.models.length) {
      const tr = el("tr", { class: "empty" });
      const td = el("td", { colspan: "5" }, "No models installed yet. Try thox models demo or thox models pull thox-coder-7b on the device.");
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
    for (const m of s.models) {
      const tr = el("tr");
      tr.appendChild(el("td", { class: "mono" }, m.id));
      tr.appendChild(el("td", {}, m.kind));
      tr.appendChild(el("td", {}, m.size_text));
      const td = el("td");
      td.appendChild(el("span", { class: "tag " + m.state.replace(/ /g, "-") }, m.state));
      tr.appendChild(td);
      tr.appendChild(el("td", {}, String(m.queue)));
      tbody.appendChild(tr);
    }
  }

  const pulls = document.querySelector('[data-list="pulls"]');
  if (pulls) {
    pulls.replaceChildren();
    if (s.pulls.length) pulls.appendChild(el("h3", {}, "Downloads"));
    for (const p of s.pulls) {
      const box = el("div", { class: "pull" });
      const head = el("div", { class: "pull-head" });
      head.appendChild(el("span", { class: "mono" }, p.model));
      let info = (p.percent !== null ? `${p.percent}% · ` : "") + `${p.done_text} of ${p.total_text}`;
      if (p.active) info += ` · ${p.rate_text}` + (p.eta_text ? ` · ${p.eta_text} left` : "");
      head.appendChild(el("span", { class: "muted" }, `${info} · ${p.state}`));
      box.appendChild(head);
      const bar = el("progress", { max: "100" });
      if (p.percent !== null) bar.value = p.percent;
      box.appendChild(bar);
      pulls.appendChild(box);
    }
  }
}

async function refresh() {
  if (document.hidden) return;
  try {
    const r = await fetch("/status.json", { cache: "no-store", credentials: "same-origin" });
    if (r.ok) renderStatus(await r.json());
  } catch (e) { /* device restarting: try again next tick */ }
}

document.addEventListener("DOMContentLoaded", () => {
  document.documentElement.classList.remove("no-js");
  for (const b of document.querySelectorAll("[data-copy]")) {
    b.addEventListener("click", () => {
      const target = document.querySelector(b.getAttribute("data-copy"));
      if (target) copyText(target.value !== undefined && target.tagName === "INPUT" ? target.value : target.textContent, b);
    });
  }
  for (const t of document.querySelectorAll("[data-tab]")) {
    t.addEventListener("click", () => {
      const id = t.getAttribute("data-tab");
      for (const x of document.querySelectorAll("[data-tab]")) x.classList.toggle("active", x === t);
      for (const p of document.querySelectorAll("[data-panel]")) p.classList.toggle("active", p.getAttribute("data-panel") === id);
    });
  }
  for (const f of document.querySelectorAll("form[data-confirm]")) {
    f.addEventListener("submit", (ev) => {
      if (!window.confirm(f.getAttribute("data-confirm"))) ev.preventDefault();
    });
  }
  if (document.getElementById("status")) setInterval(refresh, 3000);
});
