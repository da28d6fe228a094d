// fabricflow's live page. Plain JavaScript, no build step, no libraries. Every value from the
// database (names, errors, replies) is user data: it goes into the page as text (textContent,
// createTextNode, setAttribute), never as HTML.
"use strict";

(function () {
  const STATES = ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];
  const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
  const RESOURCES = [
    ["workspace_id", "Workspace"], ["endpoint_id", "Endpoint"], ["model_id", "Model"],
    ["model_version_id", "Model version"], ["service_instance_id", "Service instance"],
  ];

  let view = readHash();
  let source = null;
  let shownJob = null; // the last "job" message, with the local time it arrived
  const byId = (id) => document.getElementById(id);

  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    return { state: p.get("state") || "", name: p.get("name") || "", job: p.get("job") || "" };
  }

  function writeHash() {
    const p = new URLSearchParams();
    for (const key of ["state", "name", "job"]) if (view[key]) p.set(key, view[key]);
    history.replaceState(null, "", "#" + p.toString());
  }

  // An element with attributes ({class, text, ...}) and children (nodes or strings, as text).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function stateBadge(state) {
    return el("span", { class: "state state-" + state, text: state });
  }

  function seconds(ms) {
    const s = Math.max(0, ms / 1000);
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  }

  function localTime(iso) {
    return iso ? new Date(iso).toLocaleString() : "";
  }

  // --- live connection ----------------------------------------------------------------------

  function connect() {
    if (source) source.close();
    const q = new URLSearchParams();
    for (const key of ["state", "name", "job"]) if (view[key]) q.set(key, view[key]);
    source = new EventSource("api/stream?" + q.toString());
    source.addEventListener("jobs", (e) => renderJobs(JSON.parse(e.data)));
    source.addEventListener("job", (e) => {
      shownJob = { data: JSON.parse(e.data), received: Date.now() };
      renderJob();
    });
    source.onopen = () => setLive("live", "live");
    source.onerror = () => setLive("reconnecting…", "down"); // EventSource retries by itself
  }

  function setLive(text, cls) {
    const live = byId("live");
    live.textContent = text;
    live.className = "live " + cls;
  }

  function select(changes) {
    Object.assign(view, changes);
    writeHash();
    connect();
  }

  // --- jobs ---------------------------------------------------------------------------------

  function renderJobs(data) {
    if (data.error) {
      byId("jobs-note").textContent = data.error;
      return;
    }
    const counts = clear(byId("counts"));
    const all = el("button", { type: "button", class: view.state ? "" : "active" }, "All ",
                   el("b", { text: data.total }));
    all.addEventListener("click", () => select({ state: "" }));
    counts.appendChild(all);
    for (const state of STATES) {
      const button = el("button", { type: "button", class: "state-" + state + (view.state === state ? " active" : "") },
                        state + " ", el("b", { text: data.counts[state] || 0 }));
      button.addEventListener("click", () => select({ state: view.state === state ? "" : state }));
      counts.appendChild(button);
    }
    const body = clear(document.querySelector("#jobs tbody"));
    for (const job of data.jobs) {
      const row = el("tr", { class: job.id === shownId() ? "selected" : "", "data-id": job.id },
        el("td", {}, el("code", { class: "job-id", text: job.id })),
        el("td", { class: "name" }, el("span", { text: job.name }),
           job.kind === "teardown" ? el("span", { class: "tag", text: "teardown" }) : null,
           job.error ? el("div", { class: "error-line", text: job.error }) : null),
        el("td", {}, stateBadge(job.state)),
        el("td", { title: job.updated_at, text: localTime(job.updated_at) }));
      row.addEventListener("click", () => select({ job: job.id }));
      body.appendChild(row);
    }
    const filtered = view.state || view.name;
    byId("jobs-note").textContent = data.jobs.length
      ? (data.jobs.length >= 100 ? "newest first; the first " + data.jobs.length + " shown" : "newest first")
      : (filtered ? "no job matches these filters" : "no jobs yet: fabricflow submit SPEC");
  }

  function shownId() {
    return shownJob && shownJob.data.job ? shownJob.data.job.id : view.job;
  }

  // --- one job ------------------------------------------------------------------------------

  function renderJob() {
    const data = shownJob.data;
    const hint = byId("job-hint");
    if (data.error) {
      hint.textContent = data.error;
      hint.hidden = false;
      byId("job").hidden = true;
      return;
    }
    hint.hidden = true;
    byId("job").hidden = false;
    const job = data.job;
    byId("job-name").textContent = job.name;
    clear(byId("job-state")).appendChild(stateBadge(job.state));
    byId("job-id").textContent = job.id;
    byId("job-kind").textContent = job.kind === "teardown" ? "teardown of " + job.parent_id
      : (job.cancel_requested && !TERMINAL.has(job.state) ? "cancel requested" : "");
    const error = byId("job-error");
    error.hidden = !job.error;
    error.textContent = job.error ? describeError(job.error) : "";
    renderTimeline();
    renderResources(job);
    renderReply(job, data.last_invocation);
    renderEvents(data.events);
    for (const row of document.querySelectorAll("#jobs tbody tr")) {
      row.className = row.getAttribute("data-id") === job.id ? "selected" : "";
    }
  }

  function describeError(error) {
    const parts = [];
    if (error.code) parts.push(error.code + ": ");
    parts.push(error.message || "");
    if (error.request_id) parts.push(" (request " + error.request_id + ")");
    return parts.join("");
  }

  // The server's "now", moved on by the time since the message arrived.
  function now() {
    return Date.parse(shownJob.data.at) + (Date.now() - shownJob.received);
  }

  function renderTimeline() {
    const job = shownJob.data.job;
    const timeline = clear(byId("timeline"));
    const ended = TERMINAL.has(job.state);
    const t = (iso) => (iso ? Date.parse(iso) : null);
    let start = t(job.created_at);
    let end = ended ? t(job.finished_at) || t(job.updated_at) : now();
    for (const step of job.steps) {
      if (step.started_at) start = Math.min(start, t(step.started_at));
      if (step.finished_at) end = Math.max(end, t(step.finished_at));
    }
    const span = Math.max(end - start, 1);
    for (const step of job.steps) {
      const track = el("div", { class: "track" });
      const from = t(step.started_at);
      let detail = step.state;
      if (from !== null) {
        const to = t(step.finished_at) || (ended ? t(step.updated_at) || end : now());
        const bar = el("div", {
          class: "bar " + (step.is_wait ? "wait" : "create") + " state-" + step.state,
          title: "started " + localTime(step.started_at)
            + (step.finished_at ? ", finished " + localTime(step.finished_at) : ", not finished"),
        });
        bar.style.left = ((from - start) / span) * 100 + "%";
        bar.style.width = Math.max(((to - from) / span) * 100, 0.5) + "%";
        track.appendChild(bar);
        detail += " · " + seconds(to - from) + (step.is_wait ? " waited" : "");
      }
      if (step.resource_status) detail += " · " + step.resource_status;
      if (step.attempts) detail += " · attempts " + step.attempts;
      timeline.appendChild(el("div", { class: "step" },
        el("span", { class: "step-name", text: step.name }),
        track,
        el("span", { class: "step-detail", text: detail }),
        step.error ? el("div", { class: "error-line", text: describeError(step.error) }) : null));
    }
  }

  function renderResources(job) {
    const body = clear(document.querySelector("#resources tbody"));
    for (const [key, label] of RESOURCES) {
      const id = job.result[key];
      body.appendChild(el("tr", {}, el("th", { text: label }),
        el("td", {}, id ? el("code", { class: "resource-id", text: id }) : el("span", { class: "none", text: "—" }))));
    }
  }

  function renderReply(job, last) {
    const reply = byId("reply");
    if (last && (last.reply || last.error)) {
      reply.textContent = last.reply || describeError(last.error);
      reply.setAttribute("title", "fabricflow invoke, " + localTime(last.at));
    } else {
      reply.textContent = job.result.reply || "(no reply yet)";
      reply.setAttribute("title", job.result.finish_reason ? "finish_reason " + job.result.finish_reason : "");
    }
  }

  function renderEvents(events) {
    const body = clear(document.querySelector("#events tbody"));
    for (const e of events) {
      body.appendChild(el("tr", {}, el("td", { title: e.at, text: localTime(e.at) }), el("td", { text: e.step || "" }),
        el("td", { text: e.from || "" }), el("td", { text: e.to || "" }), el("td", { text: e.detail || "" })));
    }
  }

  // --- start --------------------------------------------------------------------------------

  const nameFilter = byId("name-filter");
  nameFilter.value = view.name;
  let typing = null;
  nameFilter.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => select({ name: nameFilter.value.trim() }), 300);
  });
  byId("filters").addEventListener("submit", (e) => e.preventDefault());
  window.addEventListener("hashchange", () => {
    view = readHash();
    nameFilter.value = view.name;
    connect();
  });
  // A running step's bar grows with the clock between messages.
  setInterval(() => {
    if (shownJob && shownJob.data.job && !TERMINAL.has(shownJob.data.job.state)) renderTimeline();
  }, 1000);
  connect();
})();
